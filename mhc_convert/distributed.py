"""Distributed conversion: ``torchrun --nproc-per-node K -m mhc_convert enable SRC DST``.

Every rank reads the metadata and plans (cheap and deterministic); rank 0 creates the atomic
output's temp dir and announces it; the write units (native shard files, torch_dist data files,
legacy rank files) are split by ``assign`` (largest first onto the least-loaded rank, so every
rank computes the same split); each rank writes its units into the shared temp dir; after a
barrier rank 0 adopts the other ranks' write-time digests and seals and publishes the output
(``commit.AtomicOutput``). The output is the same, file for file, as the single-process run's.

Control messages go through the c10d store of ``torch.distributed``'s ``env://`` rendezvous (the
torchrun agent's store), not through gloo collectives: a wait polls for the peers' arrival, for
a posted failure and for the peers' heartbeats, so a slow rank copying 100 GB is waited for, a
failed rank stops every rank at once, and a rank that died (SIGKILL, lost node) is noticed
within ``Hooks.dist_dead_s`` seconds (``MHC_DIST_DEAD_S``, default 120) instead of hanging;
``Hooks.dist_timeout_s`` (``MHC_DIST_TIMEOUT``, default 300) bounds the rendezvous. A failing
rank posts its one-line error;
every rank raises it (``RemoteError``, the failing rank's exit code), rank 0 removes the temp
dir, and all ranks wait for each other (``close``) so none exits before the cleanup is done.

Activation: the CLI opens a ``session`` when launched by torchrun (the torchrun env variables
are set and the parent process is torchrun) or when ``Hooks.distributed`` is True
(``MHC_DISTRIBUTED=1``: other launchers that set ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/
``MASTER_PORT``); False (``MHC_DISTRIBUTED=0``) turns it off. A ``mhc-convert`` run as a
subprocess of a torchrun-launched trainer inherits those variables but is not distributed.
Library calls of ``engine.enable`` are never distributed. The launcher's variables are read in
one place, ``_launch``; everything else comes in the ``Hooks`` the CLI entry built (hooks.py).

Fault injection: ``Hooks.fail_rank`` (``MHC_FAIL_RANK=R``) makes rank R raise after it has
started writing.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from mhc_convert.errors import (
    ConvertError,
    Interrupted,
    InvalidInputError,
    IOFailure,
    SigTerm,
    Terminated,
)
from mhc_convert.hooks import NO_HOOKS, Hooks

ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
_LAUNCHERS = (b"torchrun", b"torch.distributed.run", b"torch.distributed.launch")
_ACTIVE: DistContext | None = None


class RemoteError(ConvertError):
    """Another rank failed; carries that rank's one-line message and exit code."""

    def __init__(self, rank: int, exit_code: int, message: str):
        self.exit_code = exit_code
        self.rank = rank
        super().__init__(f"rank {rank}: {message}")


@dataclass(frozen=True)
class _Launch:
    rank: int
    restart: str  # TORCHELASTIC_RESTART_COUNT: one store namespace per elastic attempt
    by_torchrun: bool  # our parent process is torchrun (or cannot be told: no /proc)


def _launch() -> _Launch | None:
    """The one place the launcher's environment is read: None unless every variable of ``ENV``
    is set (``torch.distributed``'s ``env://`` rendezvous reads them again itself)."""
    env = os.environ
    if not all(env.get(v) for v in ENV):
        return None
    try:
        argv = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().split(b"\0")
        # whole arguments only: `torchrun`, `.../torchrun`, `-m torch.distributed.run` (a
        # substring test would take `pytest test_checkpoint_torchrun.py` for a launcher)
        by_torchrun = any(a.rsplit(b"/", 1)[-1] in _LAUNCHERS for a in argv[:3])
    except OSError:
        by_torchrun = True  # cannot tell (no /proc): trust the environment
    return _Launch(int(env["RANK"]), env.get("TORCHELASTIC_RESTART_COUNT", "0"), by_torchrun)


def wanted(hooks: Hooks = NO_HOOKS) -> bool:
    """Whether this process is one rank of a distributed conversion (see the module doc)."""
    if hooks.distributed is False:
        return False
    launch = _launch()
    return launch is not None and (hooks.distributed is True or launch.by_torchrun)


def launched_rank(hooks: Hooks = NO_HOOKS) -> int | None:
    """This process's rank when ``wanted()``, else None (for the CLI: print only on rank 0)."""
    launch = _launch()
    return launch.rank if launch is not None and wanted(hooks) else None


def active() -> DistContext | None:
    """The context of the running ``session``, or None (single process)."""
    return _ACTIVE


def _failure_of(exc: BaseException, rank: int) -> dict[str, Any]:
    if isinstance(exc, ConvertError):
        return {"rank": rank, "code": exc.exit_code, "message": exc.one_line()}
    if isinstance(exc, SigTerm):
        return {"rank": rank, "code": Terminated.exit_code, "message": "terminated (SIGTERM)"}
    if isinstance(exc, KeyboardInterrupt):
        return {"rank": rank, "code": Interrupted.exit_code, "message": "interrupted"}
    return {"rank": rank, "code": 1, "message": f"{type(exc).__name__}: {exc}"}


