"""The engine's adapter for Megatron legacy ``torch`` checkpoints
(``iter_*/mp_rank_XX[_YYY]/model_optim_rng.pt``, one pickled dict per TP x PP rank).

The view's entries are *global* model keys (what the planner validates), each pointing at its
copies: one per TP rank of the pipeline stage that holds it. Megatron numbers layers per stage
(``decoder.layers.{local}``); the stage offsets are read from the files (stage s owns the
layers after those of stages < s), so the planner sees ``decoder.layers.{global}`` and the
writer maps back. TP-sharded tensors have no single global shape in a legacy file, so for
TP > 1 the planner gets shape None and ``check`` validates every copy against the config
(``legacy_tp``: replicated, the full shape; sharded, slices that concatenate to it), and
loading a tensor merges its slices.

Everything in a rank file that is not ``model`` is carried unchanged (iteration, rng_state,
opt_param_scheduler, checkpoint_version, ...) except ``args`` (mHC flags flipped) and the
index-based ``optimizer``, which is remapped when its parameter order can be derived and is
otherwise refused unless the engine was asked to drop it.
"""

from __future__ import annotations

import errno
from collections import defaultdict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from mhc_convert.adapters.base import DEFAULT_READ, ReadOptions
from mhc_convert.adapters.detection import is_torch_legacy
from mhc_convert.adapters.legacy_tp import check_tp_shapes, merge_tp
from mhc_convert.adapters.megatron_args import flip_args, megatron_config, with_mhc_meta
from mhc_convert.errors import InvalidInputError, IOFailure
from mhc_convert.formats import torch_legacy as tl
from mhc_convert.formats.byte_sources import tensor_slices
from mhc_convert.hashcopy import HashingFile, output_file
from mhc_convert.view import CheckpointView, Entry, OutItem
from mhc_model.config import HybridConfig
from mhc_model.megatron_args import MHC_META_KEY
from mhc_model.model import meta_model
from mhc_model.toggle import codec as L
from mhc_model.toggle.plan import Plan

_ADVICE = "pass --drop-optimizer to discard the optimizer state (resume with --no-load-optim)"


@dataclass(frozen=True)
class Copy:
    """One stored copy of a global key: rank index (into ``meta['ranks']``) and local key."""

    rank: int
    key: str


def _localize(key: str, offset: int) -> str:
    """decoder.layers.{global} -> decoder.layers.{global - offset} (stage-local numbering)."""
    m = L.LAYER_RE.match(key)
    return f"decoder.layers.{int(m.group(1)) - offset}.{m.group(2)}" if m and offset else key


def _globalize(key: str, offset: int) -> str:
    m = L.LAYER_RE.match(key)
    return f"decoder.layers.{int(m.group(1)) + offset}.{m.group(2)}" if m and offset else key


def _load(rank: tl.RankFile) -> dict:
    """mmap keeps a large checkpoint lazy; files in torch's pre-zip format cannot be mapped."""
    try:
        return tl.safe_load_rank(rank.path, mmap=True)
    except InvalidInputError as e:
        if "mmap" not in e.message:
            raise
        return tl.safe_load_rank(rank.path, mmap=False)


@lru_cache(maxsize=16)
def param_order(cfg: HybridConfig) -> tuple[str, ...]:
    """Our model's ``named_parameters`` order (= optimizer index order for one param group)."""
    return tuple(n for n, _ in meta_model(cfg).named_parameters())


