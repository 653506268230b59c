"""Strict safetensors header parser and streaming, copy-only writer (DESIGN.md §5).

We do not use the ``safetensors`` package for parsing: its Rust reader reports duplicate keys as a
misleading ``InvalidOffset`` (safetensors#401) and Python's ``json`` silently keeps the last
duplicate (TOB-SFTN-7). Every rule of ``tensor.rs`` (research/reliability.md §1.1) is re-checked
here, and each violation raises ``InvalidInputError`` naming the file and, where one applies, the
tensor key. Parsing touches only the header; tensor bytes are never read unless ``load_tensor`` is
called.

The writer never decodes tensor data: renamed tensors are byte-range copies from the source file,
hashed in the same pass for the manifest (``mhc_convert.hashcopy``: pread -> sha256 in a worker
thread -> write, or ``copy_file_range`` with ``MHC_COPY_MODE=kernel``). It opens its output with
``O_EXCL`` so it can never truncate a file that might be mmapped by a reader (safetensors#762).
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mhc_convert.errors import InvalidInputError, IOFailure
from mhc_convert.hashcopy import CHUNK, output_file  # noqa: F401  (CHUNK: copy granularity)

if TYPE_CHECKING:  # torch is imported where tensors are made, not at import
    import torch

    from mhc_convert.validate import OnePassScan

MAX_HEADER_SIZE = 100_000_000  # safetensors MAX_HEADER_SIZE (tensor.rs L10)
METADATA_KEY = "__metadata__"

# safetensors dtype -> (torch dtype name or None, bits per element). F4/F6 have no torch dtype
# with per-element shapes; they keep their safetensors name and can be copied but not decoded.
ST_DTYPES: dict[str, tuple[str | None, int]] = {
    "BOOL": ("bool", 8),
    "F4": (None, 4),
    "F6_E2M3": (None, 6),
    "F6_E3M2": (None, 6),
    "U8": ("uint8", 8),
    "I8": ("int8", 8),
    "F8_E5M2": ("float8_e5m2", 8),
    "F8_E4M3": ("float8_e4m3fn", 8),
    "F8_E8M0": ("float8_e8m0fnu", 8),
    "F8_E4M3FNUZ": ("float8_e4m3fnuz", 8),
    "F8_E5M2FNUZ": ("float8_e5m2fnuz", 8),
    "I16": ("int16", 16),
    "U16": ("uint16", 16),
    "F16": ("float16", 16),
    "BF16": ("bfloat16", 16),
    "I32": ("int32", 32),
    "U32": ("uint32", 32),
    "F32": ("float32", 32),
    "C64": ("complex64", 64),
    "F64": ("float64", 64),
    "I64": ("int64", 64),
    "U64": ("uint64", 64),
}
# Our dtype name (torch name, or the safetensors name for F4/F6) -> safetensors name.
_NAME_TO_ST = {(t or st): st for st, (t, _) in ST_DTYPES.items()}


def dtype_name(st_dtype: str) -> str:
    """The dtype name we expose for a safetensors dtype (torch name where torch has one)."""
    torch_name, _ = ST_DTYPES[st_dtype]
    return torch_name or st_dtype


def st_dtype_of(name: str) -> str:
    """Safetensors dtype for a torch dtype name ("bfloat16"), "torch.bfloat16", or "BF16"."""
    name = name.removeprefix("torch.")
    if name in ST_DTYPES:
        return name
    if name not in _NAME_TO_ST:
        raise ValueError(f"dtype {name!r} cannot be stored in safetensors")
    return _NAME_TO_ST[name]


def nbytes_for(st_dtype: str, shape: Sequence[int]) -> int | None:
    """Bytes of a tensor, or None when sub-byte elements do not end on a byte boundary."""
    bits = math.prod(shape) * ST_DTYPES[st_dtype][1]
    return bits // 8 if bits % 8 == 0 else None


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a parsed file. ``offset`` is absolute in the file (not buffer-relative)."""

    key: str
    st_dtype: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    length: int


@dataclass(frozen=True)
class Header:
    """A validated header. ``tensors`` is in data-offset order."""

    path: Path
    header_len: int
    data_start: int
    file_size: int
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] | None


