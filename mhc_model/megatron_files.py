"""Megatron's checkpoint file names and its tracker file, once (DESIGN.md §5).

A run directory holds ``latest_checkpointed_iteration.txt`` (an iteration number or
``release``) beside ``iter_XXXXXXX/`` (or ``release/``). Every reader of a Megatron checkpoint,
the converter's and the model's own, resolves a run directory through ``read_tracker``.
"""

from __future__ import annotations

import re
from pathlib import Path

from mhc_model.errors import InvalidInputError, IOFailure

TRACKER = "latest_checkpointed_iteration.txt"
METADATA = ".metadata"  # torch_dist: pickled DCP Metadata
MARKER = "metadata.json"  # torch_dist: written last; without it Megatron ignores the DCP
COMMON_PT = "common.pt"  # torch_dist < 0.19: the common state as its own file
COMMON_KEY = "common_state/shard_0_1"  # torch_dist >= 0.19: the common state as a DCP item
RNG_KEY = "rng_state/shard_0.0_1.1"
ITER_RE = re.compile(r"iter_([0-9]+)")
MAX_TRACKER_BYTES = 1024  # the tracker is one integer; anything larger is not a tracker


def iter_dir_name(iteration: int | str) -> str:
    return "release" if iteration == "release" else f"iter_{int(iteration):07d}"


def parse_tracker(text: str, *, path: Path | str = TRACKER) -> int | str:
    """Tracker content -> int iteration or ``'release'`` (Megatron's two legal values)."""
    s = text.strip()
    if s == "release":
        return s
    if not re.fullmatch(r"[0-9]{1,12}", s):  # int() would also take '+1', '1_0', '٣'
        raise InvalidInputError(f"tracker must hold an iteration number or 'release', got "
                                f"{s[:40]!r}", path=path)
    return int(s)


def read_tracker(tracker: Path) -> tuple[int | str, str]:
    """(iteration or 'release', the exact text) of a tracker file; a bounded read, so a huge
    or binary file is an error naming the tracker, never a traceback."""
    try:
        with open(tracker, "rb") as f:
            raw = f.read(MAX_TRACKER_BYTES + 1)
    except OSError as e:
        raise IOFailure(f"cannot read: {e.strerror or e}", path=tracker) from None
    if len(raw) > MAX_TRACKER_BYTES:
        raise InvalidInputError(f"tracker larger than {MAX_TRACKER_BYTES} bytes", path=tracker)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidInputError("tracker is not UTF-8 text", path=tracker) from None
    return parse_tracker(text, path=tracker), text


def iteration_of(iter_dir: Path) -> int | str | None:
    """The iteration an ``iter_XXXXXXX`` / ``release`` directory name stands for."""
    m = ITER_RE.fullmatch(iter_dir.name)
    return int(m.group(1)) if m else ("release" if iter_dir.name == "release" else None)


def tracked_dir(run_dir: Path) -> Path | None:
    """The iteration directory a run directory's tracker names, or None when there is no
    readable, valid tracker (format detection; readers report the tracker's error)."""
    tracker = run_dir / TRACKER
    if not tracker.is_file():
        return None
    try:
        return run_dir / iter_dir_name(read_tracker(tracker)[0])
    except (InvalidInputError, IOFailure):
        return None


def candidates(path: Path) -> list[Path]:
    """Where a checkpoint may live: the directory itself and, for a run directory, the
    iteration directory its tracker names (format detection looks in both)."""
    tracked = tracked_dir(path)
    return [path] if tracked is None else [path, tracked]
