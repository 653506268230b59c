"""Megatron-Core key conventions the model itself needs (DESIGN.md §3, §5): the mHC-off <-> on
key mapping, the factory splits ``torch_dist`` stores instead of fused tensors, and the args
namespace Megatron writes into a checkpoint's common state.

This lives in ``mhc_model`` (not ``mhc_convert``) because the model's own sharded checkpoints and
the load shim need it, and the model package must import without the converter.
``mhc_convert.layout`` re-exports ``split_table`` so the converter has one table.
"""

from __future__ import annotations

import argparse
import re

import torch
from torch import Tensor

from mhc_model.config import HybridConfig

LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
INNER = "inner_layer"
HC = "hyper_connection"
HEAD_PREFIX = "decoder.hc_head_"


# Other spellings of a layer-relative key that Megatron writes. megatron-core 0.19 holds the
# Mamba conv as direct parameters (``mixer.conv1d_weight``) in its module state dict (legacy
# ``.pt`` files), while torch_dist stores ``mixer.conv1d.weight``. Either is accepted and kept
# as spelled; checks and model loading use the canonical name.
KEY_ALIASES = {
    "mixer.conv1d_weight": "mixer.conv1d.weight",
    "mixer.conv1d_bias": "mixer.conv1d.bias",
}


def canonical(rel: str) -> str:
    """Layer-relative key -> the name our model uses."""
    return KEY_ALIASES.get(rel, rel)


def wrap(key: str) -> str:
    """decoder.layers.N.X -> decoder.layers.N.inner_layer.X (other keys unchanged)."""
    m = LAYER_RE.match(key)
    return f"decoder.layers.{m.group(1)}.{INNER}.{m.group(2)}" if m else key


def unwrap(key: str) -> str:
    """decoder.layers.N.inner_layer.X -> decoder.layers.N.X (other keys unchanged)."""
    m = LAYER_RE.match(key)
    if m and m.group(2).startswith(INNER + "."):
        return f"decoder.layers.{m.group(1)}.{m.group(2)[len(INNER) + 1:]}"
    return key


def is_mhc_param(key: str) -> bool:
    """A hyper-connection parameter or the learned contract head (exist only with mHC on)."""
    m = LAYER_RE.match(key)
    return key.startswith(HEAD_PREFIX) or bool(m and m.group(2).startswith(HC + "."))


def split_table(cfg: HybridConfig, symbol: str) -> dict[str, tuple[tuple[str, int], ...]]:
    """Megatron's factory splits for one layer symbol: base suffix -> ((part, rows), ...).
    Mamba: in_proj rows [z|x|B|C|dt], conv1d channels [x|B|C]; GDN: in_proj
    [query|key|value|z|beta|alpha], conv1d [query|key|value]."""
    if symbol == "M":
        m, C = cfg.mamba, cfg.hidden_size
        di, gn, h = m.d_inner(C), m.num_groups * m.d_state, m.num_heads(C)
        conv = (("x", di), ("B", gn), ("C", gn))
        return {
            "mixer.in_proj.weight": (("z", di), ("x", di), ("B", gn), ("C", gn), ("dt", h)),
            "mixer.conv1d.weight": conv,
            "mixer.conv1d.bias": conv,
        }
    if symbol == "G":
        g = cfg.gdn
        qk, v = g.num_key_heads * g.key_head_dim, g.num_value_heads * g.value_head_dim
        conv = (("query", qk), ("key", qk), ("value", v))
        return {
            "self_attention.in_proj.weight": (("query", qk), ("key", qk), ("value", v), ("z", v),
                                              ("beta", g.num_value_heads),
                                              ("alpha", g.num_value_heads)),
            "self_attention.conv1d.weight": conv,
            "self_attention.conv1d.bias": conv,
        }
    return {}


def disk_views(cfg: HybridConfig, key: str, tensor: Tensor) -> dict[str, Tensor]:
    """One model tensor as the ``torch_dist`` item(s) Megatron stores for it: itself, or the
    row views of its factory split (``...in_proj.weight.z`` ...). Views, never copies, so a
    load through them writes straight into the model's storage."""
    m = LAYER_RE.match(key)
    if not m:
        return {key: tensor}
    i = int(m.group(1))
    rel = unwrap(key).split(".", 3)[3]
    splits = split_table(cfg, cfg.layer_symbols[i]).get(rel) if i < cfg.num_layers else None
    if not splits:
        return {key: tensor}
    total = sum(rows for _, rows in splits)
    if tensor.shape[0] != total:
        raise ValueError(f"{key}: {tensor.shape[0]} rows, the factory split needs {total}")
    out, start = {}, 0
    for part, rows in splits:
        out[f"{key}.{part}"] = tensor.narrow(0, start, rows)
        start += rows
    return out


