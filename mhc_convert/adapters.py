"""Per-format glue between the mHC-agnostic readers/writers and the engine: detect the format,
read the model config it carries, and write an output from a list of ``OutItem``s with the
config (or Megatron args) updated for the target layout."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from mhc_convert.errors import InvalidInputError, IOFailure
from mhc_convert.layout import LAYER_RE, args_flag_updates
from mhc_convert.view import CheckpointView, OutItem, ProgressFn
from mhc_model.config import HybridConfig
from mhc_model.megatron_args import MHC_FLAG_SPELLINGS

MarkerWriter = Callable[[Path], None]
# Distributed runs: (unit name, bytes) list -> the names this rank writes (distributed.py).
Assign = Callable[[list[tuple[str, int]]], set[str]]


class Adapter(Protocol):
    name: str

    def read(self, path: Path) -> CheckpointView: ...

    def config(self, view: CheckpointView) -> HybridConfig: ...

    def write(self, tmp: Path, view: CheckpointView, items: list[OutItem], target: HybridConfig,
              *, link: str, progress: ProgressFn | None,
              assign: Assign | None = None) -> MarkerWriter: ...


def detect_format(path: Path) -> str:
    """native: config.json; torch_dist: .metadata (in the dir or the tracked iter dir);
    torch_legacy: mp_rank_* dirs."""
    if not path.exists():
        raise InvalidInputError("no such file or directory", path=path)
    if not path.is_dir():
        raise InvalidInputError("expected a checkpoint directory", path=path)
    if (path / "config.json").exists():
        return "native"
    candidates = [path]
    tracker = path / "latest_checkpointed_iteration.txt"
    tracker_error = None  # reported only if nothing else makes this a checkpoint
    if tracker.exists():
        try:  # bounded read; garbage must be an error naming the tracker, not a traceback
            with open(tracker, "rb") as f:
                text = f.read(1025).decode("utf-8").strip()
        except UnicodeDecodeError:
            text, shown = "", "bytes that are not UTF-8 text"
        except OSError as e:
            raise IOFailure(f"cannot read: {e.strerror or e}", path=tracker) from None
        else:
            shown = repr(text[:40])
        name = ("release" if text == "release" else f"iter_{int(text):07d}"
                if text.isascii() and text.isdigit() and len(text) <= 12 else "")
        if name:
            candidates.append(path / name)
            tracker_error = InvalidInputError(f"tracker names {name} but that directory is "
                                              "not a checkpoint", path=tracker)
        else:
            tracker_error = InvalidInputError(f"tracker must hold an iteration number or "
                                              f"'release', got {shown}", path=tracker)
    for c in candidates:
        if (c / ".metadata").exists() or (c / "metadata.json").exists():
            return "torch_dist"
        if any(c.glob("mp_rank_*")):
            return "torch_legacy"
    if tracker_error is not None:
        raise tracker_error
    raise InvalidInputError("not a recognised checkpoint (no config.json, torch_dist .metadata "
                            "or mp_rank_* directories)", path=path)


# ---- native --------------------------------------------------------------------------------
class NativeAdapter:
    name = "native"

    def read(self, path: Path) -> CheckpointView:
        from mhc_convert.formats.native import read_native

        return read_native(path)

    def config(self, view: CheckpointView) -> HybridConfig:
        try:
            return HybridConfig.from_dict(view.meta["config_json"])
        except (ValueError, TypeError) as e:
            raise InvalidInputError(f"invalid model config: {e}",
                                    path=view.path / "config.json") from e

    def write(self, tmp, view, items, target, *, link, progress, assign=None):
        from mhc_convert.formats.native import OPTIMIZER_NAME, write_native

        src_shard = view.meta["shard_of"]
        shard_of: dict[str, str] = {}
        layer_shard: dict[str, str] = {}
        default = sorted({v for k, v in src_shard.items() if not k.startswith("optimizer.")})[0]
        for it in items:
            if it.source is not None:
                shard_of[it.key] = src_shard[it.source.key]
                m = LAYER_RE.match(it.key)
                if m and not it.key.startswith("optimizer."):
                    layer_shard.setdefault(m.group(1), shard_of[it.key])
        for it in items:
            if it.source is None:
                if it.key.startswith("optimizer."):
                    shard_of[it.key] = OPTIMIZER_NAME
                else:
                    m = LAYER_RE.match(it.key)
                    shard_of[it.key] = layer_shard.get(m.group(1), default) if m else default
        return write_native(tmp, items, target.to_dict(), shard_of, progress,
                            shard_metadata=view.meta.get("shard_metadata"),
                            training_state=view.meta.get("training_state"), assign=assign)


# ---- Megatron args --------------------------------------------------------------------------
def flip_args(args: Any, target: HybridConfig) -> Any:
    """A copy of Megatron's args with the mHC flags set for ``target``, under every spelling
    the args already use (dsv4/dev first when none is present)."""
    import copy

    new = copy.copy(args)
    for field, value in args_flag_updates(target).items():
        names = [n for n in MHC_FLAG_SPELLINGS[field] if hasattr(args, n)]
        if not names and value is None:
            continue  # never invent an unset optional flag (disable(enable(x)) must be x)
        for name in names or [MHC_FLAG_SPELLINGS[field][0]]:
            setattr(new, name, value)
    if target.mhc_on:
        new.mhc_convention = target.mhc.mhc_convention
        new.mhc_output_contract = target.mhc.mhc_output_contract
    else:  # ours, not Megatron's: they describe the mHC-on layout; disable takes them out again
        for name in ("mhc_convention", "mhc_output_contract"):
            if hasattr(new, name):
                delattr(new, name)
    return new


def megatron_config(args: Any, where: Path) -> HybridConfig:
    try:
        return HybridConfig.from_megatron_args(args)
    except (ValueError, TypeError, AttributeError) as e:
        raise InvalidInputError(f"cannot derive the model config from args: {e}", path=where) from e


def with_target_mhc(cfg: HybridConfig, **mhc: Any) -> HybridConfig:
    return dataclasses.replace(cfg, mhc=dataclasses.replace(cfg.mhc, **mhc))


ADAPTERS: dict[str, Adapter] = {"native": NativeAdapter()}


def register(adapter: Adapter) -> None:
    ADAPTERS[adapter.name] = adapter


def adapter_for(fmt: str) -> Adapter:
    if fmt not in ADAPTERS:
        from mhc_convert import megatron_adapters  # noqa: F401  (registers torch_dist/legacy)
    return ADAPTERS[fmt]
