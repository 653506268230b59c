"""Dense MLP layer (`-`), Megatron-Core HybridModel TE spec, plus the activation shared with MoE.

models/hybrid/hybrid_layer_specs.py (``mlp_layer``): MLPLayer (ssm/mlp_layer.py, a
TransformerLayer with only ``mlp``) with linear_fc1 = TELayerNormColumnParallelLinear, so the
pre-norm is fused into fc1. Keys: ``mlp.linear_fc1.layer_norm_weight`` [C],
``mlp.linear_fc1.weight`` [F or 2F, C], ``mlp.linear_fc2.weight`` [C, F].

swiglu (gated_linear_unit): transformer/mlp.py doubles fc1's rows and splits them with
``torch.chunk(x, 2, dim=-1)`` -> ``silu(first half) * second half``: gate rows first, then up.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mhc_model.config import HybridConfig
from mhc_model.layers.common import LayerNormLinear, Linear, output_std, torch_dtype


def fc1_rows(ffn_hidden_size: int, activation: str) -> int:
    return 2 * ffn_hidden_size if activation == "swiglu" else ffn_hidden_size


def activation_fn(h_TX: Tensor, activation: str) -> Tensor:
    """fc1 output -> fc2 input. squared_relu = relu(x)^2 (megatron/core/activations.py)."""
    if activation == "swiglu":
        gate_TF, up_TF = torch.chunk(h_TX, 2, dim=-1)
        return F.silu(gate_TF) * up_TF
    if activation == "squared_relu":
        return F.relu(h_TX).square()
    raise ValueError(f"unknown activation {activation!r}")


class MLP(nn.Module):
    """fc1 -> activation -> fc2 without bias. ``fused_norm`` makes fc1 a LayerNormLinear (the
    dense `-` layer); MoE's shared expert has no norm of its own (pre_mlp_layernorm runs first)."""

    def __init__(self, cfg: HybridConfig, ffn_hidden_size: int, fused_norm: bool):
        super().__init__()
        C = cfg.hidden_size
        dtype = torch_dtype(cfg)
        self.activation = cfg.mlp.activation
        rows = fc1_rows(ffn_hidden_size, self.activation)
        if fused_norm:
            self.linear_fc1 = LayerNormLinear(C, rows, dtype, cfg.init_std, cfg.norm_eps)
        else:
            self.linear_fc1 = Linear(C, rows, dtype, cfg.init_std)
        self.linear_fc2 = Linear(ffn_hidden_size, C, dtype, output_std(cfg))

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_fc2(activation_fn(self.linear_fc1(x), self.activation))


class MLPLayer(nn.Module):
    """Hybrid `-` layer: returns the MLP branch output (no residual)."""

    def __init__(self, cfg: HybridConfig):
        super().__init__()
        self.mlp = MLP(cfg, cfg.mlp.ffn_hidden_size, fused_norm=True)

    def forward(self, u_SBC: Tensor) -> Tensor:
        return self.mlp(u_SBC)
