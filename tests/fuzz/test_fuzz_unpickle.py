"""Fuzz the DCP ``.metadata`` route: ``SafeUnpickler`` (``mhc_model.safe_unpickle``) and the
type checks the torch_dist reader runs on whatever it returns (``formats.torch_dist``).

Three generators: raw byte havoc on the real megatron-core 0.19.2 ``.metadata``; object-level
edits of its unpickled ``Metadata`` (any field set to any value, then re-pickled); and opcode
streams built from scratch (allowlisted and refused globals, REDUCE/BUILD/NEWOBJ on them,
memo and stack operations). The first two go through ``inspect`` and a dry-run ``enable`` on a
copy of the real checkpoint; the third through ``safe_pickle_load`` + the reader's validation.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import pickle
import struct
import tempfile
import time
from pathlib import Path

import torch
from hypothesis import given
from hypothesis import strategies as st

from fixtures.hostile_sources import ITER, copy_megatron
from mhc_convert import engine
from mhc_convert.errors import InvalidInputError
from mhc_convert.formats import torch_dist as td
from mhc_model.safe_unpickle import _METADATA_TABLE, safe_pickle_load
from tests.fuzz.harness import check, fuzz_settings, json_values, mutated, note

WORK = Path(tempfile.mkdtemp(prefix="mhc-fuzz-md-"))
RUN = copy_megatron(WORK)
ITER_DIR = RUN / ITER
MPATH = ITER_DIR / ".metadata"
BASE = MPATH.read_bytes()
BASE_MD = safe_pickle_load(BASE, source=MPATH)


def through_cli_paths(data: bytes) -> None:
    """detect -> read (unpickle, validate, common state) -> config -> plan -> new values."""
    MPATH.write_bytes(data)
    engine.enable(RUN, WORK / "never-written", dry_run=True, allow_nonfinite=True)


def test_base_reads():
    MPATH.write_bytes(BASE)
    assert engine.inspect(RUN).tensors == len(BASE_MD.state_dict_metadata)
    engine.enable(RUN, WORK / "never-written", dry_run=True, allow_nonfinite=True)


# Truncation is rare here: almost any cut of a pickle is just "truncated".
@fuzz_settings(max_examples=200)
@given(mutated(BASE, max_ops=4, ops=("flip", "set", "set", "insert", "delete", "dup")))
def test_fuzz_metadata_bytes(data):
    check("metadata/bytes", through_cli_paths, data)


# ----------------------------------------------------------------------- object-level edits
KEYS = list(BASE_MD.state_dict_metadata)
SIDX = list(BASE_MD.storage_data)
ODD = st.sampled_from([
    [1], (1,), (-1,), (2**63,), torch.Size([2**40, 2**40]), torch.Size([]), -1, 2**64, 0,
    None, "", "../__0_0.distcp", "/etc/passwd", "__0_0.distcp", ".", "a\x00b", torch.bfloat16,
    torch.float8_e4m3fn, {"x": 1}, [[0, 0]], b"\x00", 1.5, float("nan"), True,
]) | json_values(3)


def _set(obj, name, value):
    # frozen dataclasses too (BUILD can do the same); an earlier edit may have put a plain
    # value (list, str, Size) where an object was, which has no fields to edit
    with contextlib.suppress(AttributeError, TypeError):
        object.__setattr__(obj, name, value)


@st.composite
def edited_metadata(draw: st.DrawFn) -> bytes:
    md = copy.deepcopy(BASE_MD)
    for _ in range(draw(st.integers(1, 3))):
        what = draw(st.sampled_from(["size", "chunks", "chunk_field", "dtype", "sm", "key",
                                     "info_field", "idx_field", "md_field", "storage_pair",
                                     "drop_storage", "md"]))
        key = draw(st.sampled_from(KEYS))
        sdm, sd = getattr(md, "state_dict_metadata", None), getattr(md, "storage_data", None)
        sm = sdm.get(key) if isinstance(sdm, dict) else None
        if what == "size" and hasattr(sm, "size"):
            _set(sm, "size", draw(ODD))
        elif what == "chunks" and hasattr(sm, "chunks"):
            sm.chunks = draw(ODD | st.just(sm.chunks * 2) | st.just(sm.chunks[:1]))
        elif what == "chunk_field" and getattr(sm, "chunks", None):
            _set(sm.chunks[0], draw(st.sampled_from(["offsets", "sizes"])), draw(ODD))
        elif what == "dtype" and hasattr(sm, "properties"):
            _set(sm.properties, "dtype", draw(ODD))
        elif what == "sm" and isinstance(sdm, dict):
            sdm[key] = draw(ODD)
        elif what == "key" and isinstance(sdm, dict) and key in sdm:
            sdm[draw(st.integers() | st.text(max_size=8))] = sdm.pop(key)
        elif what in ("info_field", "idx_field", "storage_pair", "drop_storage") \
                and isinstance(sd, dict) and sd:
            idx = draw(st.sampled_from(list(sd)))
            if what == "info_field":
                info = copy.copy(sd[idx])
                _set(info, draw(st.sampled_from(["relative_path", "offset", "length",
                                                 "transform_descriptors"])), draw(ODD))
                sd[idx] = info
            elif what == "idx_field":
                info = sd.pop(idx)
                new = copy.copy(idx)
                _set(new, draw(st.sampled_from(["fqn", "offset", "index"])),
                     draw(ODD.filter(lambda v: v.__hash__ is not None)))
                sd[new] = info
            elif what == "storage_pair":
                sd[idx] = draw(ODD)
            else:
                sd.pop(idx)
        elif what == "md_field" and sdm is not None:
            _set(md, draw(st.sampled_from(["state_dict_metadata", "storage_data",
                                           "planner_data", "storage_meta", "version",
                                           "extra"])), draw(ODD))
        elif what == "md":
            md = draw(ODD)
            break
    return pickle.dumps(md, protocol=draw(st.sampled_from([2, 4, 5])))


@fuzz_settings(max_examples=100)
@given(edited_metadata())
def test_fuzz_metadata_objects(data):
    check("metadata/objects", through_cli_paths, data)


# ------------------------------------------------------------------------- opcode streams
GLOBALS = sorted(_METADATA_TABLE, key=repr) + [("builtins", "eval"), ("os", "system"),
                                               ("builtins", "getattr"), ("nt", "system")]


def _str(s: str) -> bytes:
    b = s.encode("utf-8", "surrogatepass")
    return b"\x8c" + bytes([len(b)]) + b if len(b) < 256 else b"X" + struct.pack("<I", len(b)) + b


def _int(n: int) -> bytes:
    if 0 <= n < 256:
        return b"K" + bytes([n])
    if -2**31 <= n < 2**31:
        return b"J" + struct.pack("<i", n)
    raw = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw


OPS = st.one_of(
    st.integers(-2**40, 2**40).map(_int),
    st.sampled_from([0, 1, 2, 3, 255, 2**16, 2**31 - 1, 2**20]).map(_int),
    st.text(max_size=10).map(_str),
    st.sampled_from(GLOBALS).map(lambda mn: _str(mn[0]) + _str(mn[1]) + b"\x93"),
    st.sampled_from(GLOBALS).map(lambda mn: b"c" + f"{mn[0]}\n{mn[1]}\n".encode()),
    st.binary(max_size=8).map(lambda b: b"C" + bytes([len(b)]) + b),
    st.integers(0, 6).map(lambda i: b"h" + bytes([i])),  # BINGET
    st.sampled_from([b"N", b"\x88", b"\x89", b")", b"]", b"}", b"\x8f", b"(", b"t", b"\x85",
                     b"\x86", b"\x87", b"l", b"d", b"a", b"e", b"s", b"u", b"\x90", b"\x91",
                     b"R", b"b", b"\x81", b"\x92", b"\x94", b"2", b"0", b"1", b"G" + b"\0" * 8,
                     b"Q", b"\x80\x02"]),
)


@st.composite
def opcode_stream(draw: st.DrawFn) -> bytes:
    """Free-form: any opcodes in any order (stack underflow, bad marks, truncation...)."""
    body = b"".join(draw(st.lists(OPS, min_size=1, max_size=30)))
    return b"\x80\x04" + body + (b"." if draw(st.integers(0, 9)) else b"")


def _tuple(items: list[bytes]) -> bytes:
    return b"(" + b"".join(items) + b"t"


LEAF = st.one_of(st.integers(-2**40, 2**40).map(_int), st.text(max_size=8).map(_str),
                 st.sampled_from([b"N", b"\x88", b"\x89", b")", b"]", b"}"]),
                 st.sampled_from(["__0_0.distcp", "../x", "decoder.final_norm.weight"]).map(_str),
                 st.sampled_from(GLOBALS).map(lambda mn: _str(mn[0]) + _str(mn[1]) + b"\x93"))
CALLEE = st.sampled_from(GLOBALS).map(lambda mn: _str(mn[0]) + _str(mn[1]) + b"\x93")


def _expr(children: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    args = st.lists(children, max_size=4)
    return st.one_of(
        args.map(_tuple),
        args.map(lambda xs: b"(" + b"".join(xs) + b"l"),
        st.lists(st.tuples(children, children), max_size=3).map(
            lambda kv: b"(" + b"".join(k + v for k, v in kv) + b"d"),
        st.tuples(CALLEE, args).map(lambda fa: fa[0] + _tuple(fa[1]) + b"R"),  # REDUCE
        st.tuples(CALLEE, args).map(lambda fa: fa[0] + _tuple(fa[1]) + b"\x81"),  # NEWOBJ
        st.tuples(CALLEE, st.lists(st.tuples(st.text(max_size=20).map(_str), children),
                                   max_size=4)).map(  # NEWOBJ + BUILD with a __dict__ state
            lambda fs: fs[0] + b")\x81(" + b"".join(k + v for k, v in fs[1]) + b"db"),
        children.map(lambda c: c + b"\x94h\x00"),  # MEMOIZE, then the memo twice over
    )


WELL_FORMED = st.recursive(LEAF, _expr, max_leaves=12).map(lambda e: b"\x80\x04" + e + b".")


def unpickle_and_validate(data: bytes) -> None:
    md = safe_pickle_load(data, source=MPATH)
    note("metadata/unpickled", type(md).__name__)
    td._validate(md, ITER_DIR, MPATH)


@fuzz_settings(max_examples=300)
@given(opcode_stream())
def test_fuzz_metadata_opcodes(data):
    check("metadata/opcodes", unpickle_and_validate, data)


@fuzz_settings(max_examples=400)
@given(WELL_FORMED)
def test_fuzz_metadata_expressions(data):
    check("metadata/expressions", unpickle_and_validate, data)


def test_opcode_generator_reaches_allowlisted_calls():
    """Control: the generator's grammar can build real objects (a torch.Size, a dataclass)."""
    size = b"\x80\x04" + _str("torch") + _str("Size") + b"\x93" + _int(3) + _int(4) + b"\x86" \
        + b"\x85R."
    assert safe_pickle_load(size, source="x") == torch.Size([3, 4])
    idx = (b"\x80\x04" + _str(GLOBALS[0][0]) + _str(GLOBALS[0][1]) + b"\x93.")
    assert safe_pickle_load(idx, source="x") is _METADATA_TABLE[GLOBALS[0]]


