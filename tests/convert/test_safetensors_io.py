"""Our strict safetensors parser/writer, checked against the `safetensors` package as an oracle
and against one hand-crafted hostile file per validation rule (research/reliability.md §1.1)."""

from __future__ import annotations

import errno
import json
import os
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from mhc_convert.errors import InvalidInputError
from mhc_convert.formats import safetensors_io as sio

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32,
          torch.int16, torch.int8, torch.uint8, torch.bool, torch.float8_e4m3fn,
          torch.float8_e5m2, torch.complex64]


def _sample(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (max(1, torch.Size(shape).numel()) * 16,), generator=g,
                        dtype=torch.uint8)
    itemsize = torch.empty((), dtype=dtype).element_size()
    t = raw[: torch.Size(shape).numel() * itemsize].view(dtype).reshape(shape)
    return (t != 0) if dtype == torch.bool else t.clone()


def _bits(t: torch.Tensor) -> bytes:
    return sio.tensor_to_bytes(t)


def test_parser_agrees_with_safetensors_package(tmp_path):
    tensors = {f"t{i}.{str(d)[6:]}": _sample(d, (3, 5 - i % 3), i) for i, d in enumerate(DTYPES)}
    tensors["scalar"] = torch.tensor(1.5, dtype=torch.float32)
    tensors["empty"] = torch.empty((0, 4), dtype=torch.bfloat16)
    p = tmp_path / "a.safetensors"
    save_file(tensors, p, metadata={"format": "pt"})
    oracle = load_file(p)
    hdr = sio.read_header(p)
    assert set(hdr.tensors) == set(oracle)
    assert hdr.metadata == {"format": "pt"}
    assert hdr.data_start % 8 == 0
    for key, ref in oracle.items():
        info = hdr.tensors[key]
        assert info.dtype == str(ref.dtype).removeprefix("torch.")
        assert info.shape == tuple(ref.shape)
        got = sio.load_tensor(p, info)
        assert got.dtype == ref.dtype and got.shape == ref.shape
        assert _bits(got) == _bits(ref), key


# ---------------------------------------------------------------------------------- hostile files

def _craft(path, header, data=b"", *, n=None, raw_header=None):
    blob = raw_header if raw_header is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob) if n is None else n) + blob + data)
    return path


def _t(dtype="F32", shape=(2,), offs=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offs)}


