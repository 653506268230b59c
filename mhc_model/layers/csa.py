"""DeepSeek-V4 compressed sparse attention core (`core_attention` of the `C`, `H`, `W` layers):
Megatron dev's ``transformer/experimental_attention_variant/csa.py`` (Compressor, CSAIndexer,
CompressedSparseAttention), SBHD layout, our own reference implementation (dense masked
attention over the selected keys, no fused kernels, no chunking).

Keys (relative to ``self_attention.core_attention.``; d = head dim, r = compress ratio,
coff = 2 for r = 4 (overlapping windows), else 1):

- ``attn_sink`` [H] fp32 (kept in fp32 whatever the params dtype: ``mark_keep_in_fp32``)
- r > 1: ``compressor.{linear_wkv,linear_wgate}.weight`` [coff*v, C], ``compressor.ape``
  [r, coff*v] fp32, ``compressor.norm.weight`` [v]
- r = 4 (and not ``csa_dense_mode``): ``indexer.linear_wq_b.weight`` [n*dI, q_lora],
  ``indexer.linear_weights_proj.weight`` [n, C], ``indexer.compressor.*`` as above with
  head dim dI = index_head_dim.

Math (csa.py ``Compressor._forward_sbhd``, ``CSAIndexer.forward``,
``CompressedSparseAttention._forward_unfused_csa`` and ``unfused_compressed_sparse_attn``):
the compressor pools each block of r tokens (the last ``S mod r`` tokens are not pooled) with
softmax(wgate(x) + ape) weights over the block (r = 4: over the previous block's first half and
this block's second half of the projection columns, 2r rows), RMS-normalises and ropes the pooled
entry at position ``j*r``. Query i may attend its sliding window (the last ``window_size`` tokens
up to itself) and the compressed entries j < (i+1) // r: all of them for r = 128 (and dense
mode), the indexer's top-k for r = 4. The indexer scores compressed entries as
``sum_h w_h relu(q_h . k_j)``, q from ``qr`` (roped at position i), k from its own compressor.
Its Hadamard ``rotate_activation`` of q and k is orthonormal and leaves every q.k unchanged, so it
is omitted; its positive weight scale ``n^-0.5`` does not move the top-k either, kept anyway. The
indexer sees detached inputs and no grad: without the indexer KL loss the main loss never trains
it (as in Megatron). Attention is single-key-head (MQA, key = value = kv) with a learned per-head
sink logit in the softmax denominator, scale ``v_head_dim^-0.5``, in fp32.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mhc_model.config import HybridConfig
from mhc_model.layers.common import Linear, RMSNorm
from mhc_model.layers.csa_rope import angles, rope_tail


class Compressor(nn.Module):
    def __init__(self, hidden: int, head_dim: int, ratio: int, pos_dim: int, eps: float,
                 dtype: torch.dtype, std: float):
        super().__init__()
        self.ratio, self.head_dim, self.pos_dim = ratio, head_dim, pos_dim
        self.overlap = ratio == 4
        cols = (2 if self.overlap else 1) * head_dim
        # Own parameter first, as Megatron's module lists it (before its submodules)
        self.ape = nn.Parameter(torch.empty(ratio, cols, dtype=torch.float32))
        nn.init.normal_(self.ape, std=std)
        self.linear_wkv = Linear(hidden, cols, dtype, std)
        self.linear_wgate = Linear(hidden, cols, dtype, std)
        self.norm = RMSNorm(head_dim, eps, dtype)

    def _overlap(self, t_NRBX: Tensor, fill: float) -> Tensor:
        """[N, r, B, 2d] -> [N, 2r, B, d]: rows r.. are this block's second column half, rows
        ..r the previous block's first half (``fill`` for block 0), csa.py _overlap_transform."""
        N, r, B, _ = t_NRBX.shape
        d = self.head_dim
        prev_NRBD = torch.cat([torch.full_like(t_NRBX[:1, ..., :d], fill), t_NRBX[:-1, ..., :d]])
        return torch.cat([prev_NRBD, t_NRBX[..., d:]], dim=1)

    def forward(self, x_SBC: Tensor, inv_freq_F: Tensor) -> Tensor | None:
        """Pooled entries [S // r, B, d], or None when S < r."""
        S, B, _ = x_SBC.shape
        N = S // self.ratio
        if N == 0:
            return None
        cut = N * self.ratio
        kv_NRBX = self.linear_wkv(x_SBC[:cut]).view(N, self.ratio, B, -1)
        score_NRBX = self.linear_wgate(x_SBC[:cut]).view(N, self.ratio, B, -1)
        score_NRBX = score_NRBX + self.ape.view(1, self.ratio, 1, -1)  # fp32 from here
        if self.overlap:
            kv_NRBX = self._overlap(kv_NRBX, 0.0)
            score_NRBX = self._overlap(score_NRBX, float("-inf"))
        w_NRBX = torch.softmax(score_NRBX, dim=1, dtype=torch.float32).to(kv_NRBX.dtype)
        kv_NBD = self.norm((kv_NRBX * w_NRBX).sum(dim=1).to(x_SBC.dtype))
        ang_NF = angles(N, inv_freq_F, stride=self.ratio, device=x_SBC.device)
        return rope_tail(kv_NBD, self.pos_dim, ang_NF)


