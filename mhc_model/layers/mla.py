"""Multi-latent attention layer (`+`), Megatron-Core HybridModel TE spec.

models/hybrid/hybrid_layer_specs.py (``mla_layer``) builds a TransformerLayer with a separate
``input_layernorm=TENorm`` (NOT fused into the first linear: the input feeds two down
projections) and MLASelfAttention with linear_q_down_proj / linear_kv_down_proj = TELinear,
linear_q_up_proj / linear_kv_up_proj = TEColumnParallelLinear, q/kv_layernorm = IdentityOp.
transformer/mla_qk_norm_config.py then resolves ``qk_layernorm=True`` for MLA by swapping the up
projections (or linear_q_proj when q_lora_rank is None) for TELayerNormColumnParallelLinear, so
the latent norms are stored as ``layer_norm_weight`` inside them. Keys (H heads):

- ``input_layernorm.weight`` [C]
- q_lora_rank set: ``self_attention.linear_q_down_proj.weight`` [q_lora, C],
  ``self_attention.linear_q_up_proj.weight`` [H*(dqk+dpe), q_lora]
  (+ ``linear_q_up_proj.layer_norm_weight`` [q_lora] with qk_layernorm);
  q_lora_rank None: ``self_attention.linear_q_proj.weight`` [H*(dqk+dpe), C]
  (+ ``linear_q_proj.layer_norm_weight`` [C] with qk_layernorm)
- ``self_attention.linear_kv_down_proj.weight`` [kv_lora + dpe, C]
- ``self_attention.linear_kv_up_proj.weight`` [H*(dqk+dv), kv_lora]
  (+ ``linear_kv_up_proj.layer_norm_weight`` [kv_lora] with qk_layernorm)
- ``self_attention.linear_proj.weight`` [C, H*dv]

Math follows MLASelfAttention.get_query_key_value_tensors (multi_latent_attention.py): the kv
down projection output is ``[kv_latent | k_pe]``; per head q is ``[q_nope | q_pe]`` and kv up is
``[k_nope | v]``; decoupled RoPE (MLA-interleaved) on q_pe and the single shared k_pe; softmax
scale ``1/sqrt(dqk + dpe)`` (rope_type "rope": no YaRN mscale).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mhc_model.config import HybridConfig
from mhc_model.layers.common import (
    LayerNormLinear,
    Linear,
    RMSNorm,
    output_std,
    torch_dtype,
)
from mhc_model.layers.rope import apply_rope, rope_angles


def mla_attend(q_SBHE: Tensor, k_SBHE: Tensor, v_SBHV: Tensor, scale: float,
               allowed_BSS: Tensor | None = None) -> Tensor:
    """Softmax attention over heads; ``allowed_BSS`` (bool, True = may attend) replaces the
    plain causal mask when given (DSA's top-k mask). Returns [S, B, H*V]."""
    S, B, H, V = v_SBHV.shape
    q_BHSE = q_SBHE.permute(1, 2, 0, 3)
    k_BHSE = k_SBHE.permute(1, 2, 0, 3)
    v_BHSV = v_SBHV.permute(1, 2, 0, 3)
    if allowed_BSS is None:
        o_BHSV = F.scaled_dot_product_attention(q_BHSE, k_BHSE, v_BHSV, is_causal=True,
                                                scale=scale)
    else:
        o_BHSV = F.scaled_dot_product_attention(q_BHSE, k_BHSE, v_BHSV,
                                                attn_mask=allowed_BSS[:, None], scale=scale)
    return o_BHSV.permute(2, 0, 1, 3).reshape(S, B, H * V)


class MLAProjections(nn.Module):
    """The MLA self-attention parameters (shared by MLA and DSA) and q/k/v construction.

    ``norm_style`` is how ``qk_layernorm`` is stored: ``"fused"`` (MLA: ``layer_norm_weight``
    inside the up projections) or ``"separate"`` (DSA: standalone ``q_layernorm`` /
    ``kv_layernorm`` modules, because DSA's indexer consumes the normalised q latent)."""

    def __init__(self, cfg: HybridConfig, norm_style: str,
                 core_attention: nn.Module | None = None):
        super().__init__()
        mla = cfg.mla
        C = cfg.hidden_size
        dtype = torch_dtype(cfg)
        std, eps = cfg.init_std, cfg.norm_eps
        self.num_heads = H = cfg.attention.num_attention_heads
        self.q_lora_rank = mla.q_lora_rank
        self.kv_lora_rank = mla.kv_lora_rank
        self.qk_head_dim = mla.qk_head_dim
        self.pos_dim = mla.qk_pos_emb_head_dim
        self.v_head_dim = mla.v_head_dim
        self.rotary_base = mla.rotary_base
        self.softmax_scale = 1.0 / math.sqrt(mla.qk_head_dim + mla.qk_pos_emb_head_dim)
        qk_norm = cfg.attention.qk_layernorm  # Megatron's single `qk_layernorm` flag
        fused = qk_norm and norm_style == "fused"
        separate = qk_norm and norm_style == "separate"
        q_rows = H * (mla.qk_head_dim + mla.qk_pos_emb_head_dim)
        kv_rows = H * (mla.qk_head_dim + mla.v_head_dim)

        def up(in_f: int, out_f: int) -> nn.Module:
            if fused:
                return LayerNormLinear(in_f, out_f, dtype, std, eps)
            return Linear(in_f, out_f, dtype, std)

        # Creation (and so state_dict) order follows Megatron's __init__: core attention (DSA's
        # indexer lives there), linear_proj, q, kv down, kv up, then the norms.
        if core_attention is not None:
            self.core_attention = core_attention
        self.linear_proj = Linear(H * mla.v_head_dim, C, dtype, output_std(cfg))
        if mla.q_lora_rank is None:
            self.linear_q_proj = up(C, q_rows)
        else:
            self.linear_q_down_proj = Linear(C, mla.q_lora_rank, dtype, std)
            self.linear_q_up_proj = up(mla.q_lora_rank, q_rows)
        self.linear_kv_down_proj = Linear(C, mla.kv_lora_rank + mla.qk_pos_emb_head_dim, dtype, std)
        self.linear_kv_up_proj = up(mla.kv_lora_rank, kv_rows)
        self.q_layernorm: nn.Module | None = None
        self.kv_layernorm: nn.Module | None = None
        if separate:
            if mla.q_lora_rank is None:
                # mla_qk_norm_config.py rejects this combination for DSA too.
                raise ValueError(
                    "DSA with attention.qk_layernorm=True needs mla.q_lora_rank (Megatron cannot "
                    "fuse the q norm into linear_q_proj for DSA)"
                )
            self.q_layernorm = RMSNorm(mla.q_lora_rank, eps, dtype)
            self.kv_layernorm = RMSNorm(mla.kv_lora_rank, eps, dtype)

    def qkv(self, x_SBC: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Normed input -> (q [S,B,H,dqk+dpe], k [S,B,H,dqk+dpe], v [S,B,H,dv], q latent).
        The q latent is after the q norm (what Megatron hands DSA's indexer as ``qr``); without
        q_lora_rank it is the input itself."""
        S, B, _ = x_SBC.shape
        H = self.num_heads
        if self.q_lora_rank is None:
            qr_SBR = x_SBC
            q_SBX = self.linear_q_proj(x_SBC)
        else:
            qr_SBR = self.linear_q_down_proj(x_SBC)
            if self.q_layernorm is not None:
                qr_SBR = self.q_layernorm(qr_SBR)
            q_SBX = self.linear_q_up_proj(qr_SBR)
        kv_SBX = self.linear_kv_down_proj(x_SBC)
        kv_lat_SBL, k_pe_SBP = torch.split(kv_SBX, [self.kv_lora_rank, self.pos_dim], dim=-1)
        if self.kv_layernorm is not None:
            kv_lat_SBL = self.kv_layernorm(kv_lat_SBL)
        q_SBHE = q_SBX.view(S, B, H, self.qk_head_dim + self.pos_dim)
        kv_SBHX = self.linear_kv_up_proj(kv_lat_SBL).view(S, B, H,
                                                          self.qk_head_dim + self.v_head_dim)
        q_nope, q_pe = torch.split(q_SBHE, [self.qk_head_dim, self.pos_dim], dim=-1)
        k_nope, v_SBHV = torch.split(kv_SBHX, [self.qk_head_dim, self.v_head_dim], dim=-1)
        angles_SF = rope_angles(S, self.pos_dim, self.rotary_base, x_SBC.device)
        q_pe = apply_rope(q_pe, angles_SF, mla_interleaved=True)
        k_pe_SB1P = apply_rope(k_pe_SBP[:, :, None, :], angles_SF, mla_interleaved=True)
        # One rope key shared by all heads (decoupled RoPE).
        q_SBHE = torch.cat([q_nope, q_pe], dim=-1)
        k_SBHE = torch.cat([k_nope, k_pe_SB1P.expand(S, B, H, self.pos_dim)], dim=-1)
        return q_SBHE, k_SBHE, v_SBHV, qr_SBR


class MLASelfAttention(MLAProjections):
    def __init__(self, cfg: HybridConfig):
        super().__init__(cfg, norm_style="fused")

    def forward(self, x_SBC: Tensor) -> Tensor:
        q_SBHE, k_SBHE, v_SBHV, _ = self.qkv(x_SBC)
        return self.linear_proj(mla_attend(q_SBHE, k_SBHE, v_SBHV, self.softmax_scale))


class MLALayer(nn.Module):
    """Hybrid `+` layer: input_layernorm then MLA; returns the branch output (no residual)."""

    def __init__(self, cfg: HybridConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps, torch_dtype(cfg))
        self.self_attention = MLASelfAttention(cfg)

    def forward(self, u_SBC: Tensor) -> Tensor:
        return self.self_attention(self.input_layernorm(u_SBC))
