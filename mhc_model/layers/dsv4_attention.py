"""DeepSeek-V4 attention layers `C` (compressed sparse, ratio 4), `H` (heavily compressed,
ratio 128) and `W` (sliding window only), Megatron dev's HybridModel layout.

models/hybrid/hybrid_layer_specs.py ``hybrid_dsv4_stack_spec``: a TransformerLayer with a
separate ``input_layernorm`` and ``DSv4HybridSelfAttention``
(experimental_attention_variant/deepseek_v4_hybrid_attention.py) whose compress ratio the
symbol fixes (C 4, H 128, W 0). Keys after ``decoder.layers.{i}.`` (H heads, v = v_head_dim,
R = q_lora_rank, G = o_groups, L = o_lora_rank; the core attention's keys in ``csa.py``):

- ``input_layernorm.weight`` [C]
- ``self_attention.linear_o_group_proj`` [G*L, H*v/G] (a bare Parameter)
- ``self_attention.core_attention.*``
- ``self_attention.linear_proj.weight`` [C, G*L]
- ``self_attention.linear_q_down_proj.weight`` [R, C]
- ``self_attention.linear_q_up_proj.weight`` [H*v, R]
- ``self_attention.linear_kv_proj.weight`` [v, C]
- with ``qk_layernorm``: ``self_attention.kv_layernorm.weight`` [v],
  ``self_attention.q_layernorm.weight`` [R] (else Megatron's IdentityOp: no keys)

Forward (DSv4HybridSelfAttention.get_query_key_value_tensors and forward, SBHD, no CP):
``qr = q_layernorm(q_down(x))``; per head ``q = q_up(qr)`` RMS-normalised without weight
(``_q_rms_norm``, eps = layernorm_epsilon); one shared ``kv = kv_layernorm(kv_proj(x))`` that
is both key and value; q and kv roped on their last ``qk_pos_emb_head_dim`` dims at positions
0..S-1 (csa_rope.py); core attention (csa.py); the output's rope part rotated back; then the
grouped low-rank output: heads in G consecutive groups, group g through its own [L, H*v/G]
block of ``linear_o_group_proj``, and ``linear_proj`` on the G*L concatenation.

Megatron dsv4 (26b830a6) has `C` and `H` but no `W`; it builds both from one spec and takes
each layer's ratio from ``csa_compress_ratios`` (not from the symbol), and always builds the
q/kv norms (TENorm). The keys and shapes above are dev's.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mhc_model.config import HybridConfig
from mhc_model.layers.common import Linear, RMSNorm, output_std, torch_dtype
from mhc_model.layers.csa import CompressedSparseAttention
from mhc_model.layers.csa_rope import angles, plain_inv_freq, rope_tail, yarn_inv_freq

COMPRESS_RATIO = {"C": 4, "H": 128, "W": 0}  # hybrid_layer_specs.py hybrid_dsv4_stack_spec


class DSv4SelfAttention(nn.Module):
    def __init__(self, cfg: HybridConfig, ratio: int):
        super().__init__()
        mla, csa = cfg.mla, cfg.csa
        C, eps, std = cfg.hidden_size, cfg.norm_eps, cfg.init_std
        dtype = torch_dtype(cfg)
        self.heads = H = cfg.attention.num_attention_heads
        self.v, self.pos_dim, self.eps = mla.v_head_dim, mla.qk_pos_emb_head_dim, eps
        self.groups = G = csa.o_groups
        # C, H: YaRN rope at the compressed base; W: plain rope at rotary_base. Computed per
        # forward (never a buffer: a dtype cast of the module must not round the frequencies)
        self.rope_args = ((self.pos_dim, csa.compress_rotary_base, csa.rotary_scaling_factor,
                           csa.original_max_position_embeddings, csa.beta_fast, csa.beta_slow)
                          if ratio > 1 else (self.pos_dim, mla.rotary_base))
        # Creation (and so state_dict) order as Megatron's __init__
        self.core_attention = CompressedSparseAttention(cfg, ratio, dtype)
        self.linear_o_group_proj = nn.Parameter(
            torch.empty(G * csa.o_lora_rank, H * self.v // G, dtype=dtype))
        nn.init.normal_(self.linear_o_group_proj, std=std)
        self.linear_proj = Linear(G * csa.o_lora_rank, C, dtype, output_std(cfg))
        self.linear_q_down_proj = Linear(C, mla.q_lora_rank, dtype, std)
        self.linear_q_up_proj = Linear(mla.q_lora_rank, H * self.v, dtype, std)
        self.linear_kv_proj = Linear(C, self.v, dtype, std)
        qk_norm = cfg.attention.qk_layernorm
        self.kv_layernorm = RMSNorm(self.v, eps, dtype) if qk_norm else None
        self.q_layernorm = RMSNorm(mla.q_lora_rank, eps, dtype) if qk_norm else None

    def forward(self, x_SBC: Tensor) -> Tensor:
        S, B, _ = x_SBC.shape
        inv_freq_F = (yarn_inv_freq(*self.rope_args) if len(self.rope_args) > 2
                      else plain_inv_freq(*self.rope_args)).to(x_SBC.device)
        qr_SBR = self.linear_q_down_proj(x_SBC)
        if self.q_layernorm is not None:
            qr_SBR = self.q_layernorm(qr_SBR)
        q_SBHV = self.linear_q_up_proj(qr_SBR).view(S, B, self.heads, self.v)
        # weightless RMS norm per head, in q's dtype (deepseek_v4_hybrid_attention _q_rms_norm)
        q_SBHV = q_SBHV * torch.rsqrt(q_SBHV.square().mean(-1, keepdim=True) + self.eps)
        kv_SBV = self.linear_kv_proj(x_SBC)
        if self.kv_layernorm is not None:
            kv_SBV = self.kv_layernorm(kv_SBV)
        ang_SF = angles(S, inv_freq_F, device=x_SBC.device)
        q_SBHV = rope_tail(q_SBHV, self.pos_dim, ang_SF)
        kv_SBV = rope_tail(kv_SBV, self.pos_dim, ang_SF)
        o_SBHV = self.core_attention(q_SBHV, kv_SBV, x_SBC, qr_SBR, inv_freq_F)
        o_SBHV = rope_tail(o_SBHV, self.pos_dim, ang_SF, inverse=True)
        G = self.groups
        o_SBGX = o_SBHV.reshape(S, B, G, -1)
        w_GLX = self.linear_o_group_proj.view(G, -1, o_SBGX.shape[-1])
        o_SBGL = torch.einsum("sbgx,glx->sbgl", o_SBGX, w_GLX)
        return self.linear_proj(o_SBGL.reshape(S, B, -1))


class DSv4AttentionLayer(nn.Module):
    """A `C`/`H`/`W` layer: input_layernorm then DSv4 attention; returns the branch output."""

    symbol = "W"

    def __init__(self, cfg: HybridConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps, torch_dtype(cfg))
        self.self_attention = DSv4SelfAttention(cfg, COMPRESS_RATIO[self.symbol])

    def forward(self, u_SBC: Tensor) -> Tensor:
        return self.self_attention(self.input_layernorm(u_SBC))


class CSALayer(DSv4AttentionLayer):
    symbol = "C"


class HCALayer(DSv4AttentionLayer):
    symbol = "H"


class WindowAttentionLayer(DSv4AttentionLayer):
    symbol = "W"
