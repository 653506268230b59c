"""The registry of checkpoint format adapters (one contract: ``adapters.base.Adapter``).

Detection asks each format in this order whether a directory is its format (``detection``:
file names only); the first that says yes reads it. An adapter module is imported when its
format is first used, so detecting and reading a native checkpoint imports neither the
Megatron readers nor torch. A new format is one adapter module plus one line here. Inputs
that are not checkpoints of ours are named, not misparsed: a Hugging Face transformers
directory, a directory of native checkpoints (``iter_*/config.json``), a training run's
``--out`` root.
``open_checkpoint`` also resolves ``--iteration N`` in a run directory.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

from mhc_convert.adapters import detection
from mhc_convert.adapters.base import Adapter, ReadOptions
from mhc_convert.errors import InvalidInputError, UsageError
from mhc_convert.inputs import existing
from mhc_convert.view import CheckpointView
from mhc_model.megatron_files import ITER_RE, TRACKER, iter_dir_name, read_tracker


def _native() -> Adapter:
    from mhc_convert.adapters.native import NativeAdapter

    return NativeAdapter()


def _torch_dist() -> Adapter:
    from mhc_convert.adapters.torch_dist import TorchDistAdapter

    return TorchDistAdapter()


def _legacy() -> Adapter:
    from mhc_convert.adapters.legacy import LegacyAdapter

    return LegacyAdapter()


# name -> (does a directory hold this format?, the adapter), in detection order
FORMATS: dict[str, tuple[Callable[[Path], bool], Callable[[], Adapter]]] = {
    "native": (detection.is_native, _native),
    "torch_dist": (detection.is_torch_dist, _torch_dist),
    "torch_legacy": (detection.is_torch_legacy, _legacy),
}
_MAX_CONFIG = 1 << 20


@cache
def adapter_for(name: str) -> Adapter:
    return FORMATS[name][1]()


def __getattr__(name: str) -> Any:
    if name == "ADAPTERS":  # every adapter, imported (all formats' modules)
        return tuple(adapter_for(n) for n in FORMATS)
    raise AttributeError(f"module 'mhc_convert.adapters' has no attribute {name!r}")


def _hf_config(path: Path) -> dict | None:
    """The config.json of a Hugging Face transformers checkpoint (``architectures`` /
    ``model_type``, none of our fields), else None."""
    try:
        if (path / detection.CONFIG_NAME).stat().st_size > _MAX_CONFIG:
            return None
        doc = json.loads((path / detection.CONFIG_NAME).read_text("utf-8"))
    except (OSError, ValueError, RecursionError):  # RecursionError: deeply nested JSON
        return None  # the native reader reports what is wrong with it
    if not isinstance(doc, dict) or "hybrid_layer_pattern" in doc:
        return None
    return doc if ("architectures" in doc or "model_type" in doc) else None


def iterations(path: Path) -> dict[int, Path]:
    """``iter_XXXXXXX`` subdirectories of a run directory, by iteration."""
    out = {}
    try:
        children = list(path.iterdir())
    except OSError:
        return {}
    for c in children:
        m = ITER_RE.fullmatch(c.name)
        if m and c.is_dir():
            out[int(m.group(1))] = c
    return dict(sorted(out.items()))


def _not_a_checkpoint_hint(path: Path) -> str:
    its = iterations(path)
    if its and all((d / detection.CONFIG_NAME).is_file() for d in its.values()):
        last = max(its)
        names = ", ".join(d.name for d in its.values())
        return (f"; it is a directory of native checkpoints ({names}): pass one of them "
                f"(e.g. {its[last]}) or add --iteration {last}")
    subs = [path / n for n in ("torch_dist", "native") if (path / n).is_dir()]
    if subs:  # mhc_model.train's --out root
        return (f"; it holds a training run's checkpoints: pass "
                f"{' or '.join(str(s) for s in subs)} (with --iteration N for native)")
    return ""


def detect(path: Path) -> Adapter:
    """The adapter for the checkpoint at ``path``, or an error saying why there is none."""
    path = existing(path)
    if not path.is_dir():
        raise InvalidInputError("expected a checkpoint directory, got a file", path=path)
    hf = _hf_config(path)
    if hf is not None:
        what = hf.get("model_type") or hf.get("architectures")
        raise InvalidInputError(
            f"this is a Hugging Face transformers checkpoint ({what}), not a Megatron/mhc one; "
            f"mhc-convert reads mhc native directories (mhc_model config.json + safetensors), "
            f"Megatron torch_dist and Megatron legacy .pt checkpoints",
            path=path / detection.CONFIG_NAME,
            key="model_type" if "model_type" in hf else "architectures")
    for name, (detects, _) in FORMATS.items():
        if detects(path):
            return adapter_for(name)
    tracker = path / TRACKER
    if tracker.exists():  # a run directory whose tracker is broken or names nothing usable
        value, _ = read_tracker(tracker)
        raise InvalidInputError(f"tracker names {iter_dir_name(value)} but that directory is "
                                "not a checkpoint", path=tracker)
    raise InvalidInputError("not a recognised checkpoint (no config.json, torch_dist .metadata "
                            "or mp_rank_* directories)" + _not_a_checkpoint_hint(path), path=path)


def open_checkpoint(path: Path, *, iteration: int | None = None,
                    options: ReadOptions | None = None) -> tuple[Adapter, CheckpointView,
                                                                 str | None]:
    """Detect and read ``path``: ``(adapter, view, note)``. In a run directory ``iteration``
    picks ``iter_XXXXXXX`` instead of the one the tracker names (the output is then a run
    directory whose tracker names it). ``note`` says which iteration of a run directory was
    read and which were not."""
    path = existing(path)
    its = iterations(path) if path.is_dir() else {}
    read_from, run_dir = path, None
    if iteration is not None:
        if not its:
            raise UsageError(f"--iteration {iteration}: not a run directory (no iter_XXXXXXX "
                             f"subdirectories); drop --iteration to use it as it is", path=path)
        if iteration not in its:
            raise UsageError(f"--iteration {iteration}: no {iter_dir_name(iteration)} (have "
                             f"{', '.join(str(i) for i in its)})", path=path)
        read_from = its[iteration]
        run_dir = path if (path / TRACKER).is_file() else None
    adapter = detect(read_from)
    view = adapter.read(read_from, options=options or ReadOptions())
    if run_dir is not None and "tracker" in view.meta:
        view.meta.update(run_dir=run_dir, tracker=str(iteration))
    note = None
    chosen = view.meta.get("iteration")
    if its and isinstance(chosen, int):
        others = [str(i) for i in its if i != chosen]
        how = ("chosen with --iteration" if iteration is not None
               else f"the latest, named by {TRACKER}")
        note = (f"run directory: iteration {chosen} ({how})"
                + (f"; also present: {', '.join(others)} (pick one with --iteration N)"
                   if others else ""))
    return adapter, view, note


def detect_format(path: Path) -> str:
    return detect(path).name


__all__ = ["ADAPTERS", "FORMATS", "Adapter", "ReadOptions", "adapter_for", "detect",
           "detect_format", "iterations", "open_checkpoint"]
