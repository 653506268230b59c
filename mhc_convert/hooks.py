"""Test, fault and tuning hooks of the write path, in one frozen object (``Hooks``).

Production code never reads these from the environment: the default everywhere is ``NO_HOOKS``
(every hook a no-op, copy mode ``direct``). The one process entry, ``mhc_convert.cli.main`` (what
``python -m mhc_convert``, the ``mhc-convert`` script and ``torchrun -m mhc_convert`` all run),
builds one with ``Hooks.from_env(os.environ)`` and passes it down explicitly:
``engine.enable/disable(hooks=)`` -> ``check_free_space(hooks=)``, ``AtomicOutput(hooks=)``,
``distributed.session(hooks)`` (the ``DistContext`` carries it to ``write_shared``). The format
writers, which only get a temp dir, use the hooks of the ``AtomicOutput`` (or distributed
collector) that owns the file they write (``commit.hooks_for(path)``).

The variables ``from_env`` understands:

=========================  ==================================================================
``MHC_CRASH_AT=name[:N]``  ``phase(name)`` SIGKILLs the process at its first (N-th) call
``MHC_HOLD_AT=name[:N]``   with ``MHC_HOLD_FILE=path``: ``phase`` creates ``path`` there and
                           waits until it is deleted (deterministic overlap for lock tests)
``MHC_PHASE_LOG=file``     ``phase`` appends ``name:N wall-time`` per call
``MHC_FAULT=a,b,...``      ``enospc``: ``check_free_space`` sees 0 bytes free; ``eacces``:
                           creating the temp dir fails; ``enospc@N`` / ``eacces@N`` /
                           ``eio@N``: the write that crosses N bytes (counted over every file
                           written with these hooks) fails with that errno
``MHC_FAIL_RANK=R``        distributed rank R raises after it has started writing
``MHC_COPY_MODE``          ``direct`` (default), ``kernel`` or ``user`` (``hashcopy``)
``MHC_FILE_WRITERS=N``     native shards written N at a time (default 2; ``parallel``);
                           1 whenever a phase hook (crash, hold, log) is set, so the
                           phases come in one order
``MHC_FINITE_SCAN``        ``one-pass`` (default: NaN/Inf checked in the copy's read) or
                           ``reference`` (``validate.check_finite`` reads the source first)
``MHC_DISTRIBUTED``        ``1``: a rank whatever launched it; ``0``: never distributed
``MHC_DIST_TIMEOUT``       rendezvous timeout, seconds (300)
``MHC_DIST_DEAD_S``        a peer without a heartbeat this long is dead, seconds (120)
=========================  ==================================================================

The object is frozen; the counters that make ``name:N`` and ``kind@N`` work live in a private
per-object state, so each ``Hooks`` built for a run counts from zero.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

FAULT_ERRNO = {"enospc": errno.ENOSPC, "eacces": errno.EACCES, "eio": errno.EIO}
COPY_MODES = ("user", "kernel", "direct")
FINITE_SCANS = ("one-pass", "reference")


class _Counters:
    """Mutable run state of one ``Hooks``: phase call counts and bytes written (fault offsets)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.phases: dict[str, int] = {}
        self.written = 0


