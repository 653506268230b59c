"""GQA causal self-attention layer (`*`), Megatron-Core HybridModel TE spec.

Keys (relative to ``decoder.layers.{i}.``), from models/hybrid/hybrid_layer_specs.py
(``attention_layer``: TransformerLayer with SelfAttention, linear_qkv =
TELayerNormColumnParallelLinear, so the pre-norm lives inside linear_qkv) and
transformer/attention.py (SelfAttention):

- ``self_attention.linear_qkv.layer_norm_weight`` [C]
- ``self_attention.linear_qkv.weight`` [(H + 2G) * D, C]
- ``self_attention.q_layernorm.weight`` / ``self_attention.k_layernorm.weight`` [D]
  (only with ``qk_layernorm``; TENorm over the head dim, RMSNorm like the rest of the model)
- ``self_attention.linear_proj.weight`` [C, H * D]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mhc_model.config import HybridConfig
from mhc_model.layers.common import LayerNormLinear, Linear, RMSNorm, output_std, torch_dtype
from mhc_model.layers.rope import apply_rope, rope_angles


class SelfAttention(nn.Module):
    """Megatron's ``SelfAttention`` parameters and math (no dropout, no bias)."""

    def __init__(self, cfg: HybridConfig):
        super().__init__()
        att = cfg.attention
        C = cfg.hidden_size
        dtype = torch_dtype(cfg)
        self.num_heads = att.num_attention_heads
        self.num_groups = att.groups
        self.head_dim = att.head_dim(C)
        self.use_rope = att.position_embedding_type == "rope"
        self.rotary_base = att.rotary_base
        qkv_rows = (self.num_heads + 2 * self.num_groups) * self.head_dim
        self.linear_qkv = LayerNormLinear(C, qkv_rows, dtype, cfg.init_std, cfg.norm_eps)
        self.linear_proj = Linear(self.num_heads * self.head_dim, C, dtype, output_std(cfg))
        if att.qk_layernorm:
            self.q_layernorm = RMSNorm(self.head_dim, cfg.norm_eps, dtype)
            self.k_layernorm = RMSNorm(self.head_dim, cfg.norm_eps, dtype)
        else:
            self.q_layernorm = None
            self.k_layernorm = None

    def split_qkv(self, mixed_SBX: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Megatron's row layout is interleaved per query group (attention.py
        ``get_query_key_value_tensors``): for each group g the rows are
        ``[q heads of g (H/G * D) | k_g (D) | v_g (D)]``."""
        S, B, _ = mixed_SBX.shape
        per_group = self.num_heads // self.num_groups
        D = self.head_dim
        mixed_SBGX = mixed_SBX.view(S, B, self.num_groups, (per_group + 2) * D)
        q_SBGX, k_SBGD, v_SBGD = torch.split(mixed_SBGX, [per_group * D, D, D], dim=-1)
        # Query head h belongs to group h // (H/G): the same mapping SDPA's enable_gqa uses.
        q_SBHD = q_SBGX.reshape(S, B, self.num_heads, D)
        return q_SBHD, k_SBGD, v_SBGD

    def forward(self, u_SBC: Tensor) -> Tensor:
        S, B, _ = u_SBC.shape
        q_SBHD, k_SBGD, v_SBGD = self.split_qkv(self.linear_qkv(u_SBC))
        # Megatron normalises q/k before RoPE (norms in get_query_key_value_tensors, RoPE later).
        if self.q_layernorm is not None:
            q_SBHD = self.q_layernorm(q_SBHD)
            k_SBGD = self.k_layernorm(k_SBGD)
        if self.use_rope:
            angles_SF = rope_angles(S, self.head_dim, self.rotary_base, u_SBC.device)
            q_SBHD = apply_rope(q_SBHD, angles_SF)
            k_SBGD = apply_rope(k_SBGD, angles_SF)
        q_BHSD = q_SBHD.permute(1, 2, 0, 3)
        k_BGSD = k_SBGD.permute(1, 2, 0, 3)
        v_BGSD = v_SBGD.permute(1, 2, 0, 3)
        o_BHSD = F.scaled_dot_product_attention(
            q_BHSD, k_BGSD, v_BGSD, is_causal=True, enable_gqa=self.num_groups != self.num_heads
        )
        o_SBX = o_BHSD.permute(2, 0, 1, 3).reshape(S, B, self.num_heads * self.head_dim)
        return self.linear_proj(o_SBX)


class AttentionLayer(nn.Module):
    """Hybrid `*` layer: returns the attention branch output (no residual)."""

    def __init__(self, cfg: HybridConfig):
        super().__init__()
        self.self_attention = SelfAttention(cfg)

    def forward(self, u_SBC: Tensor) -> Tensor:
        return self.self_attention(u_SBC)
