"""Megatron ``torch_dist`` (DCP) checkpoints for the engine. The reader/writer in
``mhc_convert.formats`` know nothing about mHC; this adapter rewrites the args flags in the
common state (``megatron_args.flip_args``). A ``dp_reshardable`` optimizer (bucket space,
Megatron's default with the distributed optimizer) is read back in model space
(``formats.dp_optim``) and written ``fully_reshardable``, which Megatron's loader accepts in any
run (it picks the load path from the checkpoint's ``content_metadata``)."""

from __future__ import annotations

from pathlib import Path

from mhc_convert.adapters.base import DEFAULT_READ, ReadOptions
from mhc_convert.adapters.detection import is_torch_dist
from mhc_convert.adapters.megatron_args import flip_args, megatron_config, with_mhc_meta
from mhc_convert.errors import InvalidInputError
from mhc_convert.formats import dp_optim
from mhc_convert.formats import torch_dist as td
from mhc_convert.formats import torch_dist_write as tdw
from mhc_convert.formats.byte_sources import tensor_slices
from mhc_convert.view import CheckpointView, OutItem
from mhc_model.config import HybridConfig
from mhc_model.megatron_args import MHC_META_KEY


class TorchDistAdapter:
    name = "torch_dist"
    fold_refusal = None

    def detects(self, path: Path) -> bool:
        return is_torch_dist(path)

    def read(self, path: Path, *, options: ReadOptions = DEFAULT_READ) -> CheckpointView:
        """A dp_reshardable (bucket-keyed) optimizer is unpacked into model space unless it
        is being dropped."""
        view = td.read_torch_dist(path)
        others = view.meta.get("other_files") or []
        if others:
            raise InvalidInputError(f"unexpected file(s) {sorted(others)} in the checkpoint; "
                                    f"refusing to drop them silently", path=view.path)
        common = view.meta.get("common_state")
        view.meta["megatron_args"] = common.get("args") if isinstance(common, dict) else None
        if view.meta.get("optimizer_sharding") == "dp_reshardable" and not options.drop_optimizer:
            try:
                view = _unpacked_view(view, self.config(view))
            except InvalidInputError as e:  # inspect describes it; a conversion refuses
                if not options.describe:
                    raise
                view.meta["optimizer_sharding"] = (f"dp_reshardable (bucket space): cannot be "
                                                   f"carried: {e.message}")
        return view

    def config(self, view: CheckpointView) -> HybridConfig:
        common = view.meta["common_state"]
        if not isinstance(common, dict) or "args" not in common:
            raise InvalidInputError("common state carries no 'args'", path=view.path,
                                    key=view.meta.get("common_key"))
        return megatron_config(common["args"], view.path, view.entries,
                               common.get(MHC_META_KEY))

    def check(self, view, plan, cfg, target) -> None:
        """An unpacked dp_reshardable optimizer: every fp32 main copy found must be its
        parameter's weight (``dp_optim.verify``); nothing else beyond the read-time refusals."""
        unpacked = view.meta.get("dp_unpacked")
        if unpacked is not None:
            dp_optim.verify(view, unpacked, view.loader)

    def write(self, tmp: Path, view: CheckpointView, items: list[OutItem], target: HybridConfig,
              *, link, progress, assign=None, finite=None):
        if view.meta.get("dp_unpacked") is not None:  # bucket-space slices: new values
            items = [OutItem(it.key, value=view.loader(it.source))
                     if it.source is not None and isinstance(it.source.locator, dp_optim.Slice)
                     else it for it in items]
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


def _unpacked_view(view: CheckpointView, cfg: HybridConfig) -> CheckpointView:
    """The view with the bucket-space optimizer replaced by its model-space entries and the
    common state a fully_reshardable save writes (``dp_optim``)."""
    unpacked = dp_optim.unpack(view, cfg)
    entries = {k: e for k, e in view.entries.items() if not dp_optim.is_dp_key(k)}
    entries.update(unpacked.entries)
    meta = dict(view.meta, dp_unpacked=unpacked,
                common_state=dp_optim.fully_reshardable_common(view.meta["common_state"],
                                                               unpacked),
                optimizer_sharding="dp_reshardable (bucket space: carried in model space, "
                                   "written fully_reshardable)")
    loader = dp_optim.make_loader(view, view.loader)
    base_sources = view.sources

    def sources(entry):
        if isinstance(entry.locator, dp_optim.Slice):
            return iter([(view.path, tensor_slices(loader(entry)))])
        return base_sources(entry)

    def ranges(entry):  # unpacked slices are new values: checked before the write, not in it
        if isinstance(entry.locator, dp_optim.Slice):
            return None
        return view.stored_ranges(entry)

    return CheckpointView(view.format, view.path, entries, meta, loader, sources, view.locate,
                          ranges=ranges)
