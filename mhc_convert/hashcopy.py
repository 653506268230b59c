"""Write output files and their sha256 in one pass (the manifest digests come from here, so the
commit never re-reads what was just written).

``output_file(path)`` opens a new file (``O_EXCL``: never truncates a file a reader may have
mmapped, safetensors#762), yields a ``HashingWriter``, fsyncs, closes, and records
``(size, sha256)`` with the active ``AtomicOutput`` (``commit.record``).

Copies (``copy_range``) run in one of three modes, chosen by ``Hooks.copy_mode``
(``MHC_COPY_MODE`` at the CLI entry; bench/results/convert_cpu.md has the measurements):

* ``direct`` (default where the output filesystem takes ``O_DIRECT``, else ``kernel``):
  ``pread`` into an aligned staging buffer, the NaN/Inf bit test on it (``scans``:
  ``validate.RangeScan``), and the full buffer is hashed by the sha256 thread and written with
  ``O_DIRECT`` by a writer thread (``directio``): one read of each source byte, no page-cache
  copy of the output, and the digest and the check are of exactly the bytes written.
* ``kernel``: ``copy_file_range`` (in-kernel), then the same source range is read back into a
  ring buffer (page cache), checked, and hashed by the sha256 thread (``hashring``); the
  digest is of the source bytes as read a second time (any concurrent change of the source
  shows as a manifest mismatch, and the source fingerprint is re-checked at commit).
* ``user`` (the plain reference): ``pread`` a chunk into a ring buffer, hash it on the sha256
  thread while it is checked and ``write``n.

In the page-cache modes writeback starts while the copy runs (``sync_file_range(
SYNC_FILE_RANGE_WRITE)`` every ``WRITEBACK`` bytes, Linux): the final ``fsync`` then waits for
the last few MiB instead of the whole file, so the disk writes overlap the reads and the
hashing as ``cp`` + ``sync`` cannot.
The fsync is unchanged; this only starts the writes earlier.

Hooks (``hooks.Hooks``: ``output_file`` takes them, by default those of the ``AtomicOutput`` that
owns the file): ``phase("file-start")`` / ``phase("file-done")`` per file and ``phase("mid-copy")``
per chunk (every tensor copy reaches it at least once); write faults ``enospc@N`` / ``eacces@N``
/ ``eio@N`` make the write that crosses N bytes (counted over all files written with those
hooks) fail with that errno, as a full disk or revoked permission would.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Protocol

from mhc_convert.commit import _libc, hooks_for, record
from mhc_convert.directio import DirectStream, try_direct
from mhc_convert.hashring import HashRing
from mhc_convert.hooks import NO_HOOKS, Hooks
from mhc_convert.parallel import check_cancelled

# Copy granularity (progress callbacks and crash hooks fire per chunk; direct mode: at most
# this, and never across a staging buffer) and the ring of the page-cache modes. Measured on
# the 2-vCPU bench box: 16 MiB x 3 buffers ran the user-mode hash thread and writes 4-10x
# slower than 2 MiB x 8 (cache thrash and thread hand-offs); see convert_cpu.md.
CHUNK = 2 * 1024 * 1024
_NBUF = 8
_INLINE = 256 * 1024  # smaller pieces are hashed inline (after earlier pieces are done)
_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF}
WRITEBACK = 32 * 1024 * 1024  # start the disk writes of every this many bytes written
_SYNC_FILE_RANGE_WRITE = 2  # linux/fs.h
_sync_file_range = getattr(_libc, "sync_file_range", None)
if _sync_file_range is not None:
    _sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing [offset, +length) of ``fd`` out (no wait, no
    durability: ``output_file``'s fsync still decides). Best effort: errors are the fsync's."""
    if _sync_file_range is not None:
        _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


class Scan(Protocol):
    """A content check fed the bytes of [offset, +length) of the source as they are copied
    (``validate.RangeScan``; this module stays free of torch and numpy)."""

    offset: int
    length: int

    def feed(self, data: memoryview) -> None: ...


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        data = data[os.write(fd, data):]


