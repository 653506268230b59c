"""Megatron formats for the engine: ``torch_dist`` (DCP) and legacy ``torch`` (.pt per rank).

The readers/writers in ``mhc_convert.formats`` know nothing about mHC; this module supplies the
one mHC-aware change to Megatron's metadata: the args flags in the common state."""

from __future__ import annotations

import copy
from pathlib import Path

from mhc_convert.adapters import flip_args, megatron_config, register, with_target_mhc
from mhc_convert.errors import InvalidInputError
from mhc_convert.formats import torch_dist as td
from mhc_convert.view import CheckpointView, OutItem
from mhc_model.config import HybridConfig


def infer_contract(cfg: HybridConfig, keys) -> HybridConfig:
    """Megatron's args do not record the output contract; the learned head's keys do."""
    if cfg.mhc_on and "decoder.hc_head_fn" in keys:
        return with_target_mhc(cfg, mhc_output_contract="learned")
    return cfg


class TorchDistAdapter:
    name = "torch_dist"

    def read(self, path: Path, *, drop_optimizer: bool = False) -> CheckpointView:
        """``drop_optimizer``: the engine leaves every ``optimizer.*`` key out of the plan, so a
        dp_reshardable (bucket-keyed) optimizer is acceptable: it is not carried."""
        view = td.read_torch_dist(path)
        others = view.meta.get("other_files") or []
        if others:
            raise InvalidInputError(f"unexpected file(s) {sorted(others)} in the checkpoint; "
                                    f"refusing to drop them silently", path=view.path)
        if view.meta.get("optimizer_sharding") == "dp_reshardable" and not drop_optimizer:
            raise InvalidInputError(
                "optimizer state is dp_reshardable (bucket-space) and cannot survive a parameter "
                "change; re-save it with --dist-ckpt-optim-fully-reshardable, or pass "
                "--drop-optimizer", path=view.path)
        return view

    def config(self, view: CheckpointView) -> HybridConfig:
        common = view.meta["common_state"]
        if not isinstance(common, dict) or "args" not in common:
            raise InvalidInputError("common state carries no 'args'", path=view.path,
                                    key=view.meta.get("common_key"))
        return infer_contract(megatron_config(common["args"], view.path), view.entries)

    def write(self, tmp: Path, view: CheckpointView, items: list[OutItem], target: HybridConfig,
              *, link, progress, assign=None):
        common = copy.copy(view.meta["common_state"])
        common["args"] = flip_args(common["args"], target)
        common_key = view.meta["common_key"]
        run_dir = view.meta.get("run_dir")
        iteration = view.meta.get("iteration")
        iter_rel = Path(td.iter_dir_name(iteration)) if run_dir is not None else Path(".")
        out_iter = tmp / iter_rel
        out_iter.mkdir(parents=True, exist_ok=True)
        if common_key == td.COMMON_KEY:
            items = [OutItem(it.key, value=td.encode_common_state(common))
                     if it.key == common_key else it for it in items]
        elif assign is None or td.COMMON_PT in assign([(td.COMMON_PT, 0)]):
            td.write_common_pt(out_iter, common)
        td.write_torch_dist(out_iter, view, items, link=link, progress=progress, assign=assign)
        metadata_json = view.meta["metadata_json"]
        tracker = view.meta.get("tracker")

        def marker(staging: Path) -> None:
            (staging / iter_rel).mkdir(parents=True, exist_ok=True)
            td.write_marker(staging / iter_rel, metadata_json)
            if run_dir is not None and tracker is not None:
                td.write_tracker(staging, str(tracker).strip())

        return marker


register(TorchDistAdapter())

# Imported last: legacy_adapter reuses helpers defined above.
from mhc_convert.legacy_adapter import LegacyAdapter  # noqa: E402

register(LegacyAdapter())
