"""Content checks the readers cannot make from headers alone (research/reliability.md §3).

NaN/Inf: safetensors and DCP never look at values (TOB-SFTN-10), and a converter that copies a
diverged run into a "verified" output launders it, so a conversion refuses a source holding NaN
or Inf (``--allow-nonfinite`` turns this off). Two implementations of the one check, which
share the bit tests (``count_nonfinite``) and the refusal message:

* ``OnePassScan`` (the conversion's path, issue 11 item 5): the writers hand it every buffer
  they copy (``hashcopy.HashingWriter.copy_range(scans=)``), so the check runs on the very
  bytes written, in the same read as the copy and the sha256; nothing is read twice. A refusal
  then comes mid-write: the atomic-commit protocol discards the temp dir, so the destination is
  still absent and the source untouched. Files placed by ``--link hardlink|reflink`` are not
  read at all: their bytes are the source's, unchanged, and are reported as such (not checked).
  Tensors whose bytes do not lie plainly in a file (legacy pickles, an unusual DCP container)
  and tensors that are not written (disable's dropped hyper-connection parameters) are checked
  before the write with ``check_finite``.
* ``check_finite`` (the reference, and dry runs / distributed runs / ``MHC_FINITE_SCAN=
  reference``): reads every byte of every floating tensor once, sequentially, before anything
  is written, in slices of at most ``SLICE`` (64 MiB). torch_dist chunks are streamed out of
  their ``torch.save`` zip record without unpickling; a chunk whose container is not the plain
  one DCP writes is decoded whole through the reader (never more than one tensor).

Values are never decoded to a wider dtype: the tests are bit tests (numpy: one thread, the GIL
released, so they overlap the hashing thread instead of fighting it as torch's intra-op pool
did on a 2-core box). ``naming_files`` makes planner errors name the file that holds the
offending key instead of the checkpoint directory.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from mhc_convert.errors import InvalidInputError, VerificationError
from mhc_convert.view import CheckpointView, Entry

# dtype name -> (int view dtype, exponent mask, mantissa mask): IEEE-style formats where
# all-ones exponent means Inf (mantissa 0) or NaN (mantissa != 0).
_IEEE: dict[str, tuple[type, int, int]] = {
    "float16": (np.int16, 0x7C00, 0x03FF),
    "bfloat16": (np.int16, 0x7F80, 0x007F),
    "float32": (np.int32, 0x7F800000, 0x007FFFFF),
    "float64": (np.int64, 0x7FF0000000000000, 0x000FFFFFFFFFFFFF),
    "complex64": (np.int32, 0x7F800000, 0x007FFFFF),  # real and imaginary parts alike
    "complex128": (np.int64, 0x7FF0000000000000, 0x000FFFFFFFFFFFFF),
    "float8_e5m2": (np.uint8, 0x7C, 0x03),
}
# fp8 formats without Inf: (mask, NaN pattern) on the byte. F4/F6 have neither NaN nor Inf.
_NAN_ONLY: dict[str, tuple[int, int]] = {
    "float8_e4m3fn": (0x7F, 0x7F),  # S.1111.111
    "float8_e4m3fnuz": (0xFF, 0x80),  # negative zero encodes NaN
    "float8_e5m2fnuz": (0xFF, 0x80),
    "float8_e8m0fnu": (0xFF, 0xFF),
}


def is_floating(dtype: str | None) -> bool:
    return dtype in _IEEE or dtype in _NAN_ONLY


def _word(dtype: str) -> int:
    """Bytes per bit-test word (complex: per real or imaginary part)."""
    return 1 if dtype in _NAN_ONLY else np.dtype(_IEEE[dtype][0]).itemsize


_LOCAL = threading.local()  # scratch per thread: the kernel copy mode scans in its hash thread


def _scratch(dtype: type, numel: int) -> np.ndarray:
    bufs = _LOCAL.__dict__.setdefault("bufs", {})
    buf = bufs.get(dtype)
    if buf is None or buf.size < numel:
        buf = bufs[dtype] = np.empty(numel, dtype=dtype)
    return buf[:numel]


def count_bits(raw: np.ndarray, dtype: str) -> tuple[int, int]:
    """(NaN count, Inf count) of ``raw``, a 1-D uint8 array holding whole elements of ``dtype``
    (little-endian). Pure bit tests: nothing is cast or upcast."""
    if dtype in _NAN_ONLY:
        mask, pattern = _NAN_ONLY[dtype]
        bits = raw if mask == 0xFF else raw & mask
        return int(np.count_nonzero(bits == pattern)), 0
    int_dtype, exp, mant = _IEEE[dtype]
    bits = raw.view(int_dtype)
    if bits.size == 0:
        return 0, 0
    exp_v = int_dtype(exp)  # every mask is below the sign bit: it fits the signed view
    # Fast path, one streaming pass into a reused buffer: an element is NaN/Inf iff its
    # exponent bits are all set, i.e. iff max(bits & exp) == exp (exp > 0 as a signed value:
    # the sign bit is outside the mask). Count only when something is special.
    scratch = _scratch(int_dtype, bits.size)
    np.bitwise_and(bits, exp_v, out=scratch)
    if scratch.max() != exp_v:
        return 0, 0
    special = scratch == exp_v
    n_special = int(np.count_nonzero(special))
    inf = int(np.count_nonzero(special & ((bits & int_dtype(mant)) == 0)))
    return n_special - inf, inf


def count_nonfinite(raw: torch.Tensor, dtype: str) -> tuple[int, int]:
    """``count_bits`` of a 1-D uint8 tensor (the reference scan's slices)."""
    return count_bits(raw.numpy(), dtype)


def _refusal(entry: Entry, nan: int, inf: int, where: Path | str) -> InvalidInputError:
    numel = math.prod(entry.shape) if entry.shape is not None else "?"
    return InvalidInputError(
        f"{entry.dtype} tensor holds {nan} NaN and {inf} Inf value(s) (of {numel}); "
        f"refusing to carry a diverged checkpoint (pass --allow-nonfinite to convert "
        f"it bit-exactly anyway)", path=where, key=entry.key)


# ------------------------------------------------------------------------------------ public
def check_finite(view: CheckpointView, keys: Iterable[str], *, path: str | Path,
                 on_bytes: Callable[[int], None] | None = None) -> None:
    """Raise ``InvalidInputError`` naming the file and key of the first floating tensor among
    ``keys`` (model and optimizer space) that holds NaN or Inf, with the counts.

    Non-tensor entries and integer/bool tensors are skipped. Each tensor is streamed from the
    source once, in slices of at most ``SLICE`` bytes (see the module docstring for the cost).
    ``path`` names the checkpoint when a stored piece has no file of its own. ``on_bytes``
    is called with the size of each slice scanned (a progress bar)."""
    for key in keys:
        entry = view.entries.get(key)
        if entry is None or entry.kind != "tensor" or not is_floating(entry.dtype):
            continue
        nan = inf = 0
        where: Path | str = path
        for file, slices in view.byte_sources(entry):
            for raw in slices:
                n, i = count_nonfinite(raw, entry.dtype)
                if on_bytes is not None:
                    on_bytes(raw.numel())
                if (n or i) and not (nan or inf):
                    where = file
                nan, inf = nan + n, inf + i
        if nan or inf:
            raise _refusal(entry, nan, inf, where)


# ---------------------------------------------------------------------------- one-pass scan
class _KeyState:
    """Counts of one tensor over all its stored ranges; refuses when the last one is read."""

    def __init__(self, entry: Entry, ranges: int):
        self.entry, self.left, self.nan, self.inf = entry, ranges, 0, 0
        self.where: Path | None = None

    def add(self, nan: int, inf: int, where: Path) -> None:
        if (nan or inf) and not (self.nan or self.inf):
            self.where = where
        self.nan, self.inf = self.nan + nan, self.inf + inf

    def range_done(self) -> None:
        self.left -= 1
        if not self.left and (self.nan or self.inf):
            raise _refusal(self.entry, self.nan, self.inf, self.where)


class RangeScan:
    """One stored range of one tensor (``offset``/``length`` absolute in its source file),
    fed in order with the buffers that copy it (``hashcopy`` calls ``feed``). Buffers need not
    end on element boundaries: a partial element is carried over to the next buffer."""

    def __init__(self, offset: int, length: int, name: Path, key: _KeyState):
        self.offset, self.length, self.name, self._key = offset, length, name, key
        self._dtype, self._word = key.entry.dtype, _word(key.entry.dtype)
        self.fed, self.claimed, self.linked = 0, False, False
        self._tail = b""

    @property
    def key(self) -> str:
        return self._key.entry.key

    def _count(self, data: memoryview | bytes) -> None:
        if data:
            self._key.add(*count_bits(np.frombuffer(data, dtype=np.uint8), self._dtype),
                          self.name)

    def feed(self, data: memoryview) -> None:
        n = len(data)
        if self.fed + n > self.length:
            raise RuntimeError(f"{self.key}: fed past the end of its stored range")
        if self._tail:  # complete the element split by the previous buffer
            need = self._word - len(self._tail)
            self._tail += bytes(data[:need])
            data = data[need:]
            if len(self._tail) == self._word:
                self._count(self._tail)
                self._tail = b""
        cut = len(data) - len(data) % self._word
        self._count(data[:cut])
        self._tail += bytes(data[cut:])
        self.fed += n
        if self.fed == self.length:
            self._key.range_done()


class OnePassScan:
    """The NaN/Inf check of ``keys`` folded into the copy (module doc). Built before the write:
    every floating tensor whose bytes lie plainly in source files (``view.stored_ranges``) gets
    a ``RangeScan`` per range; the rest is listed in ``upfront`` for ``check_finite``. Writers
    claim the ranges inside what they copy (``ranges``) or report a file they link
    (``linked``); ``finish`` (before the commit) insists every range was read to its end or
    linked, so a writer that skipped one cannot pass as checked."""

    def __init__(self, view: CheckpointView, keys: Iterable[str]):
        self._lock = threading.Lock()
        self.upfront: list[str] = []
        by_file: dict[Path, list[RangeScan]] = {}
        for key in keys:
            entry = view.entries[key]
            if entry.kind != "tensor" or not is_floating(entry.dtype):
                continue
            ranges = view.stored_ranges(entry)
            if ranges is None:
                self.upfront.append(key)
                continue
            ranges = [r for r in ranges if r.length]  # an empty tensor holds nothing
            state = _KeyState(entry, len(ranges))
            for r in ranges:
                by_file.setdefault(r.path, []).append(RangeScan(r.offset, r.length, r.name,
                                                                state))
        # Ranges that overlap (a hostile DCP may point two chunks at one record) cannot both be
        # fed by one copy: those tensors are checked up front instead.
        shared: set[str] = set()
        for rs in by_file.values():
            rs.sort(key=lambda r: r.offset)
            reach = None  # the range reaching furthest so far
            for r in rs:
                if reach is not None and r.offset < reach.offset + reach.length:
                    shared |= {reach.key, r.key}
                if reach is None or r.offset + r.length > reach.offset + reach.length:
                    reach = r
        self.upfront += sorted(shared)
        self._by_file = {f: [r for r in rs if r.key not in shared] for f, rs in by_file.items()}

    def ranges(self, path: Path, offset: int, length: int) -> list[RangeScan]:
        """The unclaimed ranges of ``path`` inside [offset, offset + length), in order; they
        are claimed (a tensor copied twice is checked once)."""
        out = []
        with self._lock:  # writers of several files may ask at once (parallel.run_jobs)
            for r in self._by_file.get(Path(path), ()):
                end = r.offset + r.length
                if end <= offset or r.offset >= offset + length or r.claimed:
                    continue
                if r.offset < offset or end > offset + length:
                    raise RuntimeError(f"{r.key}: a copy covers only part of its stored range")
                r.claimed = True
                out.append(r)
        return out

    def exclude(self, keys: Iterable[str]) -> list[str]:
        """Stop expecting ``keys`` in the copy (the writer will not copy them); returns those
        this scan would have checked, for ``check_finite``."""
        drop = set(keys)
        had = sorted({r.key for rs in self._by_file.values() for r in rs if r.key in drop})
        self._by_file = {f: [r for r in rs if r.key not in drop]
                         for f, rs in self._by_file.items()}
        return had

    def linked(self, path: Path) -> None:
        """``path`` was hardlinked/reflinked: its ranges are the source's bytes, unchanged."""
        for r in self._by_file.get(Path(path), ()):
            r.claimed = r.linked = True

    @property
    def linked_bytes(self) -> int:
        return sum(r.length for rs in self._by_file.values() for r in rs if r.linked)

    @property
    def scanned_bytes(self) -> int:
        return sum(r.fed for rs in self._by_file.values() for r in rs)

    def finish(self) -> None:
        for rs in self._by_file.values():
            for r in rs:
                if not r.linked and r.fed != r.length:
                    raise VerificationError(
                        f"the NaN/Inf check read {r.fed} of the {r.length} stored bytes of "
                        f"this tensor while writing; output discarded", path=r.name, key=r.key)


@contextmanager
def naming_files(view: CheckpointView) -> Iterator[None]:
    """Re-raise an ``InvalidInputError`` about a key that names only the checkpoint directory
    so that it names the file holding that key."""
    try:
        yield
    except InvalidInputError as e:
        if e.key is None or e.path not in (None, str(view.path)):
            raise
        file = view.file_of(e.key) if e.key in view.entries else None
        if file is None:
            raise
        raise type(e)(e.message, path=file, key=e.key) from None
