"""DeepSeek sparse attention layer (`D`) = MLA + the lightning indexer, Megatron-Core TE spec.

models/hybrid/hybrid_layer_specs.py (``dsa_layer``): TransformerLayer with a separate
``input_layernorm=TENorm`` and AbsorbedMLASelfAttention (same projection names and shapes as
MLA, kv up projection kept combined as ``linear_kv_up_proj``) whose ``core_attention`` is
DSAttention holding ``indexer`` = DSAIndexer (experimental_attention_variant/dsa.py). Keys beyond
MLA's (see mla.py), with n = index_n_heads, d = index_head_dim, R = q_lora_rank (or C):

- ``self_attention.core_attention.indexer.linear_wq_b.weight`` [n*d, R]   (TELinear)
- ``self_attention.core_attention.indexer.linear_wk.weight`` [d, C]       (TELinear)
- ``self_attention.core_attention.indexer.k_norm.weight`` / ``.bias`` [d]
  (TENorm built with normalization forced to "LayerNorm": weight and bias)
- ``self_attention.core_attention.indexer.linear_weights_proj.weight`` [n, C] (TELinear)

With ``qk_layernorm`` DSA cannot fuse the latent norms (mla_qk_norm_config.py
``_resolve_dsa_qk_layernorm``): they are standalone ``self_attention.q_layernorm.weight`` [R] and
``self_attention.kv_layernorm.weight`` [kv_lora], and the up projections carry no
``layer_norm_weight``.

Indexer math (DSAIndexer.forward_before_topk / fused_qk_topk_naive, DeepSeek-V3.2 defaults):
q = wq_b(qr) per indexer head, k = LayerNorm(wk(x)) shared by heads, RoPE (non-interleaved,
``dsa_indexer_rope_interleaved=False``) on the first dpe dims of each, head weights
``w = weights_proj(x) * n^-0.5 * d^-0.5``, score[s, t] = sum_h w_h * ReLU(q_h . k_t) in fp32,
future keys at -inf, top-k per query; keys whose score is -inf are dropped. The Hadamard
``rotate_activation`` Megatron applies to q and k is orthonormal (scale d^-0.5), so it leaves
every q.k unchanged and is omitted here. Like Megatron without the indexer KL loss, the indexer
sees detached inputs and runs without grad: the main loss never trains it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mhc_model.config import HybridConfig
from mhc_model.layers.common import Linear, RMSNorm, torch_dtype
from mhc_model.layers.mla import MLAProjections, mla_attend
from mhc_model.layers.rope import apply_rope, rope_angles


class LayerNorm(nn.Module):
    """TE LayerNorm (``weight`` = 1, ``bias`` = 0), computed in fp32 like TE's kernel."""

    def __init__(self, size: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(size, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        y = F.layer_norm(x.float(), x.shape[-1:], self.weight.float(), self.bias.float(), self.eps)
        return y.to(x.dtype)


class DSAIndexer(nn.Module):
    def __init__(self, cfg: HybridConfig):
        super().__init__()
        mla = cfg.mla
        C = cfg.hidden_size
        dtype = torch_dtype(cfg)
        std = cfg.init_std
        if mla.index_head_dim < mla.qk_pos_emb_head_dim:
            raise ValueError(
                f"mla.index_head_dim={mla.index_head_dim} must be >= mla.qk_pos_emb_head_dim="
                f"{mla.qk_pos_emb_head_dim} (the indexer ropes its first qk_pos_emb_head_dim dims)"
            )
        self.n_heads = mla.index_n_heads
        self.head_dim = mla.index_head_dim
        self.pos_dim = mla.qk_pos_emb_head_dim
        self.topk = mla.index_topk
        self.rotary_base = mla.rotary_base
        q_in = mla.q_lora_rank if mla.q_lora_rank is not None else C
        self.linear_wq_b = Linear(q_in, self.n_heads * self.head_dim, dtype, std)
        self.linear_wk = Linear(C, self.head_dim, dtype, std)
        self.k_norm = LayerNorm(self.head_dim, cfg.norm_eps, dtype)
        self.linear_weights_proj = Linear(C, self.n_heads, dtype, std)

    def _rope(self, x_SBHD: Tensor, angles_SF: Tensor) -> Tensor:
        # DeepSeek/Megatron put the rope part first and the no-rope part after.
        pe, nope = torch.split(x_SBHD, [self.pos_dim, self.head_dim - self.pos_dim], dim=-1)
        return torch.cat([apply_rope(pe, angles_SF), nope], dim=-1)

    def scores(self, x_SBC: Tensor, qr_SBR: Tensor) -> Tensor:
        """Index scores [B, S(query), S(key)] in fp32, future keys at -inf."""
        S, B, _ = x_SBC.shape
        angles_SF = rope_angles(S, self.pos_dim, self.rotary_base, x_SBC.device)
        q_SBND = self.linear_wq_b(qr_SBR).view(S, B, self.n_heads, self.head_dim)
        q_SBND = self._rope(q_SBND, angles_SF)
        k_SB1D = self.k_norm(self.linear_wk(x_SBC)).view(S, B, 1, self.head_dim)
        k_SBD = self._rope(k_SB1D, angles_SF).view(S, B, self.head_dim)
        w_SBN = self.linear_weights_proj(x_SBC) * (self.n_heads**-0.5 * self.head_dim**-0.5)
        logits_SBNT = torch.einsum("sbnd,tbd->sbnt", q_SBND.float(), k_SBD.float())
        scores_BST = (logits_SBNT.relu() * w_SBN.float()[..., None]).sum(dim=2).transpose(0, 1)
        future_SS = torch.ones(S, S, dtype=torch.bool, device=x_SBC.device).triu(1)
        return scores_BST.masked_fill(future_SS, float("-inf"))

    def allowed_mask(self, x_SBC: Tensor, qr_SBR: Tensor) -> Tensor:
        """Bool [B, S, S]: True where the query keeps the key (its top-k causal keys)."""
        scores_BST = self.scores(x_SBC, qr_SBR)
        k = min(self.topk, scores_BST.shape[-1])
        top_val_BSK, top_idx_BSK = scores_BST.topk(k, dim=-1)
        # A top-k slot whose score is -inf is a future key picked only because fewer than k
        # causal keys exist: Megatron marks it -1 (dropped). Out-of-place scatter so selective
        # activation checkpointing never sees a cached tensor mutated.
        empty_BST = torch.zeros_like(scores_BST, dtype=torch.bool)
        return empty_BST.scatter(-1, top_idx_BSK, torch.isfinite(top_val_BSK))


class DSAttention(nn.Module):
    """Container matching Megatron's ``core_attention`` (holds ``indexer``)."""

    def __init__(self, cfg: HybridConfig):
        super().__init__()
        self.indexer = DSAIndexer(cfg)


class DSASelfAttention(MLAProjections):
    def __init__(self, cfg: HybridConfig):
        super().__init__(cfg, norm_style="separate", core_attention=DSAttention(cfg))

    def forward(self, x_SBC: Tensor) -> Tensor:
        q_SBHE, k_SBHE, v_SBHV, qr_SBR = self.qkv(x_SBC)
        with torch.no_grad():
            allowed_BSS = self.core_attention.indexer.allowed_mask(x_SBC.detach(), qr_SBR.detach())
        # Absorbed MLA (Megatron's DSA path) is algebraically the same attention as this
        # expanded form, so sparse DSA reduces to dense MLA when every causal key is kept.
        o_SBX = mla_attend(q_SBHE, k_SBHE, v_SBHV, self.softmax_scale, allowed_BSS)
        return self.linear_proj(o_SBX)


class DSALayer(nn.Module):
    """Hybrid `D` layer: input_layernorm then sparse MLA; returns the branch output."""

    def __init__(self, cfg: HybridConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps, torch_dtype(cfg))
        self.self_attention = DSASelfAttention(cfg)

    def forward(self, u_SBC: Tensor) -> Tensor:
        return self.self_attention(self.input_layernorm(u_SBC))
