"""One sha256 fed in order by one long-lived thread, from a ring of reusable buffers
(``hashcopy.HashingWriter``'s digest; this module knows nothing of files).

Why a thread of its own: sha256 is serial (Merkle-Damgard) and, at ~1.8 GB/s on one core with
SHA-NI, it is the slowest stage of a copy on the 2-core bench box (bench/results/convert_cpu.md),
so it gets a core to itself and nothing else runs on its thread: the reads, the copy and the
NaN/Inf check run on the caller's thread and hand it filled buffers. ``hashlib`` releases the
GIL while it hashes, so both cores work. One thread fed by a queue costs two queue operations
per buffer; a ``Future`` per buffer (the previous design) cost more on the caller's core.

Protocol: ``slot()`` returns a free buffer (blocking until the thread has hashed it), the caller
fills it and ``submit``s how many bytes of it to hash; ``submit_view`` hashes caller-owned bytes
(kept unchanged until ``hexdigest``); ``update_now`` hashes inline after everything queued
(buffers the caller reuses at once). ``hexdigest`` waits for the queue; ``close`` stops the
thread. A failure on the thread (none is expected from ``hashlib``) is raised by the caller's
next ``slot``/``update_now``/``hexdigest``.
"""

from __future__ import annotations

import hashlib
import queue
import threading

_STOP = None


class HashRing:
    def __init__(self, nbuf: int, size: int):
        self._sha = hashlib.sha256()
        self._size, self._nbuf = size, nbuf
        self._bufs: list[bytearray] = []
        self._free: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._work: queue.SimpleQueue = queue.SimpleQueue()
        self._idle = threading.Condition()
        self._queued = self._hashed = 0
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    # -- caller's side --------------------------------------------------------------------------
    def slot(self) -> tuple[int, memoryview]:
        """A free buffer (index, writable view of ``size`` bytes)."""
        if len(self._bufs) < self._nbuf:  # grow lazily: small files never allocate the ring
            self._bufs.append(bytearray(self._size))
            i = len(self._bufs) - 1
        else:
            i = self._free.get()
        self._raise()
        return i, memoryview(self._bufs[i])

    def submit(self, i: int, n: int) -> None:
        """Hash the first ``n`` bytes of buffer ``i``; it is free again afterwards."""
        self._put((memoryview(self._bufs[i])[:n], i))

    def submit_view(self, data: memoryview) -> None:
        """Hash ``data`` (unchanged until ``hexdigest``) after what is queued."""
        self._put((data, None))

    def update_now(self, data: memoryview) -> None:
        """Hash ``data`` before returning (the caller may reuse it), after what is queued."""
        self._wait_idle()
        self._sha.update(data)

    def hexdigest(self) -> str:
        self._wait_idle()
        return self._sha.hexdigest()

    def close(self) -> None:
        if self._thread is not None:
            self._work.put(_STOP)
            self._thread.join()
            self._thread = None

    def _put(self, item: tuple[memoryview, int | None]) -> None:
        self._raise()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="mhc-sha256", daemon=True)
            self._thread.start()
        self._queued += 1
        self._work.put(item)

    def _wait_idle(self) -> None:
        if self._queued != self._hashed:
            with self._idle:
                self._idle.wait_for(lambda: self._hashed == self._queued)
        self._raise()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    # -- the hashing thread ---------------------------------------------------------------------
    def _run(self) -> None:
        while (item := self._work.get()) is not _STOP:
            data, i = item
            if self._error is None:
                try:
                    self._sha.update(data)
                except BaseException as e:  # handed to the caller; keep freeing buffers
                    self._error = e
            if i is not None:
                self._free.put(i)
            with self._idle:
                self._hashed += 1
                if self._hashed == self._queued:
                    self._idle.notify_all()