BAD = {
    # name: (header, data, extra kwargs, key the error must name, words the message must contain)
    "zero_byte": (None, b"", {"raw_header": b"", "n": None}, None, "shorter than the 8-byte"),
    "header_len_zero": ({}, b"", {"n": 0, "raw_header": b""}, None, "header length is 0"),
    "header_too_large": ({}, b"", {"n": 100_000_001}, None, "exceeds"),
    "header_len_u64_max": ({}, b"", {"n": 2**64 - 1}, None, "exceeds"),
    "header_past_eof": ({"a": _t()}, b"", {"n": 4096}, None, "past the end"),
    "not_utf8": (None, b"", {"raw_header": b"{\"\xff\xfe\": 1}   "}, None, "not UTF-8"),
    "not_json": (None, b"", {"raw_header": b"{not json}"}, None, "not valid JSON"),
    "not_object": (None, b"", {"raw_header": b"[1, 2]  "}, None, "start with '{'"),
    "nan_literal": (None, b"", {"raw_header": b'{"__metadata__": NaN}'}, None, "NaN"),
    "duplicate_key": (None, b"\0" * 16, {"raw_header": (
        b'{"w": {"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
        b' "w": {"dtype":"F32","shape":[2],"data_offsets":[8,16]}}')}, "w", "duplicate key"),
    "metadata_not_str": ({"__metadata__": {"a": 1}}, b"", {}, "__metadata__", "strings"),
    "unknown_dtype": ({"w": _t(dtype="F128")}, b"\0" * 8, {}, "w", "unknown dtype"),
    "negative_dim": ({"w": _t(shape=(-2,))}, b"\0" * 8, {}, "w", "non-negative"),
    "bool_dim": ({"w": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, b"\0" * 4,
                 {}, "w", "non-negative"),
    "size_mismatch": ({"w": _t(shape=(3,))}, b"\0" * 8, {}, "w", "needs 12"),
    "end_before_begin": ({"w": _t(shape=(0,), offs=(8, 0))}, b"", {}, "w", "end before"),
    "offsets_not_pair": ({"w": _t(offs=(0, 8, 16))}, b"\0" * 8, {}, "w", "data_offsets"),
    "extra_field": ({"w": {**_t(), "scale": 2}}, b"\0" * 8, {}, "w", "exactly"),
    "gap": ({"a": _t(), "b": _t(offs=(16, 24))}, b"\0" * 24, {}, "b", "gap"),
    "overlap": ({"a": _t(shape=(4,), offs=(0, 16)), "b": _t(offs=(8, 16))}, b"\0" * 16, {},
                "b", "overlaps"),
    "not_from_zero": ({"a": _t(offs=(8, 16))}, b"\0" * 16, {}, "a", "gap"),
    "truncated": ({"a": _t(), "b": _t(offs=(8, 16))}, b"\0" * 12, {}, "b", "truncated"),
    "trailing_bytes": ({"a": _t()}, b"\0" * 9, {}, "a", "trailing"),
    "sub_byte_misaligned": ({"w": _t(dtype="F4", shape=(3,), offs=(0, 2))}, b"\0\0", {}, "w",
                            "byte boundary"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_each_rule_rejects_with_file_and_key(tmp_path, name):
    header, data, kw, key, words = BAD[name]
    p = tmp_path / f"{name}.safetensors"
    if name == "zero_byte":
        p.write_bytes(b"")
    else:
        _craft(p, header, data, **kw)
    with pytest.raises(InvalidInputError) as ei:
        sio.read_header(p)
    err = ei.value
    assert err.path == str(p)
    assert err.key == key
    assert words in str(err)
    assert "\n" not in str(err) and str(p) in str(err)


def test_reader_accepts_unaligned_and_empty(tmp_path):
    # Older writers used name order; the reader must not require alignment. {} is a valid file.
    p = _craft(tmp_path / "u.safetensors", {"a": _t("U8", (3,), (0, 3)), "b": _t("F32", (1,),
                                                                              (3, 7))},
               b"\1\2\3" + struct.pack("<f", 2.5))
    hdr = sio.read_header(p)
    assert sio.load_tensor(p, hdr.tensors["b"]).item() == 2.5
    assert sio.read_header(_craft(tmp_path / "e.safetensors", {})).tensors == {}


# ---------------------------------------------------------------------------------- writer

def test_writer_new_values_readable_by_safetensors(tmp_path):
    tensors = {f"k{i}": _sample(d, (2, 3), i) for i, d in enumerate(DTYPES)}
    tensors["noncontig"] = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()
    tensors["scalar"] = torch.tensor(7, dtype=torch.int64)
    items = [sio.WriteItem.from_tensor(k, v) for k, v in tensors.items()]
    seen = []
    p = tmp_path / "out.safetensors"
    size = sio.write_safetensors(p, items, metadata={"format": "pt"}, progress=seen.append)
    assert size == p.stat().st_size
    assert sum(seen) == sum(v.numel() * v.element_size() for v in tensors.values())
    back = load_file(p)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and _bits(back[k]) == _bits(v), k
    hdr = sio.read_header(p)  # our own strict reader accepts it, and it is aligned
    assert hdr.data_start % 8 == 0
    for info in hdr.tensors.values():
        itemsize = max(1, sio.ST_DTYPES[info.st_dtype][1] // 8)
        assert (info.offset - hdr.data_start) % itemsize == 0, info.key


@pytest.mark.parametrize("kernel_copy", [True, False])
def test_byte_range_copy_is_bitwise(tmp_path, monkeypatch, kernel_copy):
    src = {f"decoder.layers.{i}.w": _sample(d, (4, 3), i) for i, d in enumerate(DTYPES)}
    sp = tmp_path / "src.safetensors"
    save_file(src, sp)
    if not kernel_copy:  # e.g. cross-device on old kernels: fall back to the readinto loop
        def refuse(*a, **k):
            raise OSError(errno.EXDEV, "Invalid cross-device link")

        monkeypatch.setattr(os, "copy_file_range", refuse)
    hdr = sio.read_header(sp)
    items = [sio.WriteItem(k.replace("layers.", "layers.inner."), t.dtype, t.shape,
                           src=(sp, t.offset, t.length)) for k, t in hdr.tensors.items()]
    items.append(sio.WriteItem.from_tensor("new.bias", torch.zeros(5, dtype=torch.bfloat16)))
    out = tmp_path / "out.safetensors"
    sio.write_safetensors(out, items)
    back = load_file(out)
    assert set(back) == {k.replace("layers.", "layers.inner.") for k in src} | {"new.bias"}
    for k, v in src.items():
        assert _bits(back[k.replace("layers.", "layers.inner.")]) == _bits(v), k
    assert sp.read_bytes()[hdr.data_start:] != b""  # source untouched and still parses
    assert sio.read_header(sp).tensors == hdr.tensors


def test_writer_never_overwrites(tmp_path):
    p = tmp_path / "x.safetensors"
    p.write_bytes(b"keep")
    with pytest.raises(FileExistsError):
        sio.write_safetensors(p, [sio.WriteItem.from_tensor("a", torch.ones(1))])
    assert p.read_bytes() == b"keep"


def test_writer_rejects_bad_items(tmp_path):
    sp = tmp_path / "s.safetensors"
    save_file({"a": torch.ones(4)}, sp)
    t = sio.read_header(sp).tensors["a"]
    with pytest.raises(InvalidInputError, match="needs 12") as ei:  # length vs dtype/shape
        sio.write_safetensors(tmp_path / "o1.safetensors",
                              [sio.WriteItem("a", "float32", (3,), src=(sp, t.offset, 16))])
    assert ei.value.key == "a"
    two = [sio.WriteItem.from_tensor("a", torch.ones(1))] * 2
    with pytest.raises(InvalidInputError, match="twice"):
        sio.write_safetensors(tmp_path / "o2.safetensors", two)


def test_source_shrinking_mid_copy_is_detected(tmp_path):
    sp = tmp_path / "s.safetensors"
    save_file({"a": torch.ones(1024)}, sp)
    t = sio.read_header(sp).tensors["a"]
    os.truncate(sp, t.offset + 100)  # someone truncates the source after we parsed it
    with pytest.raises(InvalidInputError, match="early") as ei:
        sio.write_safetensors(tmp_path / "o.safetensors",
                              [sio.WriteItem("a", "float32", (1024,), src=(sp, t.offset, 4096))])
    assert ei.value.key == "a"


def test_bf16_encoding_matches_reference_writer(tmp_path):
    t = torch.randn(7, 3).to(torch.bfloat16)
    ref = tmp_path / "ref.safetensors"
    save_file({"t": t}, ref)
    info = sio.read_header(ref).tensors["t"]
    assert sio.tensor_to_bytes(t) == sio.read_range(ref, info.offset, info.length)
