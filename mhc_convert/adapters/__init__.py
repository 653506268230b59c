"""The registry of checkpoint format adapters (one contract: ``adapters.base.Adapter``).

Detection asks each adapter in this order whether a directory is its format; the first that
says yes reads it. A new format is one adapter module plus one line here.
"""

from __future__ import annotations

from pathlib import Path

from mhc_convert.adapters.base import Adapter, ReadOptions
from mhc_convert.adapters.legacy import LegacyAdapter
from mhc_convert.adapters.native import NativeAdapter
from mhc_convert.adapters.torch_dist import TorchDistAdapter
from mhc_convert.errors import InvalidInputError
from mhc_model.megatron_files import TRACKER, iter_dir_name, read_tracker

ADAPTERS: tuple[Adapter, ...] = (NativeAdapter(), TorchDistAdapter(), LegacyAdapter())
_BY_NAME = {a.name: a for a in ADAPTERS}


def detect(path: Path) -> Adapter:
    """The adapter for the checkpoint at ``path``, or an error saying why there is none."""
    if not path.exists():
        raise InvalidInputError("no such file or directory", path=path)
    if not path.is_dir():
        raise InvalidInputError("expected a checkpoint directory", path=path)
    for adapter in ADAPTERS:
        if adapter.detects(path):
            return adapter
    tracker = path / TRACKER
    if tracker.exists():  # a run directory whose tracker is broken or names nothing usable
        value, _ = read_tracker(tracker)
        raise InvalidInputError(f"tracker names {iter_dir_name(value)} but that directory is "
                                "not a checkpoint", path=tracker)
    raise InvalidInputError("not a recognised checkpoint (no config.json, torch_dist .metadata "
                            "or mp_rank_* directories)", path=path)


def detect_format(path: Path) -> str:
    return detect(path).name


def adapter_for(name: str) -> Adapter:
    return _BY_NAME[name]


__all__ = ["ADAPTERS", "Adapter", "ReadOptions", "adapter_for", "detect", "detect_format"]