class HashingWriter:
    """Appends to ``fd`` and keeps the sha256 of everything appended; ``finish()`` returns
    ``(size, hexdigest)``. Data handed to ``write`` must stay unchanged until ``finish``."""

    def __init__(self, fd: int, path: Path, progress: Callable[[int], None] | None = None,
                 hooks: Hooks = NO_HOOKS):
        self.fd, self.path, self.progress, self.hooks = fd, Path(path), progress, hooks
        self.size = 0
        self._ring = HashRing(_NBUF, CHUNK)
        mode = hooks.copy_mode
        self._direct = DirectStream(fd) if mode == "direct" and try_direct(fd) else None
        self._kernel = mode != "user" and hasattr(os, "copy_file_range")
        self._flushed = 0  # bytes handed to _start_writeback

    # -- hashing ------------------------------------------------------------------------------
    def _hash(self, data: memoryview, sync: bool) -> None:
        if sync or len(data) < _INLINE:
            self._ring.update_now(data)  # after the pieces queued before it
        else:
            self._ring.submit_view(data)

    def _out(self, data: memoryview) -> None:
        self.hooks.before_write(len(data), self.path)
        _write_all(self.fd, data)
        self._grew(len(data))

    def _grew(self, n: int) -> None:
        self.size += n
        if self.size - self._flushed >= WRITEBACK:
            _start_writeback(self.fd, self._flushed, self.size - self._flushed)
            self._flushed = self.size

    def _chunk_done(self, n: int) -> None:
        if self.progress is not None:
            self.progress(n)
        self.hooks.phase("mid-copy")
        check_cancelled()  # another file written beside this one failed (parallel.run_jobs)

    # -- writing ------------------------------------------------------------------------------
    def write(self, data, *, chunk_phase: bool = True, sync: bool = False) -> int:
        """Append bytes-like ``data``; with ``chunk_phase`` every CHUNK of it is a progress and
        crash-hook point. ``sync``: hash before returning (for callers that reuse the buffer)."""
        view = memoryview(data).cast("B")
        for i in range(0, max(len(view), 1), CHUNK):
            part = view[i:i + CHUNK]
            if self._direct is not None:  # copied into the staging buffer: hashed there
                self.hooks.before_write(len(part), self.path)
                self._direct.append(part)
                self.size += len(part)
            else:
                self._hash(part, sync)
                self._out(part)
            if chunk_phase:
                self._chunk_done(len(part))
        return len(view)

    def copy_range(self, src_fd: int, offset: int, length: int, on_short: Callable[[int], None],
                   scans: Sequence[Scan] = ()) -> None:
        """Append ``length`` bytes of ``src_fd`` at ``offset``; ``on_short(missing)`` raises
        when the source ends early. ``scans``: the stored ranges of tensors inside the copied
        range, in order (``validate.OnePassScan.ranges``); each is fed exactly its bytes."""
        end, pos = offset + length, offset
        for scan in scans:
            if scan.offset < pos or scan.offset + scan.length > end:
                raise RuntimeError("scanned ranges must be in order and inside the copy")
            self._copy(src_fd, pos, scan.offset - pos, end, on_short, None)
            self._copy(src_fd, scan.offset, scan.length, end, on_short, scan)
            pos = scan.offset + scan.length
        self._copy(src_fd, pos, end - pos, end, on_short, None)

    def _copy(self, src_fd: int, offset: int, length: int, end: int,
              on_short: Callable[[int], None], scan: Scan | None) -> None:
        done = 0
        while done < length:
            want = min(CHUNK, length - done)
            at = offset + done
            if self._direct is not None:
                got = self._copy_direct(src_fd, at, want, scan)
            else:
                got = self._copy_kernel(src_fd, at, want, scan) if self._kernel else None
            if got is None:
                got = self._copy_user(src_fd, at, want, scan)
            if got == 0:
                on_short(end - at)
            done += got
            self._chunk_done(got)

    def _copy_direct(self, src_fd: int, offset: int, want: int, scan: Scan | None) -> int:
        """``pread`` straight into the staging buffer (directio): the one read of these
        bytes; they are checked here and hashed and written from the buffer."""
        room = self._direct.room()
        want = min(want, len(room))
        self.hooks.before_write(want, self.path)
        got = os.preadv(src_fd, [room[:want]], offset)
        if got:
            if scan is not None:
                scan.feed(room[:got])
            self._direct.advance(got)
            self.size += got
        return got

    def _copy_user(self, src_fd: int, offset: int, want: int, scan: Scan | None) -> int:
        i, view = self._ring.slot()
        got = os.preadv(src_fd, [view[:want]], offset)
        if got:
            part = view[:got]
            self._ring.submit(i, got)  # hashed while it is checked and written
            if scan is not None:
                scan.feed(part)
            self._out(part)
        return got

    def _copy_kernel(self, src_fd: int, offset: int, want: int, scan: Scan | None
                     ) -> int | None:
        """``copy_file_range`` the range, then read the same source bytes back into a ring
        buffer (page cache: the copy just read them), check them here and hand them to the
        sha256 thread, which then does nothing but hash (module doc)."""
        self.hooks.before_write(want, self.path)
        try:
            got = os.copy_file_range(src_fd, self.fd, want, offset)
        except OSError as e:
            if e.errno not in _NO_KERNEL_COPY:
                raise
            self._kernel = False
            return None
        if got:
            i, view = self._ring.slot()
            _pread_exactly(src_fd, view[:got], offset, self.path)
            if scan is not None:
                scan.feed(view[:got])
            self._ring.submit(i, got)
            self._grew(got)
        return got

    def finish(self) -> tuple[int, str]:
        if self._direct is not None:
            return self.size, self._direct.finish()
        return self.size, self._ring.hexdigest()

    def close(self) -> None:
        self._ring.close()
        if self._direct is not None:
            self._direct.close()


