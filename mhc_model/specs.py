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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Splits = dict[str, tuple[tuple[str, int], ...]]  # base suffix -> ((part, rows), ...)

# Megatron branches whose hybrid_layer_pattern grammar we model (research/megatron-interop.md §2)
BRANCHES = ("main", "dev", "dsv4")


def _no_splits(cfg: Any) -> Splits:
    return {}


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


@dataclass(frozen=True)
class LayerSpec:
    """``sections``: the config sections the layer reads (validated when the symbol is used).
    ``output_projections``: layer-relative regexes of the weights a constant H_post folds into
    on an exact disable (y = F(u) is linear in them; MoE experts are numbered).
    ``splits``: Megatron's factory splits on disk. ``branches``: Megatron branches whose
    pattern grammar accepts the symbol."""

    symbol: str
    name: str
    module: str
    cls: str
    sections: tuple[str, ...]
    output_projections: tuple[str, ...]
    splits: Callable[[Any], Splits] = _no_splits
    branches: tuple[str, ...] = BRANCHES

    def layer_class(self) -> type:
        """Imported lazily so one layer's optional GPU dependencies never block the others."""
        return getattr(importlib.import_module(self.module), self.cls)


_ATTN_PROJ = (r"self_attention\.linear_proj\.weight",)

LAYER_SPECS: dict[str, LayerSpec] = {s.symbol: s for s in (
    LayerSpec("M", "mamba", "mhc_model.layers.mamba2", "Mamba2Layer", ("mamba",),
              (r"mixer\.out_proj\.weight",), _mamba_splits),
    LayerSpec("G", "gdn", "mhc_model.layers.gdn", "GDNLayer", ("gdn",),
              (r"self_attention\.out_proj\.weight",), _gdn_splits),
    LayerSpec("*", "attention", "mhc_model.layers.attention", "AttentionLayer", ("attention",),
              _ATTN_PROJ),
    LayerSpec("D", "dsa", "mhc_model.layers.dsa", "DSALayer", ("mla", "attention_heads"),
              _ATTN_PROJ),
    LayerSpec("+", "mla", "mhc_model.layers.mla", "MLALayer", ("mla", "attention_heads"),
              _ATTN_PROJ, branches=("main",)),
    LayerSpec("-", "mlp", "mhc_model.layers.mlp", "MLPLayer", ("mlp",),
              (r"mlp\.linear_fc2\.weight",)),
    LayerSpec("E", "moe", "mhc_model.layers.moe", "MoELayer", ("mlp", "moe"),
              (r"mlp\.experts\..*linear_fc2\.weight\d*",
               r"mlp\.shared_experts\.linear_fc2\.weight")),
)}


def layer_spec(symbol: str) -> LayerSpec:
    if symbol not in LAYER_SPECS:
        raise ValueError(f"unknown layer symbol {symbol!r}; known: {sorted(LAYER_SPECS)}")
    return LAYER_SPECS[symbol]
