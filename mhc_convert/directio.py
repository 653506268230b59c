"""Copy mode ``direct`` (the default where the output filesystem takes ``O_DIRECT``): the output
stream is assembled in aligned staging buffers and each full buffer is written with
``O_DIRECT``, so the device reads it straight from our memory and no page-cache copy of the
output is made (``hashcopy.HashingWriter`` drives it; this module knows only bytes and a fd).

Why (bench/results/convert_cpu.md, the 2-core box, 4.3 GB hot): the page-cache write of a copy
(``copy_file_range`` or ``write``) cost 1.8-2.3 s of kernel CPU, the sha256 2.4 s, the read
that feeds the hash and the NaN/Inf check 0.5 s: more CPU than two cores have in the time
``cp -r`` + ``sync`` takes. With direct writes the copy costs the one ``pread`` into the staging
buffer (which the sha256 and the check read too: one read of each source byte, and the digest
and the check are of exactly the bytes written), the sha256 has a core to itself, and the
writes run at the device's speed beside it.

Each full buffer goes to two consumers: the sha256 thread (one, in order: the digest is
serial) and a writer thread (``WRITERS``, positional ``pwrite`` at the buffer's file offset,
which is a multiple of ``BUF``); it is reused when both are done. ``finish`` waits for them,
writes the last, partial buffer through the page cache (``O_DIRECT`` cleared: its length is not
aligned) and returns the hex digest; the caller fsyncs. A write that the filesystem refuses
with ``EINVAL`` under ``O_DIRECT`` (an alignment it does not take) is retried, and everything
after it written, through the page cache. Errors on the threads (``ENOSPC``, ``EIO``) are
raised by the caller's next call.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import mmap
import os
import queue
import threading

ALIGN = 4096  # O_DIRECT: address, offset and length multiples of the logical block (<= 4 KiB)
BUF = 4 * 1024 * 1024  # staging buffer; a multiple of ALIGN (tests shrink it to 2 x ALIGN)
NBUF = 8  # 32 MiB of staging: the main thread reads ahead while buffers are hashed / written
WRITERS = 2  # a second write in flight hides the per-request latency of a virtual disk
_O_DIRECT = getattr(os, "O_DIRECT", 0)
# Staging buffers outlive their stream, for the next file: a fresh 32 MiB costs ~27 ms of page
# faults on the bench box, per file (a shard of 1 GB is copied in ~0.3 s).
_POOL: list[mmap.mmap] = []
_POOL_LOCK = threading.Lock()
_POOL_MAX = 4 * NBUF  # two files at a time (parallel.py), and slack


def _buffer() -> mmap.mmap:
    with _POOL_LOCK:
        while _POOL:
            buf = _POOL.pop()
            if len(buf) == BUF:  # tests change BUF
                return buf
    return mmap.mmap(-1, BUF)  # anonymous: page-aligned, as O_DIRECT needs


def _set_direct(fd: int, on: bool) -> None:
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags | _O_DIRECT if on else flags & ~_O_DIRECT)


def try_direct(fd: int) -> bool:
    """Turn ``O_DIRECT`` on for ``fd``; False (and ``fd`` unchanged) where the platform or
    the filesystem does not take it (Linux: ``fcntl`` refuses with ``EINVAL``)."""
    if not _O_DIRECT:
        return False
    try:
        _set_direct(fd, True)
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            return False
        raise
    return True


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


class DirectStream:
    """An append-only output stream over ``fd`` (``O_DIRECT`` already on: ``try_direct``)."""

    def __init__(self, fd: int):
        self.fd = fd
        self._bufs: list[mmap.mmap] = []
        self._free: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._hashq: queue.SimpleQueue = queue.SimpleQueue()
        self._writeq: queue.SimpleQueue = queue.SimpleQueue()
        self._users: list[int] = []  # consumers still holding each shipped buffer
        self._cv = threading.Condition()
        self._busy = 0  # shipped buffers not yet released by both consumers
        self._error: BaseException | None = None
        self._cancel = False
        self._direct = True
        self._sha = hashlib.sha256()
        self._threads: list[threading.Thread] = []
        self._cur: int | None = None
        self._fill = 0  # bytes in the current buffer
        self._base = 0  # file offset of the current buffer

    # -- the caller's side ----------------------------------------------------------------------
    def room(self) -> memoryview:
        """The free part of the current buffer (never empty); fill a prefix, then ``advance``."""
        if self._cur is None:
            self._cur = self._take()
        return memoryview(self._bufs[self._cur])[self._fill:]

    def advance(self, n: int) -> None:
        self._fill += n
        if self._fill == BUF:
            self._ship()

    def append(self, data: memoryview) -> None:
        while data:
            room = self.room()
            n = min(len(room), len(data))
            room[:n] = data[:n]
            data = data[n:]
            self.advance(n)

    def finish(self) -> str:
        """Wait for every shipped buffer, write the partial last one; the sha256 hex digest."""
        with self._cv:
            self._cv.wait_for(lambda: self._busy == 0)
        self._raise()
        if self._cur is not None and self._fill:
            tail = memoryview(self._bufs[self._cur])[:self._fill]
            self._buffered()
            _pwrite_all(self.fd, tail, self._base)
            self._sha.update(tail)
            self._cur, self._fill = None, 0  # a second finish writes nothing more
        return self._sha.hexdigest()

    def close(self) -> None:
        """Stop the threads (after an error too: queued work is dropped, not written)."""
        self._cancel = True
        for _ in self._threads:
            self._writeq.put(None)
        if self._threads:
            self._hashq.put(None)
        for t in self._threads:
            t.join()
        self._threads = []
        with _POOL_LOCK:  # nothing reads or writes them any more
            _POOL.extend(self._bufs[:max(0, _POOL_MAX - len(_POOL))])
        self._bufs = []

    def _take(self) -> int:
        self._raise()
        if len(self._bufs) < NBUF:  # grow lazily: a small file stays in its first buffer
            self._bufs.append(_buffer())
            self._users.append(0)
            return len(self._bufs) - 1
        i = self._free.get()
        self._raise()
        return i

    def _ship(self) -> None:
        i, offset = self._cur, self._base
        if not self._threads:
            self._threads = [threading.Thread(target=self._hash_loop, name="mhc-sha256",
                                              daemon=True)]
            self._threads += [threading.Thread(target=self._write_loop, name="mhc-write",
                                               daemon=True) for _ in range(WRITERS)]
            for t in self._threads:
                t.start()
        with self._cv:
            self._users[i] = 2
            self._busy += 1
        self._hashq.put(i)
        self._writeq.put((i, offset))
        self._cur, self._fill, self._base = None, 0, offset + BUF

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def _buffered(self) -> None:
        # O_DIRECT off first, then the flag: a writer that reads the flag False must find the
        # file buffered already, or its write is refused under O_DIRECT and raised
        if self._direct:
            _set_direct(self.fd, False)
            self._direct = False

    # -- the threads ----------------------------------------------------------------------------
    def _release(self, i: int, error: BaseException | None = None) -> None:
        with self._cv:
            if error is not None and self._error is None:
                self._error = error
            self._users[i] -= 1
            if not self._users[i]:
                self._busy -= 1
                self._free.put(i)
                self._cv.notify_all()

    def _hash_loop(self) -> None:
        while (i := self._hashq.get()) is not None:
            if not self._cancel:
                self._sha.update(self._bufs[i])
            self._release(i)

    def _write_loop(self) -> None:
        while (item := self._writeq.get()) is not None:
            i, offset = item
            error = None
            if not self._cancel and self._error is None:
                try:
                    self._write(memoryview(self._bufs[i]), offset)
                except BaseException as e:  # handed to the caller
                    error = e
            self._release(i, error)

    def _write(self, data: memoryview, offset: int) -> None:
        # read before the write: the other writer may turn O_DIRECT off while this write is
        # already refused under it (then this one is retried too, not raised)
        direct = self._direct
        try:
            _pwrite_all(self.fd, data, offset)
        except OSError as e:
            if e.errno != errno.EINVAL or not direct:
                raise
            with self._cv:  # the filesystem took O_DIRECT but not this write: page cache
                self._buffered()
            _pwrite_all(self.fd, data, offset)