def _pread_exactly(fd: int, view: memoryview, offset: int, path: Path) -> None:
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            raise OSError(errno.EIO, "source shrank while hashing", str(path))
        done += got


class HashingFile:
    """A minimal binary file object over a ``HashingWriter`` for ``torch.save`` / ``pickle.dump``
    (many small writes): a ``mid-copy`` crash hook fires every ``phase_every`` bytes."""

    def __init__(self, writer: HashingWriter, phase_every: int = 64 * 1024):
        self.writer, self.phase_every, self._since = writer, phase_every, 0

    def write(self, data) -> int:
        n = self.writer.write(data, chunk_phase=False, sync=True)  # torch may reuse ``data``
        self._since += n
        if self._since >= self.phase_every:
            self._since = 0
            self.writer._chunk_done(0)
        return n

    def flush(self) -> None:
        """Nothing to flush: every ``write`` goes straight to the file descriptor (fsync and
        the digest happen when ``output_file`` closes it)."""

    def tell(self) -> int:
        return self.writer.size


@contextlib.contextmanager
def output_file(path: Path | str, progress: Callable[[int], None] | None = None, *,
                hooks: Hooks | None = None) -> Iterator[HashingWriter]:
    """Create ``path`` (must not exist), yield a ``HashingWriter``; on success fsync, close and
    record ``(size, sha256)`` for the manifest. On error the partial file is left for the
    commit protocol's cleanup (it lives in the temp dir). ``hooks``: default, those of the
    output whose temp dir holds ``path`` (``commit.hooks_for``)."""
    path = Path(path)
    hooks = hooks_for(path) if hooks is None else hooks
    hooks.phase("file-start")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
    writer = HashingWriter(fd, path, progress, hooks)
    try:
        yield writer
        size, digest = writer.finish()
        os.fsync(fd)
    finally:
        writer.close()
        os.close(fd)
    record(path, size=size, sha256=digest)
    hooks.phase("file-done")


def write_file(path: Path | str, data: bytes, *, hooks: Hooks | None = None) -> None:
    """A whole small file, durable and recorded (JSON, pickles, blobs)."""
    with output_file(path, hooks=hooks) as w:
        w.write(data, chunk_phase=False)