class LegacyAdapter:
    name = "torch_legacy"
    fold_refusal = ("folding H_post != 1 into output projections is not supported for legacy "
                    ".pt checkpoints; convert via torch_dist or pass --allow-lossy")

    def detects(self, path: Path) -> bool:
        return is_torch_legacy(path)

    # ---- read --------------------------------------------------------------------------
    def read(self, path: Path, *, options: ReadOptions = DEFAULT_READ) -> CheckpointView:
        iter_dir, run_dir, tracker = tl.resolve_legacy(path)
        # distrib_optim.pt is listed, not refused, here so that inspect works; enable/disable
        # refuse it in ``check`` unless the optimizer is being dropped.
        ranks = tl.list_rank_files(iter_dir, allow_distrib_optim=True)
        payloads = [_load(r) for r in ranks]
        args0 = payloads[0].get("args")
        if (int(getattr(args0, "pipeline_model_parallel_size", 1) or 1) == 1
                and int(getattr(args0, "expert_model_parallel_size", 1) or 1) > 1):
            # mp_rank_TT_EEE: without PP, the second number is the expert rank (Megatron
            # get_checkpoint_name); relabel the same files before checking the grid
            by_path = {r.path: p for r, p in zip(ranks, payloads)}
            ranks = tl.list_rank_files(iter_dir, two_part="ep", allow_distrib_optim=True)
            payloads = [by_path[r.path] for r in ranks]
        for r, p in zip(ranks, payloads):
            where = r.path
            if "args" not in p:
                raise InvalidInputError("rank file has no 'args'", path=where)
            chunks = sorted(k for k in p if k.startswith("model") and k[5:].isdigit())
            if chunks:  # model0, model1, ...: virtual pipeline chunks
                raise InvalidInputError(f"virtual-pipeline checkpoint ({', '.join(chunks)}) is "
                                        f"not supported; re-save without "
                                        f"--virtual-pipeline-model-parallel-size", path=where)
            if not isinstance(p.get("model"), dict):
                raise InvalidInputError("rank file has no 'model' state dict", path=where)
        tl.check_ranks_against_args(ranks, payloads[0]["args"], path=ranks[0].path)
        if any(r.ep for r in ranks):
            raise InvalidInputError("expert-parallel legacy checkpoints (EP > 1) are not "
                                    "supported: expert numbering is rank-local", path=iter_dir)
        its = {repr(p.get("iteration")) for p in payloads}
        if len(its) > 1:
            raise InvalidInputError(f"ranks disagree on 'iteration': {sorted(its)}",
                                    path=iter_dir)
        offsets = _stage_offsets(ranks, payloads, iter_dir)
        entries = _entries(ranks, payloads, offsets, iter_dir)
        dist = any(r.distrib_optim for r in ranks)
        has_opt = dist or any("optimizer" in p for p in payloads)
        kind = ("distributed (distrib_optim.pt, bucket-space)" if dist
                else "index-based torch state per rank" if has_opt else "none")
        meta = {
            "iteration": payloads[0].get("iteration"), "run_dir": run_dir, "tracker": tracker,
            "ranks": ranks, "payloads": payloads, "offsets": offsets,
            "tp_size": max(r.tp for r in ranks) + 1, "pp_size": len(offsets),
            "drop_optimizer": options.drop_optimizer, "optimizer_present": has_opt,
            "optimizer_sharding": f"legacy {kind}", "megatron_args": payloads[0]["args"],
        }

        config: list[HybridConfig] = []  # read on the first merge (the view comes first)

        def loader(entry: Entry) -> Any:
            values = [payloads[c.rank]["model"][c.key] for c in entry.locator]
            if entry.kind != "tensor" or len(values) == 1:
                return values[0]
            if not config:
                config.append(self.config(view))
            return merge_tp(config[0], entry.key, values, path=iter_dir)

        def sources(entry: Entry):
            for c in entry.locator:
                yield ranks[c.rank].path, tensor_slices(payloads[c.rank]["model"][c.key])

        view = CheckpointView("torch_legacy", iter_dir, entries, meta, loader, sources,
                              locate=lambda entry: ranks[entry.locator[0].rank].path
                              if entry.locator else None)
        return view

    # ---- config ------------------------------------------------------------------------
    def config(self, view: CheckpointView) -> HybridConfig:
        ranks, payloads = view.meta["ranks"], view.meta["payloads"]
        cfg = megatron_config(payloads[0]["args"], ranks[0].path)
        for r, p in zip(ranks[1:], payloads[1:]):
            if megatron_config(p["args"], r.path) != cfg:
                raise InvalidInputError(f"args describe a different model than in "
                                        f"{ranks[0].rel}", path=r.path, key="args")
        return megatron_config(payloads[0]["args"], ranks[0].path, view.entries,
                               payloads[0].get(MHC_META_KEY))

    # ---- checks that need the plan (engine calls this before any write) -----------------
    def check(self, view: CheckpointView, plan: Plan, cfg: HybridConfig,
              target: HybridConfig) -> None:
        view.meta["checked"] = (plan, cfg)  # write() remaps with what was validated here
        if view.meta["tp_size"] > 1:
            check_tp_shapes(view, cfg)
        if view.meta["drop_optimizer"]:
            return
        for r in view.meta["ranks"]:
            if r.distrib_optim:
                raise InvalidInputError(
                    "distributed-optimizer state (distrib_optim.pt, bucket space) is not "
                    "carried: Megatron's legacy loader reads it back in the bucket layout of the "
                    "*new* model, so it would have to be re-packed into the mHC buffers, which "
                    "is not implemented; re-save the run with --ckpt-format torch_dist (its "
                    f"dp_reshardable optimizer is carried), or {_ADVICE}",
                    path=view.path / r.distrib_optim)
        # A dry remap with placeholder values validates order, structure and groups now.
        placeholders = {a.dst: torch.zeros(a.shape) for a in plan.adds}
        for ri in range(len(view.meta["ranks"])):
            _remap_rank_optimizer(view, target, ri, placeholders)

    # ---- write -------------------------------------------------------------------------
    def write(self, tmp: Path, view: CheckpointView, items: list[OutItem], target: HybridConfig,
              *, link, progress, assign=None, finite=None):
        """Rewrite every rank file (``link`` does not apply: each file's content changes).
        ``finite`` is never given ranges: pickled tensors have no ``stored_ranges``, so the
        engine checks them before the write."""
        meta = view.meta
        ranks, payloads = meta["ranks"], meta["payloads"]
        iter_rel = Path(view.path.name) if meta["run_dir"] is not None else Path(".")
        if "checked" not in meta and not meta["drop_optimizer"] and meta["optimizer_present"]:
            raise RuntimeError("LegacyAdapter.check() must run before write()")
        per_rank = _place(view, items)
        ref_new = param_order(target)
        new_values = {it.key: it.value for it in items if it.source is None}
        mine = assign([(r.rel, r.path.stat().st_size) for r in ranks]) if assign else None
        for ri, (r, p) in enumerate(zip(ranks, payloads)):
            if mine is not None and r.rel not in mine:
                continue  # another rank of a distributed run writes this file
            stage_off = meta["offsets"][r.pp or 0]
            src_pos = {k: i for i, k in enumerate(p["model"])}
            # carried keys in this rank file's own order (so a round trip restores it)
            carried = sorted(((k, src) for k, src in per_rank[ri] if src is not None),
                             key=lambda ks: src_pos[ks[1]])
            added = [k for k, src in per_rank[ri] if src is None]
            order = _insert_in_reference_order([k for k, _ in carried], added, ref_new,
                                               lambda k: L.canonical_key(target, k))
            order = L.mtp_proj_in_module_order(order)
            values = {k: p["model"][src] for k, src in carried}
            values.update({k: new_values[k] for k in added})
            out = with_mhc_meta(p, target)  # same key order; rng_state, ... the same objects
            out["model"] = {_localize(k, stage_off): values[k] for k in order}
            out["args"] = flip_args(p["args"], target)
            if meta["drop_optimizer"]:
                out.pop("optimizer", None)
            elif "optimizer" in p:
                out["optimizer"] = _remap_rank_optimizer(view, target, ri, new_values)
            dst = tmp / iter_rel / r.rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            _save_rank_hashed(dst, out)
            if progress:
                progress(dst.stat().st_size)
        tracker = meta["tracker"]

        def marker(staging: Path) -> None:
            # Megatron trusts the tracker: it names a complete iteration, so it goes last.
            if meta["run_dir"] is not None and tracker is not None:
                (staging / tl.TRACKER).write_text(tracker)

        return marker


