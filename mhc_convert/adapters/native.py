"""Native checkpoints (``config.json`` + safetensors shards): the model config is the JSON,
new tensors go to the shard of their layer."""

from __future__ import annotations

from pathlib import Path

from mhc_convert.adapters.base import DEFAULT_READ, ReadOptions
from mhc_convert.adapters.detection import is_native
from mhc_convert.errors import InvalidInputError
from mhc_convert.formats.native import CONFIG_NAME, OPTIMIZER_NAME, read_native, write_native
from mhc_convert.view import CheckpointView
from mhc_model.config import HybridConfig
from mhc_model.toggle import codec as K


class NativeAdapter:
    name = "native"
    fold_refusal = None

    def detects(self, path: Path) -> bool:
        return is_native(path)

    def read(self, path: Path, *, options: ReadOptions = DEFAULT_READ) -> CheckpointView:
        view = read_native(path)
        state = view.meta.get("training_state")  # a trainer's checkpoint knows its iteration
        if isinstance(state, dict) and type(state.get("iteration")) is int:
            view.meta.setdefault("iteration", state["iteration"])
        return view

    def config(self, view: CheckpointView) -> HybridConfig:
        try:
            return HybridConfig.from_dict(view.meta["config_json"])
        except (ValueError, TypeError) as e:
            raise InvalidInputError(f"invalid model config: {e}",
                                    path=view.path / CONFIG_NAME) from e

    def check(self, view, plan, cfg, target) -> None:
        """Nothing format-specific: the plan covers every native key."""

    def write(self, tmp, view, items, target, *, link, progress, assign=None, finite=None):
        src_shard = view.meta["shard_of"]
        shard_of: dict[str, str] = {}
        layer_shard: dict[str, str] = {}
        default = sorted({v for k, v in src_shard.items() if not k.startswith("optimizer.")})[0]
        for it in items:
            if it.source is not None:
                shard_of[it.key] = src_shard[it.source.key]
                m = K.LAYER_RE.match(it.key)
                if m and not it.key.startswith("optimizer."):
                    layer_shard.setdefault(m.group(1), shard_of[it.key])
        for it in items:
            if it.source is None:
                if it.key.startswith("optimizer."):
                    shard_of[it.key] = OPTIMIZER_NAME
                else:
                    m = K.LAYER_RE.match(it.key)
                    shard_of[it.key] = layer_shard.get(m.group(1), default) if m else default
        return write_native(tmp, items, target.to_dict(), shard_of, progress,
                            shard_metadata=view.meta.get("shard_metadata"),
                            training_state=view.meta.get("training_state"), assign=assign,
                            finite=finite)
