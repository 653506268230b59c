"""Raw bytes of stored tensors, streamed in bounded slices without decoding (the content
checks in ``mhc_convert.validate`` read through these). Each reader picks the source its format
stores: a byte range of a file (safetensors), the storage record of a DCP chunk inside its
``torch.save`` zip, or an in-memory (mmapped) tensor. Nothing here knows about mHC."""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mhc_convert.errors import InvalidInputError

if TYPE_CHECKING:  # torch is imported where tensors are made, not at import
    import torch

SLICE = 64 * 1024 * 1024  # bytes streamed at once (a multiple of every element size)


def pread_slices(path: Path, offset: int, length: int, key: str) -> Iterator[torch.Tensor]:
    import torch

    buf = bytearray(min(SLICE, length))
    with open(path, "rb", buffering=0) as f:
        done = 0
        while done < length:
            want = min(SLICE, length - done)
            view = memoryview(buf)[:want]
            got = 0
            while got < want:
                n = os.preadv(f.fileno(), [view[got:]], offset + done + got)
                if n == 0:
                    raise InvalidInputError(f"file ended {length - done - got} bytes early",
                                            path=path, key=key)
                got += n
            yield torch.frombuffer(buf, dtype=torch.uint8, count=want)
            done += want


def tensor_slices(t: torch.Tensor) -> Iterator[torch.Tensor]:
    import torch

    flat = t.detach().reshape(-1)
    per = max(1, SLICE // max(1, t.element_size()))
    for i in range(0, flat.numel(), per):
        part = flat[i:i + per].contiguous()
        yield part.view(torch.uint8) if part.dim() else part.reshape(1).view(torch.uint8)


class _Window(io.RawIOBase):
    """A read-only, seekable window [offset, offset + length) of an open file."""

    def __init__(self, f: Any, offset: int, length: int):
        self.f, self.base, self.length, self.pos = f, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = max(0, pos if whence == 0 else self.pos + pos if whence == 1
                       else self.length + pos)
        return self.pos

    def readinto(self, b: Any) -> int:
        want = max(0, min(len(b), self.length - self.pos))
        got = os.preadv(self.f.fileno(), [memoryview(b)[:want]], self.base + self.pos)
        self.pos += got
        return got


def _plain_member(f: Any, offset: int, length: int, nbytes: int) -> tuple[Any, Any] | None:
    """(zip, member) of the one storage record of a DCP chunk's ``torch.save`` zip at
    [offset, +length) of ``f``; None unless it is the plain one-storage, uncompressed,
    little-endian archive DCP writes."""
    try:
        zf = zipfile.ZipFile(_Window(f, offset, length))
        members = {i.filename.split("/", 1)[-1]: i for i in zf.infolist()}
        data = [i for name, i in members.items() if name.startswith("data/")]
        order = members.get("byteorder")
        if (len(data) != 1 or data[0].compress_type != zipfile.ZIP_STORED
                or data[0].file_size != nbytes
                or (order is not None and zf.read(order).strip() != b"little")):
            return None
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return None
    return zf, data[0]


def dcp_chunk_range(path: Path, offset: int, length: int, nbytes: int) -> int | None:
    """Absolute offset in ``path`` of the ``nbytes`` element bytes of a DCP chunk (its storage
    record, stored uncompressed, so the bytes lie there as they are), or None when the
    container is not the plain one (``_plain_member``). The local file header is read, not the
    central directory's copy: torch.save pads the record through the local extra field."""
    with open(path, "rb", buffering=0) as f:
        got = _plain_member(f, offset, length, nbytes)
        if got is None:
            return None
        head = os.pread(f.fileno(), 30, offset + got[1].header_offset)
    if len(head) != 30 or head[:4] != b"PK\x03\x04" or head[8:10] != b"\0\0":
        return None
    start = got[1].header_offset + 30 + int.from_bytes(head[26:28], "little") \
        + int.from_bytes(head[28:30], "little")
    return offset + start if start + nbytes <= length else None


def dcp_chunk_slices(path: Path, offset: int, length: int, nbytes: int,
                      key: str) -> Iterator[torch.Tensor] | None:
    """Stream the storage record of a DCP tensor chunk (a ``torch.save`` zip stored inside the
    ``.distcp`` at [offset, +length)) without unpickling anything. None when the container is
    not the plain one-storage, uncompressed, little-endian archive DCP writes."""
    f = open(path, "rb", buffering=0)  # noqa: SIM115 - closed by the generator / on failure
    got = _plain_member(f, offset, length, nbytes)
    if got is None:
        f.close()
        return None
    zf, member_info = got

    def gen() -> Iterator[torch.Tensor]:
        import torch

        try:
            with zf.open(member_info) as member:
                buf = bytearray(min(SLICE, nbytes) or 1)
                while n := member.readinto(buf):
                    yield torch.frombuffer(buf, dtype=torch.uint8, count=n)
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise InvalidInputError(f"stored chunk is corrupt ({e})", path=path,
                                    key=key) from None
        finally:
            f.close()

    return gen()