def _save_rank_hashed(path: Path, obj: dict) -> None:
    """``tl.save_rank`` (same bytes: torch.save with the Megatron-globals pickler, fsynced),
    with the file's sha256 computed while torch writes it and recorded for the manifest."""
    try:
        with output_file(path) as w:
            torch.save(obj, HashingFile(w), pickle_module=tl._PickleModule)
    except OSError as e:
        if e.errno == errno.ENOSPC:  # the commit protocol adds need vs free
            raise
        raise IOFailure(f"cannot write: {e.strerror or e}", path=path) from None


def _stage_offsets(ranks, payloads, iter_dir: Path) -> list[int]:
    """Global index of each stage's first layer, from the layers each stage's files hold.
    Every TP rank of a stage must hold the same local layers, numbered 0..k-1."""
    layers: dict[int, set[int]] = {}
    for r, p in zip(ranks, payloads):
        mine = {int(m.group(1)) for k in p["model"] if (m := L.LAYER_RE.match(k))}
        stage = r.pp or 0
        if stage in layers and layers[stage] != mine:
            raise InvalidInputError("TP ranks of one pipeline stage hold different layers",
                                    path=r.path)
        layers[stage] = mine
    offsets, total = [], 0
    for stage in range(max(layers) + 1):
        mine = layers[stage]
        if mine != set(range(len(mine))):
            raise InvalidInputError(f"pipeline stage {stage} holds layers {sorted(mine)}; "
                                    f"expected stage-local numbering 0..k-1", path=iter_dir)
        offsets.append(total)
        total += len(mine)
    return offsets


