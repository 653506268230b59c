"""Chunked SSD (Mamba2 state-space duality) scan in plain PyTorch, fp32 math.

Per head ``h`` (with its group ``g = h // (H / G)``) the Mamba2 recurrence is

    dt_t = softplus(dt_raw_t + dt_bias_h)                 (when ``dt_softplus``)
    s_t  = exp(dt_t * A_h) * s_{t-1} + dt_t * x_t B_t^T   s: [P, N], A_h < 0
    y_t  = s_t C_t + D_h * x_t

SSD (Dao & Gu 2024, "Transformers are SSMs", §6) evaluates it in chunks of ``L`` steps: inside a
chunk the map is a masked "attention" ``(C B^T ⊙ decay) (dt x)`` (quadratic in L, parallel);
across chunks only the [P, N] state is carried, so the sequential part is S / L steps long.

The signature mirrors ``mamba_ssm.ops.triton.ssd_combined.mamba_chunk_scan_combined`` (layout
``[batch, seq, heads, head_dim]``, A already negative) so the GPU kernel is a drop-in.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _segsum_decay(a_BHKL: Tensor) -> Tensor:
    """exp(sum_{s < i <= t} a_i) for s <= t, else 0 -> [B, H, K, L(t), L(s)].

    Built from the within-chunk cumulative sum; the upper triangle is masked *before* the exp
    so no overflowing values (a <= 0, so t < s would give exp(positive)) are ever formed.
    """
    cs_BHKL = torch.cumsum(a_BHKL, dim=-1)
    diff_BHKLL = cs_BHKL[..., :, None] - cs_BHKL[..., None, :]
    L = a_BHKL.shape[-1]
    causal_LL = torch.ones(L, L, dtype=torch.bool, device=a_BHKL.device).tril()
    return torch.exp(diff_BHKLL.masked_fill(~causal_LL, float("-inf")))


def ssd_chunk_scan(
    x_BSHP: Tensor,
    dt_BSH: Tensor,
    A_H: Tensor,
    B_BSGN: Tensor,
    C_BSGN: Tensor,
    chunk_size: int,
    D_H: Tensor | None = None,
    dt_bias_H: Tensor | None = None,
    dt_softplus: bool = True,
    initial_state_BHPN: Tensor | None = None,
    return_final_state: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Chunked SSD scan.

    Args:
        x_BSHP: inputs ``[batch, seq, heads, head_dim]``.
        dt_BSH: raw time steps (before ``dt_bias`` / softplus) ``[batch, seq, heads]``.
        A_H: the (negative) continuous-time decay per head, ``-exp(A_log)``.
        B_BSGN, C_BSGN: input / output projections, shared by the ``H / G`` heads of a group.
        chunk_size: chunk length ``L``; any ``seq`` works (padded internally).
        D_H: optional skip ``y += D * x``.
        dt_bias_H: optional bias added to ``dt`` before the softplus.
        initial_state_BHPN: optional state entering the sequence.
        return_final_state: also return the state after the last real token.

    Returns ``y_BSHP`` in ``x``'s dtype (and the fp32 final state ``[B, H, P, N]``).
    """
    Bsz, S, H, P = x_BSHP.shape
    G, N = B_BSGN.shape[-2:]
    if H % G:
        raise ValueError(f"ssd_chunk_scan: heads={H} not divisible by groups={G}")
    if chunk_size <= 0:
        raise ValueError(f"ssd_chunk_scan: chunk_size must be > 0, got {chunk_size}")
    R = H // G  # heads per group
    out_dtype = x_BSHP.dtype

    x = x_BSHP.float()
    dt = dt_BSH.float()
    if dt_bias_H is not None:
        dt = dt + dt_bias_H.float()
    if dt_softplus:
        dt = F.softplus(dt)
    A = A_H.float()
    Bm = B_BSGN.float()
    Cm = C_BSGN.float()

    # Pad the tail to a whole number of chunks. The padded steps have dt = 0 (decay exp(0) = 1,
    # input dt * x B^T = 0) so the final state is exactly the state after the last real token,
    # and by causality no real output depends on them.
    L = chunk_size
    pad = (-S) % L
    if pad:
        x = F.pad(x, (0, 0, 0, 0, 0, pad))
        dt = F.pad(dt, (0, 0, 0, pad))
        Bm = F.pad(Bm, (0, 0, 0, 0, 0, pad))
        Cm = F.pad(Cm, (0, 0, 0, 0, 0, pad))
    K = (S + pad) // L

    x_BKLHP = x.view(Bsz, K, L, H, P)
    dt_BKLH = dt.view(Bsz, K, L, H)
    B_BKLGN = Bm.view(Bsz, K, L, G, N)
    C_BKLGN = Cm.view(Bsz, K, L, G, N)

    # Log-decay per step a_t = dt_t * A_h (<= 0), laid out for the within-chunk cumsum.
    a_BHKL = (dt_BKLH * A).permute(0, 3, 1, 2)
    acs_BHKL = torch.cumsum(a_BHKL, dim=-1)

    # 1) Intra-chunk (diagonal blocks): y_t += sum_{s<=t} (C_t . B_s) exp(acs_t - acs_s) dt_s x_s.
    #    C.B is computed once per group and shared by its R heads.
    CB_BKGLL = torch.einsum("bktgn,bksgn->bkgts", C_BKLGN, B_BKLGN)
    CB_BKHLL = CB_BKGLL.repeat_interleave(R, dim=2)
    decay_BKHLL = _segsum_decay(a_BHKL).permute(0, 2, 1, 3, 4)
    scores_BKHLL = CB_BKHLL * decay_BKHLL * dt_BKLH.permute(0, 1, 3, 2)[:, :, :, None, :]
    y_BKLHP = torch.einsum("bkhts,bkshp->bkthp", scores_BKHLL, x_BKLHP)

    # 2) Each chunk's own contribution to the state at its end:
    #    sum_s exp(acs_L - acs_s) dt_s x_s B_s^T.
    B_BKLHN = B_BKLGN.repeat_interleave(R, dim=3)
    C_BKLHN = C_BKLGN.repeat_interleave(R, dim=3)
    to_end_BHKL = torch.exp(acs_BHKL[..., -1:] - acs_BHKL)
    w_BKLH = (to_end_BHKL.permute(0, 2, 3, 1) * dt_BKLH)
    chunk_state_BKHPN = torch.einsum("bklh,bklhp,bklhn->bkhpn", w_BKLH, x_BKLHP, B_BKLHN)

    # 3) Inter-chunk recurrence on the [P, N] states (the only sequential part, K steps):
    #    s_in[k+1] = exp(sum of a over chunk k) * s_in[k] + chunk_state[k].
    chunk_decay_BKH = torch.exp(acs_BHKL[..., -1]).permute(0, 2, 1)
    if initial_state_BHPN is None:
        state_BHPN = x.new_zeros(Bsz, H, P, N)
    else:
        state_BHPN = initial_state_BHPN.float()
    entering = []
    for k in range(K):
        entering.append(state_BHPN)
        state_BHPN = chunk_decay_BKH[:, k, :, None, None] * state_BHPN + chunk_state_BKHPN[:, k]
    entering_BKHPN = torch.stack(entering, dim=1)

    # 4) Off-diagonal output: the state entering the chunk, decayed to step t, read out by C_t.
    from_start_BKLH = torch.exp(acs_BHKL).permute(0, 2, 3, 1)
    y_BKLHP = y_BKLHP + torch.einsum(
        "bklhn,bkhpn,bklh->bklhp", C_BKLHN, entering_BKHPN, from_start_BKLH
    )

    y_BSHP = y_BKLHP.reshape(Bsz, K * L, H, P)[:, :S]
    if D_H is not None:
        y_BSHP = y_BSHP + D_H.float()[:, None] * x[:, :S]
    y_BSHP = y_BSHP.to(out_dtype)
    if return_final_state:
        return y_BSHP, state_BHPN
    return y_BSHP
