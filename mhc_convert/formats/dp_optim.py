"""Megatron ``dp_reshardable`` optimizer state (bucket space) read back in model space, as
Megatron's ``fully_reshardable`` save writes it, so a toggle can carry Adam's moments.

``dp_reshardable`` (Megatron-LM ``optimizer/distrib_optimizer.py``
``sharded_param_state_dp_reshardable``, dev d48bd6be / dsv4 26b830a6) stores, per gradient
bucket, one tensor per state (``param`` = the fp32 main copy, ``exp_avg``, ``exp_avg_sq``) of
the bucket's unpadded length, and beside them ShardedObjects ``...dp_group_idx_G.optimizer``
(``state_dict()``: param groups, step), ``per_bucket_numel`` and ``per_bucket_numel_unpadded``.
``fully_reshardable`` (``sharded_param_state_fully_reshardable``) stores
``optimizer.state.<state>.<model key>`` with the model tensor's shape (factory splits such as
Mamba's ``in_proj.weight.z`` included) and keeps ``state_dict()`` in the common state.

Each parameter's range comes from ``dp_layout`` (Megatron's layout rules, our code) over the
parameter order, which is the order Megatron's ``sharded_state_dict`` traversal wrote the model
keys into ``.metadata`` (a module's own parameters, then its children: ``module.parameters()``
order). Three checks guard it: the bucket keys and their lengths, Megatron's own
``per_bucket_numel[_unpadded]``, and (``verify``) every parameter's fp32 main copy against the
stored model weight, bitwise (bf16 models: the main copy rounded to bf16).
"""

from __future__ import annotations

import copy
import math
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

from mhc_convert.errors import InvalidInputError
from mhc_convert.formats import dp_layout as L
from mhc_convert.view import CheckpointView, Entry
from mhc_model.safe_unpickle import safe_torch_load
from mhc_model.toggle import codec as K

BUCKET_RE = re.compile(
    r"^(?:chained_(\d+)\.)?optimizer\.distributed\.dp_group_idx_(\d+)\.gbuf_idx_(\d+)"
    r"\.dtype_(\(torch\.\w+, torch\.\w+\))\.bucket_idx_(\d+)\.([A-Za-z0-9_]+)$")
OBJECT_RE = re.compile(
    r"^(?:chained_(\d+)\.)?optimizer\.distributed\.dp_group_idx_(\d+)\.([A-Za-z0-9_]+)"
    r"/shard_0_1$")
# Stored model tensors that are buffers, not parameters (not in any gradient buffer):
# TopKRouter registers expert_bias with register_buffer (transformer/moe/router.py).
NON_PARAMETERS = (re.compile(r"\.mlp\.router\.expert_bias$"),)
_CACHE = 3  # decoded bucket tensors kept (each parameter's states are read one after another)


@dataclass(frozen=True)
class Slice:
    """Locator of an unpacked entry: elements [start, end) of a bucket tensor."""

    bucket_key: str
    start: int
    end: int


@dataclass
class Unpacked:
    entries: dict[str, Entry]  # optimizer.state.<state>.<stored model key>, model shapes
    common_optimizer: dict  # the common state's "optimizer" value, fully_reshardable form
    params: list[tuple[str, list[str], str]]  # (param, its stored keys, "param" state key)
    states: tuple[str, ...]


def is_dp_key(key: str) -> bool:
    return bool(BUCKET_RE.match(key) or OBJECT_RE.match(key))


def _fail(msg: str, view: CheckpointView, key: str | None = None) -> InvalidInputError:
    return InvalidInputError(f"dp_reshardable optimizer: {msg}", path=view.path, key=key)


def _model_keys(view: CheckpointView) -> list[str]:
    return [k for k, e in view.entries.items()
            if e.kind == "tensor" and not k.startswith(("optimizer.", "chained_"))
            and not K.MEGATRON_OPAQUE_RE.match(k) and not K.is_extra_state(k)]


def parameters(view: CheckpointView, cfg) -> tuple[list[L.Param], dict[str, list[str]]]:
    """Trainable parameters in ``module.parameters()`` order, and each one's stored keys (a
    factory split's parts in row order)."""
    out, stored = [], {}
    for base, parts in K.merge_splits(_model_keys(view), cfg).items():
        if any(rx.search(base) for rx in NON_PARAMETERS):
            continue
        if K.stacked(cfg, base) is not None:
            raise _fail("MoE expert weights live in an expert-parallel buffer of a second "
                        "optimizer, which is not modelled yet; re-save with "
                        "--dist-ckpt-optim-fully-reshardable or pass --drop-optimizer",
                        view, base)
        es = [view.entries[p] for p in parts]
        if len({e.dtype for e in es}) != 1:
            raise _fail("factory-split parts of one parameter differ in dtype", view, base)
        out.append(L.Param(base, sum(math.prod(e.shape) for e in es), es[0].dtype))
        stored[base] = parts
    return out, stored