def _no_duplicates(path: Path) -> Callable[[list[tuple[str, Any]]], dict[str, Any]]:
    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in pairs:
            if k in out:
                raise InvalidInputError("duplicate key in JSON header", path=path, key=k)
            out[k] = v
        return out

    return hook


def _reject_constant(path: Path) -> Callable[[str], Any]:
    def hook(name: str) -> Any:
        raise InvalidInputError(f"non-standard JSON literal {name} in header", path=path)

    return hook


def loads_strict_json(text: str | bytes, path: Path) -> Any:
    """``json.loads`` that rejects duplicate keys and NaN/Infinity literals (a parser
    differential: other readers disagree on what such a document means)."""
    try:
        return json.loads(
            text,
            object_pairs_hook=_no_duplicates(path),
            parse_constant=_reject_constant(path),
        )
    # ValueError, not just JSONDecodeError: CPython refuses an integer literal of over 4300
    # digits (int_max_str_digits) with a bare ValueError from inside the scanner.
    except (ValueError, RecursionError) as e:
        raise InvalidInputError(f"not valid JSON ({str(e)[:200]})", path=path) from None


def _is_uint(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _parse_tensor(path: Path, key: str, raw: Any, data_start: int) -> tuple[TensorInfo, int, int]:
    if not isinstance(raw, dict):
        raise InvalidInputError("tensor entry is not a JSON object", path=path, key=key)
    if set(raw) != {"dtype", "shape", "data_offsets"}:
        raise InvalidInputError(
            f"tensor entry must have exactly dtype/shape/data_offsets, got {sorted(raw)}",
            path=path, key=key,
        )
    st = raw["dtype"]
    if not isinstance(st, str) or st not in ST_DTYPES:
        raise InvalidInputError(f"unknown dtype {st!r}", path=path, key=key)
    shape = raw["shape"]
    if not isinstance(shape, list) or not all(_is_uint(d) for d in shape):
        raise InvalidInputError(f"shape {shape!r} is not a list of non-negative ints",
                                path=path, key=key)
    offs = raw["data_offsets"]
    if not isinstance(offs, list) or len(offs) != 2 or not all(_is_uint(o) for o in offs):
        raise InvalidInputError(f"data_offsets {offs!r} is not [begin, end] of non-negative ints",
                                path=path, key=key)
    begin, end = offs
    if end < begin:
        raise InvalidInputError(f"data_offsets {offs} end before begin", path=path, key=key)
    need = nbytes_for(st, shape)
    if need is None:
        raise InvalidInputError(f"{st} tensor of shape {shape} does not end on a byte boundary",
                                path=path, key=key)
    if end - begin != need:
        raise InvalidInputError(
            f"data_offsets {offs} span {end - begin} bytes but {st}{shape} needs {need}",
            path=path, key=key,
        )
    info = TensorInfo(key, st, dtype_name(st), tuple(shape), data_start + begin, end - begin)
    return info, begin, end


def read_header(path: str | Path) -> Header:
    """Parse and fully validate a safetensors file's header (reads only the header bytes)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            file_size = os.fstat(f.fileno()).st_size
            if file_size < 8:
                raise InvalidInputError(
                    f"file is {file_size} bytes, shorter than the 8-byte header length "
                    "(zero-byte or truncated shard)", path=path)
            n = int.from_bytes(f.read(8), "little")
            if n == 0:
                raise InvalidInputError("header length is 0", path=path)
            if n > MAX_HEADER_SIZE:
                raise InvalidInputError(f"header length {n} exceeds {MAX_HEADER_SIZE}", path=path)
            if 8 + n > file_size:
                raise InvalidInputError(
                    f"header length {n} runs past the end of the {file_size}-byte file "
                    "(truncated?)", path=path)
            raw = f.read(n)
    except OSError as e:  # unreadable is an I/O failure (exit 5), not a malformed file
        raise IOFailure(f"cannot read: {e.strerror}", path=path) from None
    if len(raw) != n:
        raise InvalidInputError("file shrank while reading the header", path=path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidInputError("header is not UTF-8", path=path) from None
    if not text.startswith("{"):
        raise InvalidInputError("header does not start with '{'", path=path)
    doc = loads_strict_json(text, path)
    if not isinstance(doc, dict):
        raise InvalidInputError("header is not a JSON object", path=path)

    metadata = doc.pop(METADATA_KEY, None)
    if metadata is not None and not (
        isinstance(metadata, dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    ):
        raise InvalidInputError("__metadata__ must map strings to strings", path=path,
                                key=METADATA_KEY)

    data_start = 8 + n
    parsed = [_parse_tensor(path, key, value, data_start) for key, value in doc.items()]
    # Coverage: sorted by offset, each tensor starts where the previous ended (no holes, no
    # overlaps: overlapping ranges let a tiny file claim huge tensors, safetensors #26).
    parsed.sort(key=lambda t: (t[1], t[2]))
    expected = 0
    for info, begin, end in parsed:
        if begin != expected:
            what = "overlaps the previous tensor" if begin < expected else "leaves a gap"
            raise InvalidInputError(f"data_offsets [{begin}, {end}] {what} (expected begin "
                                    f"{expected})", path=path, key=info.key)
        expected = end
    buffer_len = file_size - data_start
    last_key = parsed[-1][0].key if parsed else None
    if expected > buffer_len:
        raise InvalidInputError(f"tensor data ends at buffer offset {expected} but the buffer "
                                f"holds {buffer_len} bytes (truncated?)", path=path, key=last_key)
    if expected < buffer_len:
        raise InvalidInputError(f"{buffer_len - expected} trailing bytes after the last tensor",
                                path=path, key=last_key)
    tensors = {info.key: info for info, _, _ in parsed}
    return Header(path, n, data_start, file_size, tensors, metadata)


def read_range(path: str | Path, offset: int, length: int, *, key: str | None = None) -> bytes:
    """Read exactly ``length`` bytes at ``offset`` with pread (no mmap: SIGBUS on network FS)."""
    buf = bytearray(length)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        done = 0
        while done < length:
            got = os.preadv(f.fileno(), [view[done:]], offset + done)
            if got == 0:
                raise InvalidInputError(f"file ended {length - done} bytes early", path=path,
                                        key=key)
            done += got
    return bytes(buf)


def load_tensor(path: str | Path, info: TensorInfo) -> torch.Tensor:
    """Decode one tensor (checks and parity only; conversion itself never decodes)."""
    if ST_DTYPES[info.st_dtype][0] is None:
        raise InvalidInputError(f"{info.st_dtype} cannot be decoded to a torch tensor",
                                path=path, key=info.key)
    import torch

    dtype = getattr(torch, info.dtype)
    if info.length == 0:
        return torch.empty(info.shape, dtype=dtype)
    data = bytearray(read_range(path, info.offset, info.length, key=info.key))
    return torch.frombuffer(data, dtype=torch.uint8).view(dtype).reshape(info.shape)


def tensor_to_bytes(t: torch.Tensor) -> bytes:
    """Raw little-endian C-order bytes of ``t`` (bf16/fp8 included: reinterpreted, not cast)."""
    if sys.byteorder != "little":  # pragma: no cover - no big-endian hosts in practice
        raise RuntimeError("safetensors output requires a little-endian host")
    import torch

    if t.is_sparse or t.layout != torch.strided:
        raise ValueError("sparse or non-strided tensors cannot be stored in safetensors")
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes()


@dataclass(frozen=True)
class WriteItem:
    """One tensor to write. Exactly one of ``src`` ((file, absolute offset, length): copied
    byte-for-byte) or ``data`` (raw bytes, or a tensor encoded with ``tensor_to_bytes``)."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    src: tuple[Path, int, int] | None = None
    data: bytes | torch.Tensor | None = None

    @classmethod
    def from_tensor(cls, key: str, t: torch.Tensor) -> WriteItem:
        return cls(key, str(t.dtype).removeprefix("torch."), tuple(t.shape), data=t)


def _encode_header(items: Sequence[WriteItem], metadata: dict[str, str] | None) -> bytes:
    doc: dict[str, Any] = {}
    if metadata:
        doc[METADATA_KEY] = dict(metadata)
    pos = 0
    for it in items:
        st = st_dtype_of(it.dtype)
        n = nbytes_for(st, it.shape)
        if n is None:
            raise ValueError(f"{it.key}: {st}{list(it.shape)} does not end on a byte boundary")
        doc[it.key] = {"dtype": st, "shape": list(it.shape), "data_offsets": [pos, pos + n]}
        pos += n
    raw = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # safetensors pads with spaces so the buffer is 8-aligned
    return raw


def is_tensor(x: object) -> bool:
    """isinstance(x, torch.Tensor) without importing torch (a tensor exists only if it is)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _check_item(it: WriteItem, path: Path) -> None:
    if (it.src is None) == (it.data is None):
        raise ValueError(f"{it.key}: exactly one of src/data must be set")
    need = nbytes_for(st_dtype_of(it.dtype), it.shape)
    if is_tensor(it.data):
        if str(it.data.dtype).removeprefix("torch.") != it.dtype.removeprefix("torch."):
            raise ValueError(f"{it.key}: tensor dtype {it.data.dtype} != declared {it.dtype}")
        if tuple(it.data.shape) != tuple(it.shape):
            raise ValueError(f"{it.key}: tensor shape {tuple(it.data.shape)} != {it.shape}")
    have = it.src[2] if it.src is not None else (
        len(it.data) if isinstance(it.data, bytes | bytearray) else need)
    if have != need:
        raise InvalidInputError(f"{have} bytes given but {it.dtype}{list(it.shape)} needs {need}",
                                path=path, key=it.key)


def write_safetensors(
    path: str | Path,
    items: Sequence[WriteItem],
    *,
    metadata: dict[str, str] | None = None,
    progress: Callable[[int], None] | None = None,
    finite: OnePassScan | None = None,
) -> int:
    """Write a new safetensors file (must not exist) and fsync it; returns its size in bytes.

    Items are stably sorted by descending element size so every tensor starts aligned for its
    dtype (the reference writer does the same); within one size the caller's order is kept.
    ``progress`` receives byte counts per chunk of tensor data. ``finite``: the NaN/Inf check
    of the copied tensors, fed as they are copied (``validate.OnePassScan``).
    """
    path = Path(path)
    keys = [it.key for it in items]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise InvalidInputError("key given twice to the writer", path=path, key=dup)
    if METADATA_KEY in keys:
        raise InvalidInputError("reserved tensor name", path=path, key=METADATA_KEY)
    for it in items:
        _check_item(it, path)
    ordered = sorted(items, key=lambda it: -ST_DTYPES[st_dtype_of(it.dtype)][1])
    header = _encode_header(ordered, metadata)
    if len(header) > MAX_HEADER_SIZE:
        raise InvalidInputError(f"header would be {len(header)} bytes (> {MAX_HEADER_SIZE})",
                                path=path)

    src_fds: dict[Path, int] = {}
    try:
        with output_file(path, progress) as out:
            out.write(len(header).to_bytes(8, "little") + header, chunk_phase=False)
            for it in ordered:
                if it.src is not None:
                    src_path, offset, length = it.src
                    src_path = Path(src_path)
                    if src_path not in src_fds:
                        src_fds[src_path] = os.open(src_path, os.O_RDONLY | os.O_CLOEXEC)
                    scans = finite.ranges(src_path, offset, length) if finite else ()
                    out.copy_range(src_fds[src_path], offset, length,
                                   _short(src_path, it.key), scans)
                else:
                    blob = it.data if isinstance(it.data, bytes | bytearray) else \
                        tensor_to_bytes(it.data)
                    out.write(bytes(blob))
        return out.size
    finally:
        for sfd in src_fds.values():
            os.close(sfd)


def _short(src_path: Path, key: str):
    def raise_short(missing: int) -> None:
        raise InvalidInputError(f"source ended {missing} bytes early (modified during "
                                "conversion?)", path=src_path, key=key)
    return raise_short
