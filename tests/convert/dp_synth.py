"""Synthetic ``dp_reshardable`` checkpoints for the converter's plumbing tests.

A fully_reshardable checkpoint of ``mhc_model`` (``checkpoint.save_dist``, a few Adam steps)
is re-packed into Megatron's bucket space with ``dp_layout`` (any DP size, several buckets,
NaN in every padding gap so a read of padding is caught). Self-consistent by construction
(our layout packs, our unpacker reads): it tests the plumbing, DP >= 2 and the refusals; the
fidelity to Megatron comes from the fixtures Megatron wrote (``test_dp_optim.py``).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

from mhc_convert.adapters.torch_dist import TorchDistAdapter
from mhc_convert.formats import dp_layout as L
from mhc_convert.formats import dp_optim
from mhc_convert.formats.torch_dist import read_torch_dist
from mhc_model import HybridModel
from mhc_model import checkpoint as C
from mhc_model.safe_unpickle import safe_torch_load
from tests.model.helpers import tiny_config, tokens

PREFIX = "optimizer.distributed.dp_group_idx_0"
STATE_NAME = {"param": "fp32_param", "exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq"}


def reference(tmp: Path, pattern: str = "M*-", dtype: str = "float32") -> Path:
    """A fully_reshardable run directory of ``mhc_model`` after two Adam steps."""
    torch.manual_seed(0)
    cfg = tiny_config(pattern, dtype=dtype)
    model = HybridModel(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(2):
        opt.zero_grad()
        model(tokens(vocab=cfg.vocab_size)).float().square().mean().backward()
        opt.step()
    C.save_dist(tmp, model, opt, iteration=5)
    return tmp


def repack(ref: Path, out: Path, *, dp: int = 2, bucket_size: int | None = 3000,
           args_overrides: dict | None = None, args_after: dict | None = None) -> Path:
    """``ref`` (fully_reshardable) re-written dp_reshardable; ``args`` say DP = ``dp``.
    ``args_after``: args fields set after packing (a setting the layout does not model)."""
    view = read_torch_dist(ref)
    common = copy.deepcopy(view.meta["common_state"])
    args = common["args"]
    for k, v in dict(use_distributed_optimizer=True, data_parallel_size=dp,
                     overlap_grad_reduce=bucket_size is not None, ddp_bucket_size=bucket_size,
                     accumulate_allreduce_grads_in_fp32=False, **(args_overrides or {})).items():
        setattr(args, k, v)
    cfg = TorchDistAdapter().config(view)
    params, stored = dp_optim.parameters(view, cfg)
    dense = L.optimizer_buffers(L.layout(params, L.settings_from_args(args, 0)))[0]
    state: dict = {k: view.load(k) for k, e in view.entries.items()
                   if e.kind == "tensor" and not k.startswith("optimizer.")}
    for g, buf in enumerate(dense):
        for b, bk in enumerate(buf.buckets):
            for s, ours in STATE_NAME.items():
                t = torch.full((bk.numel_unpadded,), float("nan"))
                for p in params:
                    if p.name in buf.ranges and buf.ranges[p.name][0] == b:
                        flat = torch.cat([view.load(f"optimizer.state.{ours}.{k}").reshape(-1)
                                          for k in stored[p.name]])
                        t[buf.ranges[p.name][1]:buf.ranges[p.name][2]] = flat
                key = f"{PREFIX}.gbuf_idx_{g}.dtype_{buf.key.dtype_tag}.bucket_idx_{b}.{s}"
                state[key] = t
    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16}

    def numels(attr):
        return [{(dt[buf.key.param_dtype], dt[buf.key.grad_dtype]):
                 [getattr(bk, attr) for bk in buf.buckets]} for buf in dense]

    state[f"{PREFIX}.per_bucket_numel/shard_0_1"] = [numels("numel")]
    state[f"{PREFIX}.per_bucket_numel_unpadded/shard_0_1"] = [numels("numel_unpadded")]
    state[f"{PREFIX}.optimizer/shard_0_1"] = [copy.deepcopy(common["optimizer"])]
    common["optimizer"] = {"param_state": {}, "param_state_sharding_type": "dp_reshardable"}
    common["content_metadata"] = dict(common["content_metadata"],
                                      distrib_optim_sharding_type="dp_reshardable")
    for k, v in (args_after or {}).items():
        setattr(args, k, v)
    state[C.COMMON_KEY] = [common]
    state[C.RNG_KEY] = safe_torch_load(view.load(C.RNG_KEY), source=ref)
    iter_dir = out / "iter_0000005"
    iter_dir.mkdir(parents=True)
    dcp.save(state, storage_writer=C._Writer(str(iter_dir), single_file_per_rank=True),
             planner=DefaultSavePlanner(flatten_state_dict=False, flatten_sharded_tensors=False),
             no_dist=True)
    (iter_dir / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist",
                                                        "sharded_backend_version": 1}))
    (out / C.TRACKER).write_text("5")
    return out