class DistContext:
    """One rank's view of the job. All ranks must call ``agree``/``barrier``/``broadcast_obj``
    in the same order; ``fail`` may be called anywhere."""

    def __init__(self, store: Any, rank: int, world: int, *, dead_after: float = 120.0,
                 join_timeout: float = 300.0, heartbeat: float = 1.0,
                 hooks: Hooks = NO_HOOKS):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside world {world}")
        self.store, self.rank, self.world, self.hooks = store, rank, world, hooks
        self.dead_after, self.join_timeout = dead_after, join_timeout
        self._seq = 0
        self._next_check = 0.0
        self._stop = threading.Event()
        self._hb_store = store.clone() if hasattr(store, "clone") else store
        store.add(f"hb/{rank}", 1)
        self._hb = threading.Thread(target=self._beat, args=(heartbeat,), daemon=True,
                                    name=f"mhc-heartbeat-{rank}")
        self._hb.start()

    @classmethod
    def from_env(cls, hooks: Hooks = NO_HOOKS) -> DistContext:
        """Join the launcher's ``env://`` rendezvous (timeouts from ``hooks``)."""
        import torch.distributed as dist

        timeout = hooks.dist_timeout_s
        try:
            store, rank, world = next(dist.rendezvous("env://", timeout=timedelta(
                seconds=timeout)))
        except (RuntimeError, ValueError, OSError) as e:
            raise IOFailure(f"distributed rendezvous failed: {e}") from e
        launch = _launch()
        attempt = launch.restart if launch is not None else "0"
        store = dist.PrefixStore(f"mhc_convert/{attempt}/", store)
        return cls(store, rank, world, dead_after=hooks.dist_dead_s, join_timeout=timeout,
                   hooks=hooks)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- work division -----------------------------------------------------------------------
    def assign(self, units: Iterable[tuple[str, int]]) -> set[str]:
        """The names of the ``(name, nbytes)`` units this rank writes (``split_units``)."""
        return split_units(units, self.world)[self.rank]

    # -- coordination ------------------------------------------------------------------------
    def agree(self, tag: str, payload: Any = None, *, wait: bool = True) -> list[Any]:
        """Publish a JSON payload and wait for every rank's; returns them by rank. Raises the
        posted failure (or a dead peer's) instead of waiting forever. ``wait=False`` only
        publishes (and returns [])."""
        self._seq += 1
        keys = [f"sync/{self._seq}/{tag}/{r}" for r in range(self.world)]
        self.store.set(keys[self.rank], json.dumps(payload))
        if not wait:
            return []
        self._wait(lambda: self.store.check(keys), f"'{tag}'")
        return [json.loads(self.store.get(k)) for k in keys]

    def barrier(self, tag: str = "barrier") -> None:
        self.agree(tag)

    def broadcast_obj(self, obj: Any, tag: str = "broadcast", src: int = 0) -> Any:
        return self.agree(tag, obj if self.rank == src else None)[src]

    def fail(self, exc: BaseException) -> None:
        """Post this rank's failure (the first one posted wins; a RemoteError is not re-posted).
        """
        if isinstance(exc, RemoteError):
            return
        with contextlib.suppress(Exception):  # the store may be gone; the exit code still tells
            if self.store.add("failures", 1) == 1:
                self.store.set("failure", json.dumps(_failure_of(exc, self.rank)))

    def check(self) -> None:
        """Raise if any rank has posted a failure. Cheap; rate-limited to 5 calls a second."""
        now = time.monotonic()
        if now >= self._next_check:
            self._next_check = now + 0.2
            self._raise_if_failed()

    @contextlib.contextmanager
    def abort_on_error(self) -> Iterator[DistContext]:
        """Post any exception raised inside as this rank's failure, then re-raise it."""
        try:
            yield self
        except BaseException as e:
            self.fail(e)
            raise

    def watch(self, progress: Callable[[int], None] | None) -> Callable[[int], None]:
        """A progress callback for the writers: forwards to ``progress``, notices other ranks'
        failures mid-write, and is where ``Hooks.fail_rank`` injects its fault."""
        def cb(n: int) -> None:
            self.hooks.rank_fault(self.rank)
            self.check()
            if progress is not None:
                progress(n)
        return cb

    def close(self) -> None:
        """Wait until every live rank got here (so the failing rank outlives rank 0's cleanup
        and rank 0, which may host the store, outlives the others' last reads)."""
        # A dead peer (ConvertError from _wait) leaves nothing to wait for; a store that is
        # already gone (RuntimeError/OSError: its host rank exited) means the job is ending.
        # Either way this rank's outcome is decided already, so the exit barrier is best-effort.
        try:
            with contextlib.suppress(ConvertError, RuntimeError, OSError):
                self.store.add("closed", 1)
                self._wait(lambda: self.store.add("closed", 0) >= self.world, "exit",
                           stop_on_failure=False)
        finally:
            self._stop.set()

    # -- internals ---------------------------------------------------------------------------
    def _beat(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self._hb_store.add(f"hb/{self.rank}", 1)
            except Exception:  # noqa: BLE001  (store gone: waiters notice on their own)
                return

    def _raise_if_failed(self) -> None:
        if self.store.add("failures", 0) > 0:
            f = json.loads(self.store.get("failure"))
            raise RemoteError(f["rank"], f["code"], f["message"])

    def _wait(self, done: Callable[[], bool], what: str, *, stop_on_failure: bool = True) -> None:
        seen: dict[int, tuple[int, float]] = {}
        start = time.monotonic()
        delay = 0.002
        while True:
            try:
                if stop_on_failure:
                    self._raise_if_failed()
                if done():
                    return
                beats = {r: self.store.add(f"hb/{r}", 0) for r in range(self.world)
                         if r != self.rank}
            except ConvertError:
                raise
            except Exception as e:  # noqa: BLE001
                raise IOFailure(f"lost contact with the other ranks while waiting for {what}: "
                                f"{e}") from e
            now = time.monotonic()
            for r, count in beats.items():
                if r not in seen or seen[r][0] != count:
                    seen[r] = (count, now)
                limit = self.join_timeout if count == 0 else self.dead_after
                if now - max(seen[r][1], start) > limit:
                    raise IOFailure(f"rank {r} stopped responding (no heartbeat for "
                                    f"{limit:.0f} s) while waiting for {what}")
            time.sleep(delay)
            delay = min(delay * 2, 0.05)


def split_units(units: Iterable[tuple[str, int]], world: int) -> list[set[str]]:
    """Unit names per rank: largest first, each onto the least-loaded rank (ties: lowest rank,
    then name order). Deterministic, so every rank computes the same split."""
    units = list(units)
    names = [n for n, _ in units]
    if len(set(names)) != len(names):
        raise ValueError("duplicate unit names")
    load = [0] * world
    out: list[set[str]] = [set() for _ in range(world)]
    for name, size in sorted(units, key=lambda u: (-u[1], u[0])):
        r = min(range(world), key=lambda i: (load[i], i))
        load[r] += max(int(size), 1)
        out[r].add(name)
    return out


@contextlib.contextmanager
def session(hooks: Hooks = NO_HOOKS) -> Iterator[DistContext | None]:
    """The CLI's scope of one distributed conversion; yields None when not distributed."""
    global _ACTIVE
    if not wanted(hooks):
        yield None
        return
    ctx = DistContext.from_env(hooks)
    _ACTIVE = ctx
    try:
        with ctx.abort_on_error():
            yield ctx
    except BaseException:
        ctx.close()
        # Every rank is done and rank 0 has cleaned up; torchrun SIGTERMs the survivors as soon
        # as one rank exits, which must not cut off their one-line error and exit code.
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise
    else:
        ctx.close()
    finally:
        _ACTIVE = None


def plan_digest(items: Iterable[Any]) -> str:
    """What every rank must agree on before writing: the output keys and where they come from."""
    import hashlib

    h = hashlib.sha256()
    for it in items:
        src = it.source
        h.update(f"{it.key}\0{src.key if src else ''}\0{src.nbytes if src else ''}\n".encode())
    return h.hexdigest()


def write_shared(ctx: DistContext, output: Callable[[], Any],
                 write: Callable[[Path, Callable[..., set[str]], Callable[[int], None]], Any], *,
                 progress: Callable[[int], None] | None, digest: str) -> None:
    """The distributed body of ``engine._write``. ``output()`` (called on rank 0 only) returns
    the ``AtomicOutput``; ``write(tmp, assign, progress)`` writes this rank's units and returns
    the format's marker writer (used on rank 0)."""
    from mhc_convert import commit

    ao = output() if ctx.is_main else None
    with ao if ao is not None else contextlib.nullcontext() as tmp:
        tmp = Path(ctx.broadcast_obj(str(tmp) if ctx.is_main else None, "tmpdir"))
        if not (tmp / commit.TMP_MARKER).is_file():
            raise IOFailure(f"rank {ctx.rank} cannot see the temp dir; the output's parent must "
                            "be on a filesystem every rank shares", path=tmp)
        if len(set(ctx.agree("plan", digest))) != 1:
            raise InvalidInputError("the ranks planned different outputs; every rank must see "
                                    "the same source files")
        # rank 0's writers record into its AtomicOutput; the others' into a collector, whose
        # records rank 0 adopts: the commit then re-reads no data file, as in a single process.
        with (commit.collecting(tmp, ctx.hooks) if ao is None
              else contextlib.nullcontext({})) as mine:
            marker = write(tmp, ctx.assign, ctx.watch(progress))
        ctx.hooks.rank_fault(ctx.rank)  # a rank with no units still honours fail_rank
        theirs = ctx.agree("written", mine)
        if ao is not None:
            for recs in theirs[1:]:
                ao.adopt(recs or {})
            ao.commit(marker)
    # The output is in place: rank 0 has succeeded whatever happens to the others now.
    ctx.agree("committed", wait=not ctx.is_main)
