"""One ``LayerSpec`` per pattern symbol (DESIGN.md §2): everything the project knows about a
layer kind, as data. Config validation, the layer registry, the key codec (factory splits), the
planner and the disable fold (output projections) all read this table, so a new symbol is one
row here plus its module.

Key suffixes and shapes are not written out: they are read off the layer module itself on the
meta device (``mhc_model.toggle.shapes``), so the table and the module cannot disagree.
This module imports nothing from the project (``config`` imports it).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Splits = dict[str, tuple[tuple[str, int], ...]]  # base suffix -> ((part, rows), ...)
# (regex of a Megatron spelling, our name as an ``re.Match.expand`` template)
Aliases = tuple[tuple[str, str], ...]
# stored suffix -> (our suffix template with ``{}`` for the index, count): one stored tensor
# [count, *shape] standing for ``count`` model tensors of ``shape``
Stacks = dict[str, tuple[str, int]]

# Megatron branches whose hybrid_layer_pattern grammar we model (research/megatron-interop.md §2)
BRANCHES = ("main", "dev", "dsv4")


def _no_splits(cfg: Any) -> Splits:
    return {}


def _no_stacks(cfg: Any) -> Stacks:
    return {}


def _moe_stacks(cfg: Any) -> Stacks:
    """torch_dist stores the experts' weights of one linear as one global [E, out, in] tensor
    (megatron-core ``transformer/moe/experts.py`` sharded_state_dict, TEGroupedMLP and
    SequentialMLP alike); our model holds TE GroupedLinear's ``weight0..E-1``."""
    E = cfg.moe.num_experts
    return {f"mlp.experts.experts.linear_fc{i}.weight": (f"mlp.experts.linear_fc{i}.weight{{}}", E)
            for i in (1, 2)}


# Megatron's local (non-TE) specs hold each pre-norm as its own module where TE fuses it into
# the first linear; ``remap_te_layernorm`` maps exactly these prefixes (megatron-core
# ``post_training/modelopt/hybrid/model_specs.py``, ``*_state_dict_keys_map``).
_MAMBA_ALIASES: Aliases = (
    (r"norm\.(weight|bias)", r"mixer.in_proj.layer_norm_\1"),
    # megatron-core 0.19 / dev: the conv as direct parameters in the module state dict (legacy
    # .pt files); torch_dist and dsv4 store ``mixer.conv1d.weight``
    (r"mixer\.conv1d_(weight|bias)", r"mixer.conv1d.\1"),
)
_ATTN_ALIASES: Aliases = (
    (r"input_layernorm\.(weight|bias)", r"self_attention.linear_qkv.layer_norm_\1"),)
_GDN_ALIASES: Aliases = (
    (r"input_layernorm\.(weight|bias)", r"self_attention.in_proj.layer_norm_\1"),)
_MLP_ALIASES: Aliases = (
    (r"pre_mlp_layernorm\.(weight|bias)", r"mlp.linear_fc1.layer_norm_\1"),)
# SequentialMLP (legacy files): one module per expert
_MOE_ALIASES: Aliases = (
    (r"mlp\.experts\.local_experts\.(\d+)\.linear_fc([12])\.weight",
     r"mlp.experts.linear_fc\2.weight\1"),)


def _mamba_splits(cfg: Any) -> Splits:
    """Megatron's torch_dist factory splits of the Mamba2 mixer: in_proj rows [z|x|B|C|dt],
    conv1d channels [x|B|C] (megatron-core ``ssm/mamba_mixer.py`` sharded_state_dict)."""
    m, C = cfg.mamba, cfg.hidden_size
    di, gn, h = m.d_inner(C), m.num_groups * m.d_state, m.num_heads(C)
    conv = (("x", di), ("B", gn), ("C", gn))
    return {
        "mixer.in_proj.weight": (("z", di), ("x", di), ("B", gn), ("C", gn), ("dt", h)),
        "mixer.conv1d.weight": conv,
        "mixer.conv1d.bias": conv,
    }


def _gdn_splits(cfg: Any) -> Splits:
    """GatedDeltaNet: in_proj [query|key|value|z|beta|alpha], conv1d [query|key|value]
    (megatron-core ``ssm/gated_delta_net.py`` sharded_state_dict)."""
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


def _gated(cfg: Any, ffn: int) -> tuple[tuple[str, int], ...] | None:
    """A gated (swiglu) fc1 holds [gate | up]; a TP shard holds its slice of each."""
    return (("gate", ffn), ("up", ffn)) if cfg.mlp.activation == "swiglu" else None


def _mlp_tp_parts(cfg: Any) -> Splits:
    parts = _gated(cfg, cfg.mlp.ffn_hidden_size)
    return {"mlp.linear_fc1.weight": parts} if parts else {}