# ---------------------------------------------------------------------------- regressions
def _global(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode()


# Found reviewing the allowlist while writing the opcode generator: frozenset/set/torch.Size
# materialize an allowlisted range, bytearray(n) allocates n zero bytes. Sizes here are what
# the unfixed code survives (~1 s, < 1 GB; tools/mutate.py runs these tests against it);
# an index of 0x7fffffff instead of 0x00800000 takes minutes and ~100 GB.
_BIG = b"J\x00\x00\x80\x00"  # BININT 2**23
AMPLIFIERS = {
    "frozenset_range": b"\x80\x02" + _global("builtins", "frozenset")
    + _global("builtins", "range") + _BIG + b"\x85R\x85R.",
    "set_range": b"\x80\x02" + _global("builtins", "set") + _global("builtins", "range")
    + _BIG + b"\x85R\x85R.",
    "size_range": b"\x80\x02" + _global("torch", "Size") + _global("builtins", "range")
    + _BIG + b"\x85R\x85R.",
    "bytearray_count": b"\x80\x02" + _global("builtins", "bytearray")
    + b"J\x00\x00\x00\x10\x85R.",  # 2**28 bytes
}
# Found by test_fuzz_metadata_bytes (a flipped byte became LONG_BINPUT with a huge index; the
# C unpickler grows its memo array to twice the index: MemoryError, or gigabytes zeroed when
# the allocation succeeds). Index 2**26 here (the C unpickler: 1 GB, ~0.7 s); 2**30 made it
# zero 16 GB. Now a dict entry.
MEMO_BOMB = b"\x80\x02Nr\x00\x00\x00\x04."
# Found reviewing the pure-Python replacement: a tuple DAG (DUP, TUPLE2 repeated) used as a
# dict key, a frozenset element, or inside set(...): hashing it walks 2**depth leaves. Depth 27
# here (plain pickle: ~2 s); depth 64 would never finish.
HASH_BOMBS = {
    "dict_key": b"\x80\x02}N" + b"2\x86" * 27 + b"Ns.",
    "frozenset": b"\x80\x04(N" + b"2\x86" * 27 + b"\x91.",
    "set_call": b"\x80\x02" + _global("builtins", "set") + b"]N" + b"2\x86" * 27 + b"a\x85R.",
}


def test_regression_memo_index_bomb_allocates_nothing():
    t0 = time.perf_counter()
    assert safe_pickle_load(MEMO_BOMB, source=MPATH) is None
    assert time.perf_counter() - t0 < 0.2


def test_regression_hash_bombs_are_refused():
    for name, data in HASH_BOMBS.items():
        t0 = time.perf_counter()
        try:
            safe_pickle_load(data, source=MPATH)
        except InvalidInputError as e:
            assert "expands to over" in str(e), (name, e)
        else:
            raise AssertionError(f"{name} was unpickled")
        assert time.perf_counter() - t0 < 0.5, name


def test_regression_amplifying_allowlisted_calls_are_refused():
    for name, data in AMPLIFIERS.items():
        try:
            safe_pickle_load(data, source=MPATH)
        except InvalidInputError as e:
            assert "not allowed" in str(e), (name, e)
        else:
            raise AssertionError(f"{name} was unpickled")
    assert safe_pickle_load(pickle.dumps(bytearray(b"ab"), protocol=4), source="x") == b"ab"
    assert safe_pickle_load(pickle.dumps(range(3), protocol=4), source="x") == range(3)


def test_storage_info_is_a_dataclass():
    assert dataclasses.is_dataclass(BASE_MD.storage_data[SIDX[0]])
