"""The coefficient epilogue (paper Eq. 15-19) on one token block, as a Triton device function.

From the D-split projection partials ``[S, T, KP]`` (lane K: the sum of squares) of BT tokens:
the fixed-order sum over the S splits, the RMS factor (Eq. 15), alpha / bias (Eq. 16), the
sigmoid gates (Eq. 17-18) and Sinkhorn-Knopp (Eq. 19), all in registers.  Run by
``triton_coef._coef_fwd_kernel`` (one program per token block); ``_rms`` / ``_load_alphas``
are shared with the coefficient backward.
"""

from __future__ import annotations

import triton
import triton.language as tl

from mhc_model.kernels.triton_sinkhorn import sinkhorn_fwd


@triton.jit
def _rms(ss, D, eps, RMS_INV_NORM: tl.constexpr):
    # Eq. 15 without gamma; rsqrt_mean: rsqrt(mean + eps), inv_norm: 1 / (rms + eps).
    if RMS_INV_NORM:
        r = 1.0 / (tl.sqrt_rn(ss) / tl.sqrt_rn(D * 1.0) + eps)
    else:
        r = 1.0 / tl.sqrt_rn(ss / D + eps)
    return r


@triton.jit
def _load_alphas(apre_ptr, apost_ptr, ares_ptr):
    a_pre = tl.load(apre_ptr).to(tl.float32)
    a_post = tl.load(apost_ptr).to(tl.float32)
    a_res = tl.load(ares_ptr).to(tl.float32)
    return a_pre, a_post, a_res


@triton.jit
def coef_index(t0, T, N: tl.constexpr, NP: tl.constexpr, BT: tl.constexpr):
    """Index tiles of BT tokens from t0: [BT, NP] (pre / post groups) and [BT, NP, NP] (res
    group, lane 2N + i N + j), with their masks."""
    t = t0 + tl.arange(0, BT)
    mt = t < T
    n = tl.arange(0, NP)
    mn = n < N
    m2 = mt[:, None] & mn[None, :]
    i3 = n[None, :, None]
    j3 = n[None, None, :]
    valid = (i3 < N) & (j3 < N)
    m3 = mt[:, None, None] & valid
    return t, mt, n, mn, t[:, None], n[None, :], m2, t[:, None, None], i3, j3, valid, m3, \
        2 * N + i3 * N + j3


@triton.jit
def gate_logits(p_pre, p_post, p_res, r, bias_ptr, apre_ptr, apost_ptr, ares_ptr, n2, mn,
                k_res, valid, N: tl.constexpr):
    """Eq. 16: h = r * proj * alpha + bias per group [pre | post | res]; also the alphas."""
    a_pre, a_post, a_res = _load_alphas(apre_ptr, apost_ptr, ares_ptr)
    b_pre = tl.load(bias_ptr + n2, mask=mn[None, :], other=0.0).to(tl.float32)
    b_post = tl.load(bias_ptr + N + n2, mask=mn[None, :], other=0.0).to(tl.float32)
    b_res = tl.load(bias_ptr + k_res, mask=valid, other=0.0).to(tl.float32)
    h_pre = r[:, None] * p_pre * a_pre + b_pre
    h_post = r[:, None] * p_post * a_post + b_post
    h_res = r[:, None, None] * p_res * a_res + b_res
    return h_pre, h_post, h_res, a_pre, a_post, a_res


@triton.jit
def coef_epi_block(part_ptr, bias_ptr, apre_ptr, apost_ptr, ares_ptr,
                   pre_ptr, post_ptr, res_ptr, proj_ptr, t0, T, D, n_split, eps,
                   N: tl.constexpr, NP: tl.constexpr, K: tl.constexpr, KP: tl.constexpr,
                   BT: tl.constexpr, ITERS: tl.constexpr, SINKHORN_SOFTMAX: tl.constexpr,
                   PRE_EPS: tl.constexpr, RMS_INV_NORM: tl.constexpr,
                   RCP_APPROX: tl.constexpr):
    """Tokens t0 .. t0 + BT: H_pre [T, N], H_post [T, N], H_res [T, N, N] and proj [T, KP]
    (the summed lanes, lane K the sum of squares, saved for the backward)."""
    t, mt, n, mn, t2, n2, m2, t3, i3, j3, valid, m3, k_res = coef_index(t0, T, N, NP, BT)
    p_pre = tl.zeros((BT, NP), tl.float32)
    p_post = tl.zeros((BT, NP), tl.float32)
    p_res = tl.zeros((BT, NP, NP), tl.float32)
    ss = tl.zeros((BT,), tl.float32)
    for s in range(n_split):
        base = part_ptr + s * T * KP
        p_pre += tl.load(base + t2 * KP + n2, mask=m2, other=0.0)
        p_post += tl.load(base + t2 * KP + N + n2, mask=m2, other=0.0)
        p_res += tl.load(base + t3 * KP + k_res, mask=m3, other=0.0)
        ss += tl.load(base + t * KP + K, mask=mt, other=0.0)
    tl.store(proj_ptr + t2 * KP + n2, p_pre, mask=m2)
    tl.store(proj_ptr + t2 * KP + N + n2, p_post, mask=m2)
    tl.store(proj_ptr + t3 * KP + k_res, p_res, mask=m3)
    tl.store(proj_ptr + t * KP + K, ss, mask=mt)
    r = _rms(ss, D, eps, RMS_INV_NORM)
    h_pre, h_post, h_res, _, _, _ = gate_logits(p_pre, p_post, p_res, r, bias_ptr, apre_ptr,
                                                apost_ptr, ares_ptr, n2, mn, k_res, valid, N)
    # Eq. 17-18: H_pre = sigmoid (+eps with PRE_EPS), H_post = 2 sigmoid.
    H_pre = tl.sigmoid(h_pre)
    if PRE_EPS:
        H_pre = H_pre + eps
    H_post = 2.0 * tl.sigmoid(h_post)
    tl.store(pre_ptr + t2 * N + n2, H_pre, mask=m2)
    tl.store(post_ptr + t2 * N + n2, H_post, mask=m2)
    # Eq. 19: Sinkhorn-Knopp on the N x N logits, in registers.
    M = sinkhorn_fwd(h_res, valid, eps, ITERS, SINKHORN_SOFTMAX, RCP_APPROX)
    tl.store(res_ptr + t3 * (N * N) + i3 * N + j3, M, mask=m3)