def _entries(ranks, payloads, offsets, iter_dir: Path) -> dict[str, Entry]:
    copies: dict[str, list[tuple[int, str, Any]]] = defaultdict(list)
    stage_keys: dict[int, set[str]] = {}
    for ri, (r, p) in enumerate(zip(ranks, payloads)):
        stage = r.pp or 0
        keys = set(p["model"])
        if stage_keys.setdefault(stage, keys) != keys:
            diff = sorted(stage_keys[stage] ^ keys)
            raise InvalidInputError("TP ranks of one pipeline stage hold different keys",
                                    path=r.path, key=diff[0])
        for k, v in p["model"].items():
            copies[_globalize(k, offsets[stage])].append((ri, k, v))
    tp_size = max(r.tp for r in ranks) + 1
    entries: dict[str, Entry] = {}
    for key, cs in copies.items():
        ri0 = cs[0][0]
        if {ranks[ri].pp or 0 for ri, _, _ in cs} != {ranks[ri0].pp or 0}:
            raise InvalidInputError("key is held by more than one pipeline stage",
                                    path=iter_dir, key=key)
        locator = tuple(Copy(ri, k) for ri, k, _ in cs)
        values = [v for _, _, v in cs]
        if all(isinstance(v, torch.Tensor) for v in values):
            dtypes = {v.dtype for v in values}
            if len(dtypes) != 1:
                raise InvalidInputError(f"TP ranks store different dtypes "
                                        f"{sorted(map(str, dtypes))}", path=iter_dir, key=key)
            # One global shape exists only without TP; with TP ``check`` validates the slices.
            shape = tuple(values[0].shape) if tp_size == 1 else None
            nbytes = sum(v.numel() * v.element_size() for v in values)
            entries[key] = Entry(key, "tensor", str(values[0].dtype).replace("torch.", ""),
                                 shape, nbytes, locator)  # type: ignore[arg-type]
        elif L.is_extra_state(key):  # TransformerEngine _extra_state: BytesIO, tensor or None
            entries[key] = Entry(key, "object", None, (), 0, locator)
        else:
            bad = next(type(v).__name__ for v in values if not isinstance(v, torch.Tensor))
            raise InvalidInputError(f"model entry is a {bad}, not a tensor",
                                    path=ranks[ri0].path, key=cs[0][1])
    return entries


def _add_ranks(view: CheckpointView, key: str) -> list[int]:
    """Ranks that receive a new tensor: a layer's on every TP rank of the stage owning that
    layer (Megatron replicates mHC params across TP); the learned head on the last stage."""
    offsets, ranks = view.meta["offsets"], view.meta["ranks"]
    m = L.LAYER_RE.match(key)
    if m:
        layer = int(m.group(1))
        stage = max(s for s, off in enumerate(offsets) if off <= layer)
    else:
        stage = len(offsets) - 1
    return [ri for ri, r in enumerate(ranks) if (r.pp or 0) == stage]


def _place(view: CheckpointView, items: list[OutItem]) -> list[list[tuple[str, str | None]]]:
    """Per rank: (global output key, rank-local source key, or None for a new tensor)."""
    out: list[list[tuple[str, str | None]]] = [[] for _ in view.meta["ranks"]]
    for it in items:
        if it.source is not None:
            for c in it.source.locator:
                out[c.rank].append((it.key, c.key))
        else:
            for ri in _add_ranks(view, it.key):
                out[ri].append((it.key, None))
    return out


