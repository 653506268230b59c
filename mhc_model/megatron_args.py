"""Megatron ``args`` <-> ``HybridConfig``: the name table, as data, read in both directions.

``_ARG_TABLE`` maps each Megatron arg that is one of our fields one to one; ``megatron_args``
writes it and ``config_from_megatron_args`` reads it, so the two cannot drift. The args that
are derived (head counts, activation flags, dtype flags, ...) are spelled out beside it, once
per direction. Megatron spells the mHC flags two ways: dsv4/dev (``enable_hyper_connections``,
``num_residual_streams``) and main (``enable_mhc_connections``, ``mhc_num_residual_streams``).
Both are read; ``MHC_FLAG_SPELLINGS`` is also what the converter flips in a checkpoint's args.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from mhc_model.config import _SUBCONFIGS, HybridConfig, MambaConfig
from mhc_model.targets import check_pattern_for, dialect_of_args, target_of_args

# our MHCConfig field -> every Megatron spelling (dsv4/dev first, then main)
MHC_FLAG_SPELLINGS: dict[str, tuple[str, ...]] = {
    "enable_hyper_connections": ("enable_hyper_connections", "enable_mhc_connections"),
    "num_residual_streams": ("num_residual_streams", "mhc_num_residual_streams"),
    "mhc_sinkhorn_iterations": ("mhc_sinkhorn_iterations",),
    "mhc_init_gating_factor": ("mhc_init_gating_factor",),
    "mhc_recompute_layer_num": ("mhc_recompute_layer_num",),
}

# (sub-config, our field) <- Megatron arg name. Missing args keep our defaults.
_ARG_TABLE: dict[str, tuple[str | None, str]] = {
    "hybrid_layer_pattern": (None, "hybrid_layer_pattern"),
    "hidden_size": (None, "hidden_size"),
    "layernorm_epsilon": (None, "norm_eps"),
    "fp32_residual_connection": (None, "fp32_residual_connection"),
    "init_method_std": (None, "init_std"),
    "num_attention_heads": ("attention", "num_attention_heads"),
    "kv_channels": ("attention", "kv_channels"),
    "rotary_base": ("attention", "rotary_base"),
    "qk_layernorm": ("attention", "qk_layernorm"),
    "ffn_hidden_size": ("mlp", "ffn_hidden_size"),
    "num_experts": ("moe", "num_experts"),
    "moe_router_topk": ("moe", "router_topk"),
    "moe_ffn_hidden_size": ("moe", "moe_ffn_hidden_size"),
    "moe_shared_expert_intermediate_size": ("moe", "shared_expert_ffn_hidden_size"),
    "moe_router_score_function": ("moe", "score_function"),
    "moe_router_enable_expert_bias": ("moe", "router_expert_bias"),
    "mamba_state_dim": ("mamba", "d_state"),
    "mamba_head_dim": ("mamba", "head_dim"),
    "mamba_num_groups": ("mamba", "num_groups"),
    "mamba_expand": ("mamba", "expand"),
    "linear_num_key_heads": ("gdn", "num_key_heads"),
    "linear_num_value_heads": ("gdn", "num_value_heads"),
    "linear_key_head_dim": ("gdn", "key_head_dim"),
    "linear_value_head_dim": ("gdn", "value_head_dim"),
    "linear_conv_kernel_dim": ("gdn", "conv_kernel"),
    "q_lora_rank": ("mla", "q_lora_rank"),
    "kv_lora_rank": ("mla", "kv_lora_rank"),
    "qk_head_dim": ("mla", "qk_head_dim"),
    "qk_pos_emb_head_dim": ("mla", "qk_pos_emb_head_dim"),
    "v_head_dim": ("mla", "v_head_dim"),
    "dsa_indexer_n_heads": ("mla", "index_n_heads"),
    "dsa_indexer_head_dim": ("mla", "index_head_dim"),
    "dsa_indexer_topk": ("mla", "index_topk"),
    "csa_window_size": ("csa", "window_size"),
    "csa_compress_rotary_base": ("csa", "compress_rotary_base"),
    "csa_dense_mode": ("csa", "dense_mode"),
    "o_groups": ("csa", "o_groups"),
    "o_lora_rank": ("csa", "o_lora_rank"),
    "rotary_scaling_factor": ("csa", "rotary_scaling_factor"),
    "original_max_position_embeddings": ("csa", "original_max_position_embeddings"),
}

_SUB = _SUBCONFIGS  # sub-config name -> dataclass


_ATOMS = (str, int, float, bool, type(None))


def _show(value: Any) -> str:
    """A value from a checkpoint's args for an error message: repr only for plain atoms (a
    tuple shared through the pickle memo is a DAG whose repr is exponentially long)."""
    return repr(value)[:60] if isinstance(value, _ATOMS) else f"<{type(value).__name__}>"


def _typed(args: Any, name: str, kinds: tuple[type, ...], default: Any = None) -> Any:
    """``getattr(args, name, default)``, refused unless of one of ``kinds`` (exactly: a bool
    is not an int here) or None. Args come from a checkpoint: a tensor where a flag belongs
    raises on truthiness, a list times an int allocates, inf breaks int()."""
    value = getattr(args, name, default)
    if value is not None and type(value) not in kinds:
        raise ValueError(f"megatron args: {name}={_show(value)} is not "
                         f"{' or '.join(k.__name__ for k in kinds)}")
    return value


def _flag(args: Any, name: str) -> bool:
    return bool(_typed(args, name, (bool,), False))


def _dtype_name(value: Any) -> str:
    if not isinstance(value, (str, torch.dtype)):
        raise ValueError(f"megatron args: params_dtype={_show(value)} is not a dtype")
    text = str(value).replace("torch.", "")
    aliases = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "half": "float16",
               "float": "float32"}
    return aliases.get(text, text)


def read_mhc_flag(args: Any, field: str) -> Any:
    """The value of an mHC flag under whichever spelling ``args`` carries (None if absent).
    Two spellings with different values are a contradiction, not a choice."""
    found = {name: getattr(args, name) for name in MHC_FLAG_SPELLINGS[field] if hasattr(args, name)}
    for name, v in found.items():
        if not isinstance(v, _ATOMS):
            raise ValueError(f"megatron args: {name}={_show(v)} is not a flag value")
    values = {repr(v) for v in found.values()}
    if len(values) > 1:
        raise ValueError(f"args carry contradictory mHC flags {found}")
    return next(iter(found.values()), None)


def layer_pattern(args: Any) -> str:
    """``hybrid_layer_pattern``, else ``hybrid_override_pattern``: the only spelling Megatron
    <= 0.15 records (core_r0.15.0 ``arguments.py``); newer runs copy the deprecated flag into
    the first, which then wins (dev ``arguments.py`` ~776-788). A run with neither has no
    pattern we could honestly assume."""
    for name in ("hybrid_layer_pattern", "hybrid_override_pattern"):
        pattern = _typed(args, name, (str,))
        if pattern is not None:
            return _with_legacy_mtp(args, pattern)
    raise ValueError("megatron args carry no hybrid_layer_pattern (nor the pre-0.16 "
                     "hybrid_override_pattern): not a hybrid model run, or args were stripped")


def _with_legacy_mtp(args: Any, pattern: str) -> str:
    """The unified ``main/mtp/mtp`` pattern. Runs before the unified syntax recorded the MTP
    layers as ``mtp_hybrid_override_pattern`` x ``mtp_num_layers``; dev's ``validate_args``
    rewrites that into the unified pattern (``arguments.py`` ~808-820), as done here. One
    shared MTP layer applied at every depth (``mtp_use_repeated_layer``) has no per-depth keys
    and is refused."""
    if _flag(args, "mtp_use_repeated_layer"):
        raise ValueError("megatron args: mtp_use_repeated_layer (one MTP layer shared by every "
                         "depth) is not supported")
    legacy = _typed(args, "mtp_hybrid_override_pattern", (str,))
    depths = _typed(args, "mtp_num_layers", (int,))
    if legacy is not None and depths and "/" not in pattern:
        pattern = pattern + "/" + "/".join([legacy] * depths)
    return pattern


# Our own mHC metadata beside Megatron's args (never inside them: Megatron's args have no
# convention or contract field): common_state["mhc"] in torch_dist, payload["mhc"] in legacy.
MHC_META_KEY = "mhc"
MHC_META_FIELDS = ("mhc_convention", "mhc_output_contract")


def config_from_megatron_args(args: Any, meta: Any = None) -> HybridConfig:
    """The model config a Megatron run's ``args`` describe. The convention and contract come
    from our metadata (``MHC_META_KEY``) when present, else from args written by older
    versions of this tool, else from the branch the args prove (``targets``)."""
    sub_kwargs: dict[str, dict[str, Any]] = {name: {} for name in _SUB}
    top: dict[str, Any] = {"hybrid_layer_pattern": layer_pattern(args)}
    # the grammar of the branch the args prove (a C/H/W/+ pattern from the wrong one is
    # refused); args proving no branch may be ours (mhc_model mixes '*' with D), so main's
    # grammar (dialect_of_args) is not imposed on them
    if target_of_args(args).branch is not None:
        check_pattern_for(top["hybrid_layer_pattern"], dialect_of_args(args))
    for arg, (sub, ours) in _ARG_TABLE.items():
        value = getattr(args, arg, None)
        if value is None:
            continue
        (sub_kwargs[sub] if sub else top)[ours] = value
    if getattr(args, "rotary_base", None) is not None:  # one Megatron flag for every rope
        sub_kwargs["mla"]["rotary_base"] = args.rotary_base
    vocab = _typed(args, "padded_vocab_size", (int,)) or _typed(args, "vocab_size", (int,))
    if vocab is None:
        raise ValueError("megatron args: neither padded_vocab_size nor vocab_size is set")
    top["vocab_size"] = vocab
    norm = _typed(args, "normalization", (str,), "RMSNorm")
    if norm != "RMSNorm":
        raise ValueError(f"megatron args: normalization={_show(norm)} is not supported "
                         "(RMSNorm only)")
    groups = _typed(args, "num_query_groups", (int,))
    if _flag(args, "group_query_attention") and groups:
        sub_kwargs["attention"]["num_query_groups"] = groups
    pos = _typed(args, "position_embedding_type", (str,), "rope")
    if pos not in ("rope", "none"):
        raise ValueError(f"megatron args: position_embedding_type={_show(pos)} is not "
                         "supported")
    sub_kwargs["attention"]["position_embedding_type"] = pos
    if _flag(args, "swiglu"):
        sub_kwargs["mlp"]["activation"] = "swiglu"
    elif _flag(args, "squared_relu"):
        sub_kwargs["mlp"]["activation"] = "squared_relu"
    else:
        raise ValueError("megatron args: only squared_relu or swiglu MLPs are supported")
    heads = _typed(args, "mamba_num_heads", (int,))
    if heads is not None and getattr(args, "mamba_expand", None) is None:
        # Megatron derives d_inner = heads * head_dim; express it as our expand factor.
        head_dim = sub_kwargs["mamba"].get("head_dim", MambaConfig.head_dim)
        hidden = top.get("hidden_size")
        if type(head_dim) is not int or type(hidden) is not int or hidden <= 0:
            raise ValueError(f"megatron args: mamba_num_heads needs integer mamba_head_dim and "
                             f"hidden_size > 0, got {_show(head_dim)} and {_show(hidden)}")
        sub_kwargs["mamba"]["expand"] = heads * head_dim // hidden
    top["tie_word_embeddings"] = not _flag(args, "untie_embeddings_and_output_weights")
    if getattr(args, "params_dtype", None) is not None:
        top["params_dtype"] = _dtype_name(args.params_dtype)
    elif _flag(args, "bf16"):
        top["params_dtype"] = "bfloat16"
    for ours in MHC_FLAG_SPELLINGS:
        value = read_mhc_flag(args, ours)
        if value is not None:
            sub_kwargs["mhc"][ours] = value
    meta = meta if isinstance(meta, dict) else {}
    for name in MHC_META_FIELDS:
        value = meta.get(name, getattr(args, name, None))
        if value is not None:
            sub_kwargs["mhc"][name] = value
    target = target_of_args(args)
    sub_kwargs["mhc"].setdefault("mhc_convention", target.convention)
    if target.branch is not None and sub_kwargs["mhc"].get("enable_hyper_connections"):
        # Megatron dev/dsv4 with mHC on always build and apply the learned head (hc_head_*:
        # dev hybrid_block.py ~742-756 + ~1027-1040, dsv4 ~382-392 + ~662-672); the mean
        # contract is no model of theirs (targets.Target.contracts refuses it)
        sub_kwargs["mhc"].setdefault("mhc_output_contract", target.contract)
    subs = {name: cls(**sub_kwargs[name]) for name, cls in _SUB.items()}
    return HybridConfig(**top, **subs)


def _field(cfg: HybridConfig, sub: str | None, name: str) -> Any:
    return getattr(getattr(cfg, sub) if sub else cfg, name)


def mhc_flag_values(cfg: HybridConfig) -> dict[str, Any]:
    """Our mHC fields that Megatron args record (``MHC_FLAG_SPELLINGS``), with cfg's values."""
    return {name: getattr(cfg.mhc, name) for name in MHC_FLAG_SPELLINGS}