def compressed_causal(S: int, N: int, ratio: int, device: torch.device) -> Tensor:
    """Bool [S, N]: query i may see compressed entry j iff j < (i+1) // r."""
    i_S1 = torch.arange(1, S + 1, device=device)[:, None]
    return torch.arange(N, device=device)[None, :] < i_S1 // ratio


class CSAIndexer(nn.Module):
    def __init__(self, hidden: int, q_lora: int, n_heads: int, head_dim: int, topk: int,
                 pos_dim: int, eps: float, dtype: torch.dtype, std: float):
        super().__init__()
        self.n_heads, self.head_dim, self.topk, self.pos_dim = n_heads, head_dim, topk, pos_dim
        self.linear_wq_b = Linear(q_lora, n_heads * head_dim, dtype, std)
        self.linear_weights_proj = Linear(hidden, n_heads, dtype, std)
        self.compressor = Compressor(hidden, head_dim, 4, pos_dim, eps, dtype, std)

    def selected(self, x_SBC: Tensor, qr_SBR: Tensor, inv_freq_F: Tensor) -> Tensor | None:
        """Bool [B, S, N]: the compressed entries each query keeps (top-k of the causal ones),
        None when there are none."""
        S, B, _ = x_SBC.shape
        k_NBD = self.compressor(x_SBC, inv_freq_F)
        if k_NBD is None:
            return None
        N = k_NBD.shape[0]
        q_SBHD = self.linear_wq_b(qr_SBR).view(S, B, self.n_heads, self.head_dim)
        q_SBHD = rope_tail(q_SBHD, self.pos_dim, angles(S, inv_freq_F, device=x_SBC.device))
        w_SBH = self.linear_weights_proj(x_SBC) * self.n_heads**-0.5
        logits_SBHN = torch.einsum("sbhd,nbd->sbhn", q_SBHD.float(), k_NBD.float())
        scores_BSN = (logits_SBHN.relu() * w_SBH.float()[..., None]).sum(dim=2).transpose(0, 1)
        causal_SN = compressed_causal(S, N, 4, x_SBC.device)
        scores_BSN = scores_BSN.masked_fill(~causal_SN, float("-inf"))
        top_val_BSK, top_idx_BSK = scores_BSN.topk(min(self.topk, N), dim=-1)
        # a slot picked at -inf is a non-causal entry (fewer than k causal ones): dropped
        empty_BSN = torch.zeros_like(scores_BSN, dtype=torch.bool)
        return empty_BSN.scatter(-1, top_idx_BSK, torch.isfinite(top_val_BSK))


