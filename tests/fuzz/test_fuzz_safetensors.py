"""Fuzz the strict safetensors header/offsets parser (``mhc_convert.formats.safetensors_io``):
structured edits of a valid file (length prefix, JSON bytes, dtype, shape, data_offsets,
``__metadata__``, the data buffer) and raw byte havoc on the whole file."""

from __future__ import annotations

import copy
import struct
import tempfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mhc_convert.errors import InvalidInputError
from mhc_convert.formats.safetensors_io import ST_DTYPES, load_tensor, read_header
from tests.fuzz.harness import check, dumps, fuzz_settings, json_text_mutated, json_values, mutated

WORK = Path(tempfile.mkdtemp(prefix="mhc-fuzz-st-"))
FILE = WORK / "model.safetensors"

# A valid file exercising every header rule: several dtypes (a sub-byte one included), a
# scalar, an empty tensor, metadata, and the 8-byte space padding safetensors writes.
TENSORS = {"a": ("F32", [2, 3], 24), "b": ("BF16", [4], 8), "c": ("U8", [], 1),
           "d": ("F4", [2], 1), "e": ("I64", [0], 0), "f": ("F8_E4M3", [3], 3)}


def _base_header() -> dict:
    doc: dict = {"__metadata__": {"format": "pt"}}
    pos = 0
    for key, (dt, shape, n) in TENSORS.items():
        doc[key] = {"dtype": dt, "shape": shape, "data_offsets": [pos, pos + n]}
        pos += n
    return doc


BASE_HEADER = _base_header()
BASE_DATA = bytes(range(sum(n for *_, n in TENSORS.values())))


def assemble(header: bytes, data: bytes, n: int | None = None) -> bytes:
    header = header + b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header) if n is None else n % 2**64) + header + data


BASE = assemble(dumps(BASE_HEADER).encode(), BASE_DATA)


def parse(data: bytes) -> None:
    FILE.write_bytes(data)
    hdr = read_header(FILE)
    for info in hdr.tensors.values():
        if ST_DTYPES[info.st_dtype][0] is not None:
            load_tensor(FILE, info)


def _write(data: bytes) -> Path:
    FILE.write_bytes(data)
    return FILE


def test_base_parses():
    hdr = read_header(_write(BASE))
    assert set(hdr.tensors) == set(TENSORS) and hdr.metadata == {"format": "pt"}


# ------------------------------------------------------------------------------ regressions
# Found by test_fuzz_header_structured: a 4301-digit integer literal in the header made
# CPython's json raise a bare ValueError (int_max_str_digits), which escaped the hierarchy.
LONG_INT_HEADER = b'{"a":{"dtype":"U8","shape":[' + b"9" * 4301 + b'],"data_offsets":[0,0]}}'


def test_regression_long_int_literal_is_invalid_input():
    with pytest.raises(InvalidInputError, match="not valid JSON"):
        read_header(_write(assemble(LONG_INT_HEADER, b"")))


# ------------------------------------------------------------------------------ structured
KEYS = list(TENSORS)
DTYPE_NAMES = st.sampled_from([*ST_DTYPES, "", "f32", "F32 ", "BF16\x00", "float32", "F8",
                               "__proto__"]) | st.text(max_size=6)
DIMS = st.integers(-2, 2**64) | st.sampled_from([0, 1, 2, 3, 2**32, 2**62, 2**63]) | json_values(2)


@st.composite
def header_edit(draw: st.DrawFn) -> dict:
    doc = copy.deepcopy(BASE_HEADER)
    for _ in range(draw(st.integers(1, 4))):
        key = draw(st.sampled_from(KEYS))
        what = draw(st.sampled_from(["dtype", "shape", "offsets", "entry", "extra_field",
                                     "drop_field", "drop_key", "new_key", "metadata",
                                     "swap_offsets"]))
        entry = doc.get(key)
        if not isinstance(entry, dict):
            continue
        if what == "dtype":
            entry["dtype"] = draw(DTYPE_NAMES | json_values(2))
        elif what == "shape":
            entry["shape"] = draw(st.lists(DIMS, max_size=5) | json_values(3))
        elif what == "offsets":
            entry["data_offsets"] = draw(st.lists(DIMS, max_size=3) | json_values(3))
        elif what == "entry":
            doc[key] = draw(json_values())
        elif what == "extra_field":
            entry[draw(st.text(max_size=6))] = draw(json_values(2))
        elif what == "drop_field":
            entry.pop(draw(st.sampled_from(["dtype", "shape", "data_offsets"])), None)
        elif what == "drop_key":
            doc.pop(key)
        elif what == "new_key":
            doc[draw(st.text(max_size=10))] = draw(json_values() | st.just(dict(entry)))
        elif what == "metadata":
            doc["__metadata__"] = draw(json_values())
        elif what == "swap_offsets":
            other = doc.get(draw(st.sampled_from(KEYS)))
            if isinstance(other, dict):
                entry["data_offsets"], other["data_offsets"] = (other.get("data_offsets"),
                                                                entry.get("data_offsets"))
    return doc


@st.composite
def structured(draw: st.DrawFn) -> bytes:
    text = dumps(draw(header_edit())) if draw(st.booleans()) else dumps(BASE_HEADER)
    header = draw(json_text_mutated(text)) if draw(st.booleans()) else text.encode()
    data = BASE_DATA
    if draw(st.booleans()):
        cut = draw(st.integers(-8, 8))
        data = data[:cut] if cut < 0 else data + b"\x00" * cut
    n = None
    if draw(st.booleans()):
        padded = len(header) + (-len(header) % 8)
        n = draw(st.sampled_from([0, 1, 7, padded - 1, padded + 1, padded + len(data),
                                  padded + len(data) + 1, 100_000_001, 2**63, 2**64 - 1])
                 | st.integers(0, 2**64 - 1))
    return assemble(header, data, n)


@fuzz_settings(max_examples=400)
@given(structured())
def test_fuzz_header_structured(data):
    check("safetensors/structured", parse, data)


@fuzz_settings(max_examples=300)
@given(mutated(BASE, max_ops=8))
def test_fuzz_header_bytes(data):
    check("safetensors/bytes", parse, data)


@fuzz_settings(max_examples=100)
@given(st.binary(max_size=64) | st.binary(max_size=8).map(lambda b: b.ljust(8, b"\x00") + b"{"))
def test_fuzz_header_random(data):
    check("safetensors/random", parse, data)
