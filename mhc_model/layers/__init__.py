"""Layer registry: one pattern symbol -> one hybrid layer class (Megatron-Core key names),
read from the ``LayerSpec`` table (``mhc_model.specs``).

Every layer takes ``u [S, B, C]`` and returns its branch output ``F(u)`` (no residual); the
stack (mHC off) or the hyper-connection wrapper (mHC on) adds the residual.
"""

from __future__ import annotations

from torch import nn

from mhc_model.config import HybridConfig
from mhc_model.specs import layer_spec


def layer_class(symbol: str) -> type[nn.Module]:
    return layer_spec(symbol).layer_class()


def build_layer(symbol: str, cfg: HybridConfig) -> nn.Module:
    return layer_class(symbol)(cfg)