def window_mask(S: int, window: int, device: torch.device) -> Tensor:
    """Bool [S, S]: key t is in query i's window iff i - window < t <= i."""
    i_S1 = torch.arange(S, device=device)[:, None]
    t_1S = torch.arange(S, device=device)[None, :]
    return (t_1S <= i_S1) & (t_1S > i_S1 - window)


def sink_attention(q_SBHD: Tensor, kv_KBD: Tensor, allowed_BSK: Tensor, sink_H: Tensor,
                   scale: float) -> Tensor:
    """softmax over the allowed keys plus a per-head sink logit (no value); fp32 math, output
    [S, B, H, D] in q's dtype (csa.py ``unfused_compressed_sparse_attn``)."""
    scores_BHSK = torch.einsum("sbhd,kbd->bhsk", q_SBHD.float(), kv_KBD.float()) * scale
    scores_BHSK = scores_BHSK.masked_fill(~allowed_BSK[:, None], float("-inf"))
    sink_1H11 = sink_H.float().view(1, -1, 1, 1)
    top_BHS1 = torch.maximum(scores_BHSK.amax(dim=-1, keepdim=True), sink_1H11)
    e_BHSK = torch.exp(scores_BHSK - top_BHS1)
    p_BHSK = e_BHSK / (e_BHSK.sum(dim=-1, keepdim=True) + torch.exp(sink_1H11 - top_BHS1))
    return torch.einsum("bhsk,kbd->sbhd", p_BHSK, kv_KBD.float()).to(q_SBHD.dtype)


class CompressedSparseAttention(nn.Module):
    """``core_attention``: window + compressed sparse attention for one compress ratio
    (0: window only, 4: + indexer top-k, 128: + every causal compressed entry)."""

    def __init__(self, cfg: HybridConfig, ratio: int, dtype: torch.dtype):
        super().__init__()
        mla, csa = cfg.mla, cfg.csa
        C, eps, std = cfg.hidden_size, cfg.norm_eps, cfg.init_std
        heads = cfg.attention.num_attention_heads
        self.ratio, self.window = ratio, csa.window_size
        self.scale = mla.v_head_dim**-0.5
        self.attn_sink = nn.Parameter(torch.zeros(heads, dtype=torch.float32))
        pos = mla.qk_pos_emb_head_dim
        self.compressor = (Compressor(C, mla.v_head_dim, ratio, pos, eps, dtype, std)
                           if ratio > 1 else None)
        self.indexer = (CSAIndexer(C, mla.q_lora_rank, mla.index_n_heads, mla.index_head_dim,
                                   mla.index_topk, pos, eps, dtype, std)
                        if ratio == 4 and not csa.dense_mode else None)

    def forward(self, q_SBHD: Tensor, kv_SBD: Tensor, x_SBC: Tensor, qr_SBR: Tensor,
                inv_freq_F: Tensor) -> Tensor:
        S, B = kv_SBD.shape[:2]
        dev = kv_SBD.device
        allowed_BSK = window_mask(S, self.window, dev).expand(B, S, S)
        kv_KBD = kv_SBD
        comp_NBD = self.compressor(x_SBC, inv_freq_F) if self.compressor is not None else None
        if comp_NBD is not None:
            N = comp_NBD.shape[0]
            if self.indexer is not None:
                with torch.no_grad():
                    chosen_BSN = self.indexer.selected(x_SBC.detach(), qr_SBR.detach(),
                                                       inv_freq_F)
            else:
                chosen_BSN = compressed_causal(S, N, self.ratio, dev).expand(B, S, N)
            allowed_BSK = torch.cat([allowed_BSK, chosen_BSN], dim=-1)
            kv_KBD = torch.cat([kv_SBD, comp_NBD], dim=0)
        return sink_attention(q_SBHD, kv_KBD, allowed_BSK, self.attn_sink, self.scale)