@dataclass(frozen=True)
class Hooks:
    crash_at: str | None = None
    hold_at: str | None = None
    hold_file: str | None = None
    phase_log: str | None = None
    faults: frozenset[str] = frozenset()  # whole-operation faults: "enospc", "eacces"
    write_faults: tuple[tuple[str, int], ...] = ()  # (kind, byte offset): "enospc@N" etc.
    fail_rank: int | None = None
    copy_mode: str = "direct"  # bench/results/convert_cpu.md (hashcopy, directio)
    finite_scan: str = "one-pass"
    file_writers: int = 2  # bench/results/convert_cpu.md: both cores hash (parallel.py)
    distributed: bool | None = None  # None: detect torchrun; True/False: MHC_DISTRIBUTED=1/0
    dist_timeout_s: float = 300.0
    dist_dead_s: float = 120.0
    _run: _Counters = field(default_factory=_Counters, compare=False, hash=False, repr=False)

    def __post_init__(self) -> None:
        if self.copy_mode not in COPY_MODES:
            raise ValueError(f"copy_mode must be one of {COPY_MODES}, got {self.copy_mode!r}")
        if self.finite_scan not in FINITE_SCANS:
            raise ValueError(f"finite_scan must be one of {FINITE_SCANS}, got "
                             f"{self.finite_scan!r}")
        for kind, at in self.write_faults:
            if kind not in FAULT_ERRNO or at < 0:
                raise ValueError(f"bad write fault {kind}@{at}")

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Hooks:
        """The hooks the variables in ``env`` ask for (the module doc lists them). Unknown or
        malformed values fall back to the default, as the variables always did."""
        faults, write_faults = set(), []
        for item in env.get("MHC_FAULT", "").split(","):
            kind, at_sign, at = item.strip().partition("@")
            if not at_sign:
                if kind:
                    faults.add(kind)
            elif kind in FAULT_ERRNO and at.isdigit():
                write_faults.append((kind, int(at)))
        rank = env.get("MHC_FAIL_RANK", "").strip()
        mode = env.get("MHC_COPY_MODE", "direct")
        scan = env.get("MHC_FINITE_SCAN", "one-pass")
        flag = env.get("MHC_DISTRIBUTED", "").strip()
        return cls(crash_at=env.get("MHC_CRASH_AT") or None,
                   hold_at=env.get("MHC_HOLD_AT") or None,
                   hold_file=env.get("MHC_HOLD_FILE") or None,
                   phase_log=env.get("MHC_PHASE_LOG") or None,
                   faults=frozenset(faults), write_faults=tuple(write_faults),
                   fail_rank=int(rank) if rank.lstrip("-").isdigit() else None,
                   copy_mode=mode if mode in COPY_MODES else "direct",
                   finite_scan=scan if scan in FINITE_SCANS else "one-pass",
                   file_writers=_int(env.get("MHC_FILE_WRITERS"), 2),
                   distributed={"1": True, "0": False}.get(flag),
                   dist_timeout_s=_float(env.get("MHC_DIST_TIMEOUT"), 300.0),
                   dist_dead_s=_float(env.get("MHC_DIST_DEAD_S"), 120.0))

    # -- crash points --------------------------------------------------------------------------
    @property
    def _phased(self) -> bool:
        return bool(self.crash_at or self.phase_log or (self.hold_at and self.hold_file))

    @property
    def writers(self) -> int:
        """How many output files to write at once: ``file_writers``, but 1 under phase hooks
        (a crash or hold point then falls in one file, in one order, run after run)."""
        return 1 if self._phased else max(1, self.file_writers)

    def phase(self, name: str) -> None:
        """Named crash point (``commit.PHASES``, ``commit.WRITER_PHASES``). With ``crash_at``
        ``name`` (first call) or ``name:N`` (N-th call) the process dies here with SIGKILL (no
        cleanup runs), which is what a power cut or OOM kill looks like to the protocol. Without
        any phase hook set this returns at once."""
        if not self._phased:
            return
        with self._run.lock:
            n = self._run.phases[name] = self._run.phases.get(name, 0) + 1
        here = (name, f"{name}:{n}")
        if self.phase_log:
            with open(self.phase_log, "a") as f:
                f.write(f"{name}:{n} {time.time():.6f}\n")
        if self.hold_at in here and self.hold_file:
            hold = Path(self.hold_file)
            hold.write_text(str(os.getpid()))
            deadline = time.monotonic() + 120
            while hold.exists() and time.monotonic() < deadline:
                time.sleep(0.01)
        if self.crash_at in here:
            sys.stdout.flush()
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    # -- faults --------------------------------------------------------------------------------
    def fault(self, kind: str) -> bool:
        """Whether the whole-operation fault ``kind`` ("enospc", "eacces") is injected."""
        return kind in self.faults

    def before_write(self, nbytes: int, path: Path | str) -> None:
        """Account ``nbytes`` about to be written to ``path``; raise the injected OSError when
        this write crosses a ``kind@N`` offset."""
        if not self.write_faults:
            return
        with self._run.lock:
            total = self._run.written
            for kind, at in self.write_faults:
                if total + nbytes > at:
                    code = FAULT_ERRNO[kind]
                    raise OSError(code, f"{os.strerror(code)} (MHC_FAULT {kind}@{at})", str(path))
            self._run.written = total + nbytes

    def rank_fault(self, rank: int) -> None:
        """Raise the injected failure when ``rank`` is ``fail_rank``."""
        if self.fail_rank is not None and self.fail_rank == rank:
            from mhc_convert.errors import IOFailure

            raise IOFailure(f"injected fault on rank {rank} (MHC_FAIL_RANK)")


def _int(value: str | None, default: int) -> int:
    return int(value) if value is not None and value.strip().isdigit() else default


def _float(value: str | None, default: float) -> float:
    try:
        return float(value) if value is not None else default
    except ValueError:
        return default


NO_HOOKS = Hooks()
