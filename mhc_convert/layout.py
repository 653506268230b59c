"""The mHC-off <-> mHC-on layouts, as data (DESIGN.md §3, §5).

Everything the planner knows about key names lives here: the wrapper segments, the new
per-layer and head parameters, the optimizer-state namespace, Megatron's factory-split and
``/shard_*`` suffixes, the byte-object keys Megatron stores beside the model, the output
projections a non-trivial H_post folds into, and the args flags that record the layout.
"""

from __future__ import annotations

import re

from mhc_model.config import HybridConfig
from mhc_model.hyper_connection import hc_param_shapes, head_param_shapes
from mhc_model.megatron_args import MHC_FLAG_SPELLINGS

# one source for the wrapper key map and the factory splits: the model's own sharded
# checkpoints and load shim use them too
from mhc_model.megatron_keys import (
    HC,
    INNER,
    KEY_ALIASES,
    LAYER_RE,
    canonical,
    split_table,
    unwrap,
    wrap,
)

HEAD_PREFIX = "decoder."

# optimizer.state.<name>.<model key> (Megatron fully_reshardable model space; native too)
OPT_RE = re.compile(r"^optimizer\.state\.([A-Za-z0-9_]+)\.(.+)$")
# what a freshly added parameter gets in each optimizer state: its value, or zeros
NEW_PARAM_OPT_STATE = {"fp32_param": "value", "param": "value", "exp_avg": "zeros",
                       "exp_avg_sq": "zeros"}

# Megatron ShardedObject suffix on byte objects, e.g. "_extra_state/shard_0_1"
SHARD_RE = re.compile(r"^(.*?)(/shard_[0-9._]+)$")
EXTRA_STATE = "_extra_state"

# Byte objects Megatron keeps beside the model: carried unchanged, except common_state whose
# args the engine rewrites.
MEGATRON_OPAQUE_RE = re.compile(r"^(rng_state|common_state)(/shard_[0-9._]+)?$")

NON_LAYER_KEYS = ("embedding.word_embeddings.weight", "decoder.final_norm.weight",
                  "output_layer.weight")

# Layer-relative output projections per symbol: H_post (a constant at the disable point) folds
# into these when it is not 1. Regexes, because MoE experts are numbered.
OUTPUT_PROJECTIONS: dict[str, tuple[str, ...]] = {
    "M": (r"mixer\.out_proj\.weight",),
    "G": (r"self_attention\.out_proj\.weight",),
    "*": (r"self_attention\.linear_proj\.weight",),
    "D": (r"self_attention\.linear_proj\.weight",),
    "+": (r"self_attention\.linear_proj\.weight",),
    "-": (r"mlp\.linear_fc2\.weight",),
    "E": (r"mlp\.experts\..*linear_fc2\.weight\d*", r"mlp\.shared_experts\.linear_fc2\.weight"),
}


def hc_keys(layer: int, cfg: HybridConfig) -> dict[str, tuple[int, ...]]:
    return {f"decoder.layers.{layer}.{HC}.{name}": shape
            for name, shape in hc_param_shapes(cfg).items()}


def head_keys(cfg: HybridConfig) -> dict[str, tuple[int, ...]]:
    if not cfg.mhc_on or cfg.mhc.mhc_output_contract != "learned":
        return {}
    return {HEAD_PREFIX + name: shape for name, shape in head_param_shapes(cfg).items()}


def args_flag_updates(cfg: HybridConfig) -> dict[str, object]:
    """Values of our mHC fields to record in Megatron args (every spelling present is set)."""
    m = cfg.mhc
    return {
        "enable_hyper_connections": m.enable_hyper_connections,
        "num_residual_streams": m.num_residual_streams,
        "mhc_sinkhorn_iterations": m.mhc_sinkhorn_iterations,
        "mhc_init_gating_factor": m.mhc_init_gating_factor,
        "mhc_recompute_layer_num": m.mhc_recompute_layer_num,
    }


__all__ = [
    "EXTRA_STATE", "HC", "INNER", "KEY_ALIASES", "LAYER_RE", "MEGATRON_OPAQUE_RE",
    "MHC_FLAG_SPELLINGS", "canonical",
    "NEW_PARAM_OPT_STATE", "NON_LAYER_KEYS", "OPT_RE", "OUTPUT_PROJECTIONS", "SHARD_RE",
    "args_flag_updates", "hc_keys", "head_keys", "split_table", "unwrap", "wrap",
]
