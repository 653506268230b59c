"""Megatron ``torch_dist`` (DCP) checkpoints for the engine. The reader/writer in
``mhc_convert.formats`` know nothing about mHC; this adapter rewrites the args flags in the
common state (``megatron_args.flip_args``)."""

from __future__ import annotations

from pathlib import Path

from mhc_convert.adapters.base import DEFAULT_READ, ReadOptions
from mhc_convert.adapters.detection import is_torch_dist
from mhc_convert.adapters.megatron_args import flip_args, megatron_config, with_mhc_meta
from mhc_convert.errors import InvalidInputError
from mhc_convert.formats import torch_dist as td
from mhc_convert.formats import torch_dist_write as tdw
from mhc_convert.view import CheckpointView, OutItem
from mhc_model.config import HybridConfig
from mhc_model.megatron_args import MHC_META_KEY


class TorchDistAdapter:
    name = "torch_dist"
    fold_refusal = None

    def detects(self, path: Path) -> bool:
        return is_torch_dist(path)

    def read(self, path: Path, *, options: ReadOptions = DEFAULT_READ) -> CheckpointView:
        """A dp_reshardable (bucket-keyed) optimizer is refused unless it is being dropped."""
        view = td.read_torch_dist(path)
        others = view.meta.get("other_files") or []
        if others:
            raise InvalidInputError(f"unexpected file(s) {sorted(others)} in the checkpoint; "
                                    f"refusing to drop them silently", path=view.path)
        if view.meta.get("optimizer_sharding") == "dp_reshardable" and not options.drop_optimizer:
            raise InvalidInputError(
                "optimizer state is dp_reshardable (bucket-space) and cannot survive a parameter "
                "change; re-save it with --dist-ckpt-optim-fully-reshardable, or pass "
                "--drop-optimizer", path=view.path)
        common = view.meta.get("common_state")
        view.meta["megatron_args"] = common.get("args") if isinstance(common, dict) else None
        return view

    def config(self, view: CheckpointView) -> HybridConfig:
        common = view.meta["common_state"]
        if not isinstance(common, dict) or "args" not in common:
            raise InvalidInputError("common state carries no 'args'", path=view.path,
                                    key=view.meta.get("common_key"))
        return megatron_config(common["args"], view.path, view.entries,
                               common.get(MHC_META_KEY))

    def check(self, view, plan, cfg, target) -> None:
        """Nothing beyond the read-time refusals: the plan covers every stored key."""

    def write(self, tmp: Path, view: CheckpointView, items: list[OutItem], target: HybridConfig,
              *, link, progress, assign=None, finite=None):
        common = with_mhc_meta(view.meta["common_state"], target)
        common["args"] = flip_args(common["args"], target)
        common_key = view.meta["common_key"]
        run_dir = view.meta.get("run_dir")
        iteration = view.meta.get("iteration")
        iter_rel = Path(td.iter_dir_name(iteration)) if run_dir is not None else Path(".")
        out_iter = tmp / iter_rel
        out_iter.mkdir(parents=True, exist_ok=True)
        if common_key == td.COMMON_KEY:
            items = [OutItem(it.key, value=tdw.encode_common_state(common))
                     if it.key == common_key else it for it in items]
        elif assign is None or td.COMMON_PT in assign([(td.COMMON_PT, 0)]):
            tdw.write_common_pt(out_iter, common)
        tdw.write_torch_dist(out_iter, view, items, link=link, progress=progress, assign=assign,
                             finite=finite)
        metadata_json = view.meta["metadata_json"]
        tracker = view.meta.get("tracker")

        def marker(staging: Path) -> None:
            (staging / iter_rel).mkdir(parents=True, exist_ok=True)
            tdw.write_marker(staging / iter_rel, metadata_json)
            if run_dir is not None and tracker is not None:
                tdw.write_tracker(staging, str(tracker).strip())

        return marker