def _decode(view: CheckpointView, key: str) -> Any:
    obj = safe_torch_load(view.load(key), source=view.file_of(key) or view.path, key=key)
    if not isinstance(obj, list) or len(obj) != 1:
        raise _fail("expected a one-element list (Megatron ShardedObject)", view, key)
    return obj[0]


def _bucket_numels(view: CheckpointView, key: str) -> list[dict[str, list[int]]]:
    """``per_bucket_numel[_unpadded]``: per buffer {dtype pair: [numel per bucket]}."""
    raw = _decode(view, key)
    try:
        return [{f"({a}, {b})": [int(n) for n in v] for (a, b), v in d.items()} for d in raw]
    except (TypeError, ValueError, AttributeError):
        raise _fail("per_bucket_numel is not a list of {(dtype, dtype): [int]}", view,
                    key) from None


def unpack(view: CheckpointView, cfg) -> Unpacked:
    """The model-space optimizer entries and common state of a dp_reshardable checkpoint."""
    common = view.meta.get("common_state")
    args = common.get("args") if isinstance(common, dict) else None
    buckets = {k: BUCKET_RE.match(k) for k in view.entries if BUCKET_RE.match(k)}
    objects = {OBJECT_RE.match(k).group(3): k for k in view.entries if OBJECT_RE.match(k)}
    stray = [k for k in view.entries if k.startswith(("optimizer.", "chained_"))
             and not is_dp_key(k)]
    if stray:
        raise _fail("model-space and bucket-space optimizer keys mixed", view, stray[0])
    if any(m.group(1) is not None for m in buckets.values()):
        raise _fail("several optimizers (chained_*: MoE expert parameters) are not modelled "
                    "yet; re-save with --dist-ckpt-optim-fully-reshardable or pass "
                    "--drop-optimizer", view, next(iter(buckets)))
    for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size",
                 "expert_model_parallel_size"):
        if int(getattr(args, name, 1) or 1) != 1:
            raise _fail(f"args.{name} = {getattr(args, name)}: only one model-parallel rank "
                        f"(one dp_group_idx, whole parameter shapes) is modelled; re-save with "
                        f"--dist-ckpt-optim-fully-reshardable or pass --drop-optimizer", view,
                        f"args.{name}")
    groups = {m.group(2) for m in buckets.values()}
    for need in ("optimizer", "per_bucket_numel", "per_bucket_numel_unpadded"):
        if need not in objects:
            raise _fail(f"no optimizer.distributed.dp_group_idx_0.{need} object", view)
    unknown = set(objects) - {"optimizer", "per_bucket_numel", "per_bucket_numel_unpadded",
                              "grad_scaler"}
    if groups != {"0"} or unknown:
        raise _fail(f"unexpected optimizer objects {sorted(unknown)} / groups {sorted(groups)}",
                    view)
    params, stored = parameters(view, cfg)
    settings = L.settings_from_args(args, sum(p.numel for p in params), path=view.path)
    dense = L.optimizer_buffers(L.layout(params, settings))[0]
    _check_buckets(view, dense, buckets, objects)
    states = tuple(sorted({m.group(6) for m in buckets.values()}))
    if "param" not in states:
        raise _fail("no 'param' (fp32 main copy) state in the buckets", view)
    entries: dict[str, Entry] = {}
    plist = []
    for g, buf in enumerate(dense):
        for p in params:
            if p.name not in buf.ranges:
                continue
            b, start, _ = buf.ranges[p.name]
            prefix = (f"optimizer.distributed.dp_group_idx_0.gbuf_idx_{g}.dtype_"
                      f"{buf.key.dtype_tag}.bucket_idx_{b}.")
            for part in stored[p.name]:
                e = view.entries[part]
                n = math.prod(e.shape)
                for s in states:
                    src = view.entries[prefix + s]
                    entries[K.opt_key(s, part)] = Entry(
                        K.opt_key(s, part), "tensor", src.dtype, e.shape,
                        n * getattr(torch, src.dtype).itemsize, Slice(src.key, start, start + n))
                start += n
            plist.append((p.name, stored[p.name], prefix + "param"))
    return Unpacked(entries, _common_optimizer(view, common, objects), plist, states)