def megatron_args(cfg: HybridConfig, **extra: object) -> argparse.Namespace:
    """The ``args`` namespace Megatron records for this model: ``config_from_megatron_args``
    reads it back to the same architecture and mHC flags (both spellings' readers), and
    ``mhc-convert`` flips its mHC flags on conversion."""
    a, C = cfg.attention, cfg.hidden_size
    ns = argparse.Namespace(**{arg: _field(cfg, sub, name)
                               for arg, (sub, name) in _ARG_TABLE.items()})
    ns.num_layers = cfg.num_layers
    ns.num_query_groups = a.groups
    ns.group_query_attention = a.groups != a.num_attention_heads
    ns.kv_channels = a.head_dim(C)
    ns.position_embedding_type = a.position_embedding_type
    ns.mamba_num_heads = cfg.mamba.num_heads(C)
    ns.num_experts = cfg.moe.num_experts if "E" in cfg.layer_symbols else None
    ns.padded_vocab_size = cfg.vocab_size
    ns.normalization = "RMSNorm"
    ns.squared_relu = cfg.mlp.activation == "squared_relu"
    ns.swiglu = cfg.mlp.activation == "swiglu"
    ns.untie_embeddings_and_output_weights = not cfg.tie_word_embeddings
    ns.bf16, ns.fp16 = cfg.params_dtype == "bfloat16", cfg.params_dtype == "float16"
    ns.params_dtype = getattr(torch, cfg.params_dtype)
    ns.tensor_model_parallel_size = ns.pipeline_model_parallel_size = 1
    ns.ckpt_format = "torch_dist"
    ns.dist_ckpt_optim_fully_reshardable = True
    for name, value in mhc_flag_values(cfg).items():
        setattr(ns, MHC_FLAG_SPELLINGS[name][0], value)
    for k, v in extra.items():
        setattr(ns, k, v)
    return ns
