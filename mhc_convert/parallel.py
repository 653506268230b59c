"""Output files written side by side (``formats.native.write_native``'s shards): each file has
its own copy pipeline (``hashcopy``: a reader thread, a sha256 thread, the direct writers), so
with two files at once both cores hash. sha256 is serial within a file, and on the 2-core bench
box one file's hash thread is the slowest stage of the direct copy (bench/results/
convert_cpu.md); a second file is the only way to put the other core to hashing.

``run_jobs`` runs the jobs ``width`` at a time on worker threads. The first failure (in the
order they happen) cancels the rest: every job still running stops at its next copy chunk
(``check_cancelled``, called by ``hashcopy`` per chunk, raises ``Cancelled`` there), and only
when every started job has ended is the failure raised in the calling thread, so nothing is
still writing into the temp dir that the commit protocol's cleanup then removes. Ctrl-C and
SIGTERM (``commit.SigTerm``) arrive in the calling thread and do the same.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

_LOCAL = threading.local()


class Cancelled(Exception):
    """A job stopped because another one (or the calling thread) failed; never surfaces."""


def check_cancelled() -> None:
    """Raise ``Cancelled`` in a job whose batch has failed (a no-op outside ``run_jobs``)."""
    event = getattr(_LOCAL, "cancel", None)
    if event is not None and event.is_set():
        raise Cancelled


def run_jobs(jobs: Sequence[Callable[[], None]], *, width: int) -> None:
    """Run every job, at most ``width`` at once (``width <= 1``: in order, in this thread)."""
    if width <= 1 or len(jobs) <= 1:
        for job in jobs:
            job()
        return
    cancel = threading.Event()

    def run(job: Callable[[], None]) -> None:
        _LOCAL.cancel = cancel
        try:
            check_cancelled()
            job()
        finally:
            _LOCAL.cancel = None

    pool = ThreadPoolExecutor(min(width, len(jobs)), thread_name_prefix="mhc-file")
    futures = [pool.submit(run, job) for job in jobs]
    try:
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        failed = [f for f in futures if f in done and f.exception() is not None]
        if failed:
            cancel.set()
            wait(futures)
            first = min(failed, key=futures.index)  # of those that failed first, in job order
            raise first.exception()
    except BaseException:
        cancel.set()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
