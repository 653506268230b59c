"""Layer registry: one pattern symbol -> one hybrid layer class (Megatron-Core key names).

Every layer takes ``u [S, B, C]`` and returns its branch output ``F(u)`` (no residual); the
stack (mHC off) or the hyper-connection wrapper (mHC on) adds the residual.
"""

from __future__ import annotations

import importlib

from torch import nn

from mhc_model.config import HybridConfig

# symbol -> (module, class). Imported lazily so one layer's optional GPU deps never block others.
LAYER_CLASSES: dict[str, tuple[str, str]] = {
    "M": ("mhc_model.layers.mamba2", "Mamba2Layer"),
    "G": ("mhc_model.layers.gdn", "GDNLayer"),
    "*": ("mhc_model.layers.attention", "AttentionLayer"),
    "D": ("mhc_model.layers.dsa", "DSALayer"),
    "+": ("mhc_model.layers.mla", "MLALayer"),
    "-": ("mhc_model.layers.mlp", "MLPLayer"),
    "E": ("mhc_model.layers.moe", "MoELayer"),
}


def layer_class(symbol: str) -> type[nn.Module]:
    if symbol not in LAYER_CLASSES:
        raise ValueError(f"unknown layer symbol {symbol!r}; known: {sorted(LAYER_CLASSES)}")
    module, name = LAYER_CLASSES[symbol]
    return getattr(importlib.import_module(module), name)


def build_layer(symbol: str, cfg: HybridConfig) -> nn.Module:
    return layer_class(symbol)(cfg)