def _dtype_name(cfg: HybridConfig) -> torch.dtype:
    return getattr(torch, cfg.params_dtype)


def megatron_args(cfg: HybridConfig, **extra: object) -> argparse.Namespace:
    """The ``args`` namespace Megatron records for this model: ``HybridConfig.from_megatron_args``
    reads it back to the same architecture and mHC flags (both spellings' readers), and
    ``mhc-convert`` flips its mHC flags on conversion."""
    a, mb, g, mla, moe = cfg.attention, cfg.mamba, cfg.gdn, cfg.mla, cfg.moe
    C = cfg.hidden_size
    ns = argparse.Namespace(
        hybrid_layer_pattern=cfg.hybrid_layer_pattern, num_layers=cfg.num_layers,
        hidden_size=C, ffn_hidden_size=cfg.mlp.ffn_hidden_size,
        num_attention_heads=a.num_attention_heads, num_query_groups=a.groups,
        group_query_attention=a.groups != a.num_attention_heads, kv_channels=a.head_dim(C),
        qk_layernorm=a.qk_layernorm, rotary_base=a.rotary_base,
        position_embedding_type=a.position_embedding_type,
        mamba_state_dim=mb.d_state, mamba_head_dim=mb.head_dim, mamba_num_groups=mb.num_groups,
        mamba_num_heads=mb.num_heads(C), mamba_expand=mb.expand,
        linear_num_key_heads=g.num_key_heads, linear_num_value_heads=g.num_value_heads,
        linear_key_head_dim=g.key_head_dim, linear_value_head_dim=g.value_head_dim,
        linear_conv_kernel_dim=g.conv_kernel,
        q_lora_rank=mla.q_lora_rank, kv_lora_rank=mla.kv_lora_rank, qk_head_dim=mla.qk_head_dim,
        qk_pos_emb_head_dim=mla.qk_pos_emb_head_dim, v_head_dim=mla.v_head_dim,
        dsa_indexer_n_heads=mla.index_n_heads, dsa_indexer_head_dim=mla.index_head_dim,
        dsa_indexer_topk=mla.index_topk,
        num_experts=moe.num_experts if "E" in cfg.layer_symbols else None,
        moe_router_topk=moe.router_topk, moe_ffn_hidden_size=moe.moe_ffn_hidden_size,
        moe_shared_expert_intermediate_size=moe.shared_expert_ffn_hidden_size,
        moe_router_score_function=moe.score_function,
        moe_router_enable_expert_bias=moe.router_expert_bias,
        padded_vocab_size=cfg.vocab_size, normalization="RMSNorm",
        squared_relu=cfg.mlp.activation == "squared_relu", swiglu=cfg.mlp.activation == "swiglu",
        untie_embeddings_and_output_weights=not cfg.tie_word_embeddings,
        layernorm_epsilon=cfg.norm_eps, init_method_std=cfg.init_std,
        fp32_residual_connection=cfg.fp32_residual_connection,
        bf16=cfg.params_dtype == "bfloat16", fp16=cfg.params_dtype == "float16",
        params_dtype=_dtype_name(cfg),
        tensor_model_parallel_size=1, pipeline_model_parallel_size=1, ckpt_format="torch_dist",
        dist_ckpt_optim_fully_reshardable=True,
        enable_hyper_connections=cfg.mhc.enable_hyper_connections,
        num_residual_streams=cfg.mhc.num_residual_streams,
        mhc_sinkhorn_iterations=cfg.mhc.mhc_sinkhorn_iterations,
        mhc_init_gating_factor=cfg.mhc.mhc_init_gating_factor,
        mhc_recompute_layer_num=cfg.mhc.mhc_recompute_layer_num,
        mhc_convention=cfg.mhc.mhc_convention, mhc_output_contract=cfg.mhc.mhc_output_contract,
    )
    for k, v in extra.items():
        setattr(ns, k, v)
    return ns