def _check_buckets(view, dense, buckets, objects) -> None:
    want = {(g, buf.key.dtype_tag, b): bk for g, buf in enumerate(dense)
            for b, bk in enumerate(buf.buckets)}
    have = {(int(m.group(3)), m.group(4), int(m.group(5))) for m in buckets.values()}
    if have != set(want):
        raise _fail(f"the checkpoint's buckets {sorted(have)} are not the layout computed "
                    f"from args and the parameter order {sorted(want)}", view)
    for k, m in buckets.items():
        bk = want[(int(m.group(3)), m.group(4), int(m.group(5)))]
        if view.entries[k].shape != (bk.numel_unpadded,):
            raise _fail(f"bucket length {list(view.entries[k].shape)}, the computed layout "
                        f"gives {bk.numel_unpadded}", view, k)
    for name, attr in (("per_bucket_numel", "numel"),
                       ("per_bucket_numel_unpadded", "numel_unpadded")):
        mine = [{buf.key.dtype_tag: [getattr(bk, attr) for bk in buf.buckets]} for buf in dense]
        if _bucket_numels(view, objects[name]) != mine:
            raise _fail(f"Megatron's {name} {_bucket_numels(view, objects[name])} differs from "
                        f"the computed layout {mine}", view, objects[name])


def _common_optimizer(view: CheckpointView, common: dict, objects: dict[str, str]) -> dict:
    """``optimizer`` of the common state as a fully_reshardable save writes it: Megatron's
    ``state_dict()`` (the ``optimizer`` object: param groups, step; ``grad_scaler``) in place
    of the bucket-space skeleton."""
    old = common.get("optimizer")
    if not isinstance(old, dict) or old.get("param_state_sharding_type") != "dp_reshardable":
        raise _fail("common state 'optimizer' does not say param_state_sharding_type "
                    "'dp_reshardable'", view, view.meta.get("common_key"))
    new = {k: copy.deepcopy(v) for k, v in old.items() if k != "param_state"}
    for name in ("optimizer", "grad_scaler"):
        if name in objects:
            new[name] = _decode(view, objects[name])
    new["param_state_sharding_type"] = "fully_reshardable"
    return new


def fully_reshardable_common(common: dict, unpacked: Unpacked) -> dict:
    """The common state a fully_reshardable save of the same run holds."""
    out = dict(common)
    out["optimizer"] = unpacked.common_optimizer
    content = dict(common.get("content_metadata") or {})
    content["distrib_optim_sharding_type"] = "fully_reshardable"
    content.setdefault("distrib_optim_fully_reshardable_mem_efficient", False)
    out["content_metadata"] = content
    return out


def make_loader(view: CheckpointView, base_loader):
    """Loader for the view: unpacked entries are slices of (cached) decoded bucket tensors."""
    cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    def bucket(key: str) -> torch.Tensor:
        if key in cache:
            cache.move_to_end(key)
            return cache[key]
        t = base_loader(view.entries[key]) if key in view.entries else None
        if not isinstance(t, torch.Tensor):
            raise _fail("bucket tensor missing", view, key)
        cache[key] = t
        if len(cache) > _CACHE:
            cache.popitem(last=False)
        return t

    def load(entry: Entry):
        if isinstance(entry.locator, Slice):
            s = entry.locator
            return bucket(s.bucket_key)[s.start:s.end].clone().view(entry.shape)
        return base_loader(entry)

    return load


def verify(view: CheckpointView, unpacked: Unpacked, load) -> None:
    """Every parameter's fp32 main copy must be the stored model weight (bitwise; bf16 and
    fp16 models: rounded to their dtype, as Megatron's ``_copy_main_params_to_model_params``
    casts): a wrong range or order cannot pass unnoticed unless two parameters hold equal
    values."""
    for _, parts, _ in unpacked.params:
        for part in parts:
            weight = view.load(part)
            main = load(unpacked.entries[K.opt_key("param", part)])
            if not torch.equal(main.to(weight.dtype), weight):
                bad = (main.to(weight.dtype).float() - weight.float()).abs().max().item()
                raise _fail(f"the fp32 main copy found for this parameter in its bucket is "
                            f"not its weight (max abs {bad:.3g}): the computed bucket layout "
                            f"does not match the run", view, part)