def _insert_in_reference_order(carried: list[str], added: list[str], ref: tuple[str, ...],
                               ours=lambda k: k) -> list[str]:
    """Carried keys keep the source order (so disable(enable(x)) restores it exactly); each new
    key goes right after the last present key that precedes it in our model's parameter order
    (and after that key's trailing _extra_state), i.e. where Megatron's module would put it.
    ``ours``: a stored key -> our name (the names ``ref`` holds)."""
    pos = {k: i for i, k in enumerate(ref)}
    out = list(carried)
    for a in sorted(added, key=lambda k: pos.get(k, len(pos))):
        mine, idx = pos.get(a, len(pos)), 0
        for j, k in enumerate(out):
            p = pos.get(ours(k))
            if (p is not None and p < mine) or (p is None and idx == j and j > 0):
                idx = j + 1
        out.insert(idx, a)
    return out


def _remap_rank_optimizer(view: CheckpointView, target: HybridConfig, ri: int,
                          new_values: dict[str, Any]) -> Any:
    """Remap rank ``ri``'s index-keyed optimizer. Its index order is derivable when the rank's
    parameters, in file order, are exactly our model's ``named_parameters`` order restricted to
    the rank (true for these layer specs; TE modules that register parameters in another order
    fail the comparison and are refused rather than guessed)."""
    meta = view.meta
    plan, cfg = meta["checked"]
    r, p = meta["ranks"][ri], meta["payloads"][ri]
    if "optimizer" not in p:
        return None
    opt = p["optimizer"]
    inner = opt.get("optimizer", opt) if isinstance(opt, dict) else opt
    groups = inner.get("param_groups") if isinstance(inner, dict) else None
    if isinstance(groups, list) and sum(bool(g.get("params")) for g in groups
                                        if isinstance(g, dict)) > 1:
        # torch numbers params group by group; Megatron splits groups by weight decay, so
        # index i is not the i-th parameter and which param each index is goes unrecorded.
        raise InvalidInputError(f"cannot derive the optimizer's parameter order ({len(groups)} "
                                f"param groups); {_ADVICE}", path=r.path, key="optimizer")
    off = meta["offsets"][r.pp or 0]
    # in our names (Megatron's other spellings, e.g. local-spec norms, made ours): the order
    # is compared with our model's, and the remap itself only needs names to be consistent
    stored = {_globalize(k, off): k for k, v in p["model"].items()
              if isinstance(v, torch.Tensor) and not L.is_extra_state(k)}
    ours = {k: L.canonical_key(cfg, k) for k in stored}
    file_params = list(ours.values())
    ref_old, ref_new = param_order(cfg), param_order(target)
    mine = set(file_params)
    if [k for k in ref_old if k in mine] != file_params:
        unknown = [k for k in file_params if k not in set(ref_old)]
        why = (f"parameter {unknown[0]!r} is not one of the model's" if unknown else
               "its model keys are not in the model's parameter order")
        raise InvalidInputError(f"cannot derive the optimizer's parameter order ({why}); "
                                f"{_ADVICE}", path=r.path, key="optimizer")
    renames = {ours[rn.src]: L.canonical_key(target, rn.dst) for rn in plan.renames
               if rn.src in ours}
    dropped = [d.src for d in plan.drops if d.src in stored]
    adds = [a.dst for a in plan.adds if ri in _add_ranks(view, a.dst)]
    outs = set(renames.values()) | set(adds)
    new_order = [k for k in ref_new if k in outs]
    if len(new_order) != len(outs):
        missing = sorted(outs - set(new_order))
        raise InvalidInputError(f"output parameter is not in the target model's parameter "
                                f"order; {_ADVICE}", path=r.path, key=missing[0])
    values = {k: new_values[k] for k in adds}
    if meta["tp_size"] == 1:  # full tensors: remap checks each carried moment's shape too
        values.update({renames[ours[g]]: p["model"][k] for g, k in stored.items()
                       if ours[g] in renames})
    return tl.remap_index_optimizer(p["optimizer"], file_params, new_order, values,
                                    renames=renames, dropped=dropped, path=r.path)

__all__ = ["Copy", "LegacyAdapter", "param_order"]