def _moe_tp_parts(cfg: Any) -> Splits:
    moe, out = cfg.moe, {}
    experts = _gated(cfg, moe.moe_ffn_hidden_size)
    if experts:
        out.update({f"mlp.experts.linear_fc1.weight{e}": experts for e in range(moe.num_experts)})
    shared = moe.shared_expert_ffn_hidden_size and _gated(cfg, moe.shared_expert_ffn_hidden_size)
    if shared:
        out["mlp.shared_experts.linear_fc1.weight"] = shared
    return out


@dataclass(frozen=True)
class LayerSpec:
    """``sections``: the config sections the layer reads (validated when the symbol is used).
    ``output_projections``: layer-relative regexes of the weights a constant H_post folds into
    on an exact disable (y = F(u) is linear in them; MoE experts are numbered).
    ``splits``: Megatron's factory splits on disk. ``aliases``: Megatron's other spellings of
    a layer-relative key (accepted, kept as spelled on disk, our name for checks and loading).
    ``stacks``: stored tensors that stand for several model tensors. ``tp_parts``: tensors
    whose tensor-parallel shard (along dim 0) holds a slice of each of several row blocks
    rather than one contiguous block (the factory splits, a gated fc1). ``branches``: Megatron
    branches whose pattern grammar accepts the symbol."""

    symbol: str
    name: str
    module: str
    cls: str
    sections: tuple[str, ...]
    output_projections: tuple[str, ...]
    splits: Callable[[Any], Splits] = _no_splits
    aliases: Aliases = ()
    stacks: Callable[[Any], Stacks] = _no_stacks
    tp_parts: Callable[[Any], Splits] = _no_splits
    branches: tuple[str, ...] = BRANCHES

    def canonical(self, rel: str) -> str:
        """A layer-relative key in Megatron's spelling -> our name (itself when ours)."""
        for pattern, ours in self.aliases:
            m = re.fullmatch(pattern, rel)
            if m:
                return m.expand(ours)
        return rel

    def layer_class(self) -> type:
        """Imported lazily so one layer's optional GPU dependencies never block the others."""
        return getattr(importlib.import_module(self.module), self.cls)


_ATTN_PROJ = (r"self_attention\.linear_proj\.weight",)
_DSV4_SECTIONS = ("mla", "csa", "attention_heads")

LAYER_SPECS: dict[str, LayerSpec] = {s.symbol: s for s in (
    LayerSpec("M", "mamba", "mhc_model.layers.mamba2", "Mamba2Layer", ("mamba",),
              (r"mixer\.out_proj\.weight",), _mamba_splits, _MAMBA_ALIASES,
              tp_parts=_mamba_splits),
    LayerSpec("G", "gdn", "mhc_model.layers.gdn", "GDNLayer", ("gdn",),
              (r"self_attention\.out_proj\.weight",), _gdn_splits, _GDN_ALIASES,
              tp_parts=_gdn_splits),
    LayerSpec("*", "attention", "mhc_model.layers.attention", "AttentionLayer", ("attention",),
              _ATTN_PROJ, aliases=_ATTN_ALIASES),
    LayerSpec("D", "dsa", "mhc_model.layers.dsa", "DSALayer", ("mla", "attention_heads"),
              _ATTN_PROJ),
    # DeepSeek-V4 attention: dev has all three, dsv4 has C and H (hybrid_layer_allocation.py)
    LayerSpec("C", "csa", "mhc_model.layers.dsv4_attention", "CSALayer", _DSV4_SECTIONS,
              _ATTN_PROJ, branches=("dev", "dsv4")),
    LayerSpec("H", "hca", "mhc_model.layers.dsv4_attention", "HCALayer", _DSV4_SECTIONS,
              _ATTN_PROJ, branches=("dev", "dsv4")),
    LayerSpec("W", "window", "mhc_model.layers.dsv4_attention", "WindowAttentionLayer",
              _DSV4_SECTIONS, _ATTN_PROJ, branches=("dev",)),
    LayerSpec("+", "mla", "mhc_model.layers.mla", "MLALayer", ("mla", "attention_heads"),
              _ATTN_PROJ, branches=("main",)),
    LayerSpec("-", "mlp", "mhc_model.layers.mlp", "MLPLayer", ("mlp",),
              (r"mlp\.linear_fc2\.weight",), aliases=_MLP_ALIASES, tp_parts=_mlp_tp_parts),
    LayerSpec("E", "moe", "mhc_model.layers.moe", "MoELayer", ("mlp", "moe"),
              (r"mlp\.experts\.linear_fc2\.weight\d+",
               r"mlp\.shared_experts\.linear_fc2\.weight"),
              aliases=_MOE_ALIASES, stacks=_moe_stacks, tp_parts=_moe_tp_parts),
)}


def layer_spec(symbol: str) -> LayerSpec:
    if symbol not in LAYER_SPECS:
        raise ValueError(f"unknown layer symbol {symbol!r}; known: {sorted(LAYER_SPECS)}")
    return LAYER_SPECS[symbol]
