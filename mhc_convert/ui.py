"""What ``mhc-convert`` prints for people: a spinner or byte bar on stderr while a step runs
(only on a terminal; elsewhere each step is an INFO log line, shown with ``-v``), aligned
``label  value`` summaries on stdout, and warnings about stale temporary output beside a
destination. Nothing here imports torch; rich is imported only when a bar is drawn."""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from mhc_convert.manifest import pid_alive

log = logging.getLogger("mhc_convert")


# ------------------------------------------------------------------------------------ text
def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def show(value: Any) -> str:
    """A value for a person: missing is '-', never 'None'."""
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def rows(pairs: Iterable[tuple[str, Any]], *, indent: str = "  ") -> str:
    pairs = [(k, show(v)) for k, v in pairs]
    width = max((len(k) for k, _ in pairs), default=0)
    return "\n".join(f"{indent}{k.ljust(width)}  {v}" for k, v in pairs)


def emit(text: str = "") -> None:
    print(text, flush=True)


# -------------------------------------------------------------------------------- activity
class Activity:
    """A transient spinner line (``step``) and byte bars (``bar``) on stderr while a command
    works; on anything but a terminal, or with ``enabled=False``, the same steps go to the log
    at INFO. Use as a context manager around the work."""

    def __init__(self, enabled: bool = True) -> None:
        self.live = enabled and sys.stderr.isatty()
        self._progress: Any = None
        self._spinner: Any = None
        self._bar: Any = None

    def __enter__(self) -> Activity:
        if self.live:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn

            self._progress = Progress(SpinnerColumn(), TextColumn("{task.description}"),
                                      BarColumn(), _bytes_column(), console=Console(stderr=True),
                                      transient=True)
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def step(self, text: str) -> None:
        """Show ``text`` as what is happening now (replaces the previous step)."""
        log.info(text)
        if self._progress is None:
            return
        self._finish_bar()
        if self._spinner is None:
            self._spinner = self._progress.add_task(text, total=None)
        else:
            self._progress.update(self._spinner, description=text, visible=True)

    def bar(self, total: int, label: str) -> Callable[[int], None]:
        """A byte bar for a step of ``total`` bytes; returns the per-chunk callback."""
        log.info("%s: %s", label, human_bytes(total))
        if self._progress is None:
            return lambda n: None
        self._finish_bar()
        if self._spinner is not None:
            self._progress.update(self._spinner, visible=False)
        task = self._bar = self._progress.add_task(label, total=max(total, 1))
        progress = self._progress
        return lambda n: progress.advance(task, n)

    def _finish_bar(self) -> None:
        if self._bar is not None:
            self._progress.remove_task(self._bar)
            self._bar = None


def _bytes_column() -> Any:
    """'12.0 MiB / 40.0 MiB' for a byte bar, nothing for a spinner (rich's DownloadColumn
    would print '0/? bytes'). Built on first use so that importing this module skips rich."""
    from rich.progress import ProgressColumn
    from rich.text import Text

    class BytesColumn(ProgressColumn):
        def render(self, task: Any) -> Text:
            if task.total is None:
                return Text("")
            return Text(f"{human_bytes(int(task.completed))} / {human_bytes(int(task.total))}",
                        style="progress.download")

    return BytesColumn()


# ------------------------------------------------------------------------- stale temp output
def stale_output(dst: Path) -> list[Path]:
    """Leftovers of a killed run beside ``dst``: the commit protocol's ``.<name>.mhc-tmp-*``,
    ``.mhc-new-*``, ``.mhc-old-*`` directories and ``.<name>.mhc-lock`` file (see
    ``commit.py``) whose writer is gone, and a trainer's ``<name>.tmp``. Read-only: it never
    takes a lock or removes anything (``mhc-convert clean`` does)."""
    parent = dst.parent
    if not parent.is_dir():
        return []
    prefix = f".{dst.name}."
    lock = parent / f"{prefix}mhc-lock"
    if _lock_held(lock):
        return []  # a conversion of this destination is running: nothing of it is stale
    return [p for p in sorted(parent.iterdir()) if _stale(p, dst.name, lock)]


def _stale(p: Path, name: str, lock: Path) -> bool:
    if p == lock or p.name.startswith(f".{name}.mhc-old-"):
        return True
    if p.name.startswith((f".{name}.mhc-tmp-", f".{name}.mhc-new-")):
        return not _writer_alive(p)
    return p.name == f"{name}.tmp" and p.is_dir()


def _writer_alive(d: Path) -> bool:
    try:
        doc = json.loads((d / ".mhc-tmp").read_text())
        pid, host = int(doc["pid"]), str(doc["host"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if host != socket.gethostname():
        return True  # another machine's: cannot tell, do not call it stale
    return pid_alive(pid)


def _lock_held(lock: Path) -> bool:
    """Whether a live process holds the flock (a held lock is never stale). Shared, non-
    blocking, and released at once, so it cannot disturb a conversion."""
    import fcntl

    try:
        fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing releases the shared lock
    return False
