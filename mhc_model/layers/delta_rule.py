"""Chunked gated delta rule (Gated DeltaNet, Yang, Kautz & Hatamizadeh 2024) in PyTorch, fp32.

With the state stored key-major, ``h: [dk, dv]`` (the FLA layout), per head:

    alpha_t = exp(g_t)                                    g_t <= 0 (log-space decay)
    h_t     = alpha_t h_{t-1} + beta_t k_t (v_t - alpha_t h_{t-1}^T k_t)^T
    o_t     = h_t^T (scale * q_t)

which is the paper's ``S_t = S_{t-1} alpha_t (I - beta_t k_t k_t^T) + beta_t v_t k_t^T`` with
``S = h^T``. Inside a chunk of L steps, with ``G_t`` the within-chunk cumsum of ``g`` and ``h_0``
the state entering the chunk, unrolling gives ``h_t = e^{G_t} h_0 + sum_{s<=t} e^{G_t-G_s} k_s
d_s^T`` where the "deltas" ``d_s = beta_s (v_s - alpha_s h_{s-1}^T k_s)`` satisfy the unit
lower-triangular system (the WY / UT representation)

    (I + A) d = beta v - beta e^{G} k h_0,    A[s, r] = beta_s e^{G_s - G_r} k_s . k_r  (r < s)

so ``d = U - W h_0`` with ``U = T (beta v)``, ``W = T (beta e^G k)``, ``T = (I + A)^{-1}``, all
computed for every chunk at once. Only ``h`` crosses chunk boundaries (S / L sequential steps):

    o     = (q e^{G}) h_0 + (q k^T ⊙ e^{G_t - G_s} ⊙ [s <= t]) d
    h_L   = e^{G_L} h_0 + (k e^{G_L - G})^T d

Layout and argument names mirror ``fla.ops.gated_delta_rule.chunk_gated_delta_rule``
(``[batch, seq, heads, dim]``, ``g`` in log space), so the GPU kernel is a drop-in.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def chunk_gated_delta_rule_ref(
    q_BSHK: Tensor,
    k_BSHK: Tensor,
    v_BSHV: Tensor,
    g_BSH: Tensor,
    beta_BSH: Tensor,
    scale: float | None = None,
    chunk_size: int = 64,
    initial_state_BHKV: Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Chunked gated delta rule. ``q``/``k`` are used as given (normalise them before calling,
    as Megatron does); ``scale`` defaults to ``dk ** -0.5``. Any ``seq`` works (padded
    internally). Returns ``(o_BSHV in v's dtype, final fp32 state [B, H, dk, dv] or None)``."""
    Bsz, S, H, Dk = q_BSHK.shape
    Dv = v_BSHV.shape[-1]
    if k_BSHK.shape != q_BSHK.shape or v_BSHV.shape[:3] != (Bsz, S, H):
        raise ValueError(
            f"chunk_gated_delta_rule_ref: q {tuple(q_BSHK.shape)}, k {tuple(k_BSHK.shape)}, "
            f"v {tuple(v_BSHV.shape)} disagree on [batch, seq, heads]"
        )
    if chunk_size <= 0:
        raise ValueError(f"chunk_gated_delta_rule_ref: chunk_size must be > 0, got {chunk_size}")
    if scale is None:
        scale = Dk**-0.5
    out_dtype = v_BSHV.dtype

    # Head-major fp32 copies: [B, H, S, D].
    q = q_BSHK.float().transpose(1, 2) * scale
    k = k_BSHK.float().transpose(1, 2)
    v = v_BSHV.float().transpose(1, 2)
    g = g_BSH.float().transpose(1, 2)
    beta = beta_BSH.float().transpose(1, 2)

    # Pad the tail with k = v = q = 0, beta = 0, g = 0: a padded step changes nothing
    # (decay 1, delta 0), so the final state is the one after the last real token.
    L = chunk_size
    pad = (-S) % L
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        g, beta = (F.pad(t, (0, pad)) for t in (g, beta))
    K = (S + pad) // L

    q_BHKLD = q.reshape(Bsz, H, K, L, Dk)
    k_BHKLD = k.reshape(Bsz, H, K, L, Dk)
    v_BHKLV = v.reshape(Bsz, H, K, L, Dv)
    beta_BHKL = beta.reshape(Bsz, H, K, L)
    G_BHKL = g.reshape(Bsz, H, K, L).cumsum(dim=-1)

    # exp(G_t - G_s) on and below the diagonal, 0 above; masked before the exp (g <= 0, so the
    # upper triangle would be exp(positive) and can overflow).
    causal_LL = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
    decay_BHKLL = torch.exp(
        (G_BHKL[..., :, None] - G_BHKL[..., None, :]).masked_fill(~causal_LL, float("-inf"))
    )

    # WY representation: T = (I + A)^{-1}, A strictly lower triangular.
    kk_BHKLL = k_BHKLD @ k_BHKLD.transpose(-1, -2)
    strict_LL = torch.ones(L, L, dtype=torch.bool, device=q.device).tril(-1)
    A_BHKLL = (beta_BHKL[..., :, None] * kk_BHKLL * decay_BHKLL).masked_fill(~strict_LL, 0.0)
    eye_LL = torch.eye(L, dtype=q.dtype, device=q.device)
    IA_BHKLL = A_BHKLL + eye_LL
    bv_BHKLV = beta_BHKL[..., None] * v_BHKLV
    bk_BHKLD = (beta_BHKL * torch.exp(G_BHKL))[..., None] * k_BHKLD
    U_BHKLV = torch.linalg.solve_triangular(IA_BHKLL, bv_BHKLV, upper=False, unitriangular=True)
    W_BHKLD = torch.linalg.solve_triangular(IA_BHKLL, bk_BHKLD, upper=False, unitriangular=True)

    # Intra-chunk read-out weights (q_t . k_s) e^{G_t - G_s} for s <= t.
    qk_BHKLL = (q_BHKLD @ k_BHKLD.transpose(-1, -2)) * decay_BHKLL
    q_dec_BHKLD = q_BHKLD * torch.exp(G_BHKL)[..., None]
    k_to_end_BHKLD = k_BHKLD * torch.exp(G_BHKL[..., -1:] - G_BHKL)[..., None]
    chunk_decay_BHK = torch.exp(G_BHKL[..., -1])

    if initial_state_BHKV is None:
        h_BHDV = q.new_zeros(Bsz, H, Dk, Dv)
    else:
        h_BHDV = initial_state_BHKV.float()
    outs = []
    for c in range(K):
        d_BHLV = U_BHKLV[:, :, c] - W_BHKLD[:, :, c] @ h_BHDV
        outs.append(q_dec_BHKLD[:, :, c] @ h_BHDV + qk_BHKLL[:, :, c] @ d_BHLV)
        h_BHDV = (
            chunk_decay_BHK[:, :, c, None, None] * h_BHDV
            + k_to_end_BHKLD[:, :, c].transpose(-1, -2) @ d_BHLV
        )
    o_BHSV = torch.stack(outs, dim=2).reshape(Bsz, H, K * L, Dv)[:, :, :S]
    o_BSHV = o_BHSV.transpose(1, 2).contiguous().to(out_dtype)
    return o_BSHV, (h_BHDV if output_final_state else None)
