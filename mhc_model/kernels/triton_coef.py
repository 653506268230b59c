"""Triton kernels for the mHC coefficients (paper Eq. 14-19), forward and backward.

Pipeline (T tokens, N streams, C hidden, D = N*C, K = N^2 + 2N padded to KP lanes):

forward
  1. ``_proj_fwd_kernel``   x_TD @ W^T on tensor cores + sum of squares, split over D
     (Eq. 14-15: the RMS normalisation is moved *after* the matmul, so x is read once).
     Partials ``[S, T, KP]`` are written (lane K carries the sum of squares), never
     atomics: the result is deterministic.
  2. ``_coef_fwd_kernel``   sums the partials, RMS factor, alpha/bias (Eq. 16), sigmoid
     gates (Eq. 17-18) and the Sinkhorn-Knopp projection (Eq. 19), all in registers.
backward
  3. ``_coef_bwd_kernel``   recomputes gates and Sinkhorn on-chip; the iterates of one
     program go to a small scratch (L2 resident) and are replayed backwards, giving the
     exact gradient of the unrolled iteration (the reference is unrolled, so an implicit
     fixed-point gradient would differ).  Emits dproj (bf16 hi + lo pair for bf16
     streams), the RMS chain coefficient and per-program partials of d bias / d alpha.
  4. ``_proj_bwd_kernel``   dx = dproj @ W + coef * x and per-T-split partials of
     dW^T = x^T @ dproj in one pass over x (x is read once, W stays on-chip).
  5. ``_finalize_kernel``   fixed-order sums of the dW / d bias / d alpha partials, written in
     the parameters' dtypes (two-stage reduction: deterministic, no atomics).

Weights, bias and alphas are read in their own dtype and converted in registers, so the
host issues no cast / cat kernels.

bf16 streams: x is exact in bf16, the fp32 weight is split in registers into W_hi + W_lo
(both bf16), so two bf16 MMAs give ~fp32 accuracy at tensor-core speed.  fp32 streams use
exact fp32 dots.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mhc_model.conventions import convention
from mhc_model.kernels.triton_sinkhorn import sinkhorn_bwd, sinkhorn_fwd

# Tunables (the bench may override them).
#   proj_fwd: (BT, BD, warps, stages); waves: D-split target in programs per SM.
#   proj_bwd: (BT, BD, warps, stages, DW_T, waves).  DW_T computes dW^T = x^T @ dproj so
#     every dot has M >= 64 (Hopper wgmma); waves: T-split target in programs per SM.
#   proj_bwd_presplit: dproj goes to the projection backward as a bf16 (hi, lo) pair
#     written by the coefficient backward, instead of fp32 split per tile.
#   coef_bt: token block of the coefficient forward; coef_bwd: (BT, warps) of its backward.
#   finalize: (BLOCK of dW elements, BG rows of partials per step, warps).
CONFIG = {
    "proj_fwd": (128, 128, 8, 3),
    "waves": 1,
    "proj_bwd": (64, 128, 4, 3, True, 2),
    "proj_bwd_presplit": True,
    "coef_bt": 16,
    "coef_bwd": (16, 2),
    "finalize": (2048, 256, 8),
}


@triton.jit
def _proj_fwd_kernel(x_ptr, w_ptr, part_ptr, T, D, d_per_split,
                     K: tl.constexpr, KP: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
                     SPLIT_BF16: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_t = pid_t * BT + tl.arange(0, BT)
    mask_t = offs_t < T
    offs_k = tl.arange(0, KP)
    d_start = pid_s * d_per_split  # d_per_split is a multiple of BD: splits never overlap
    x_rows = x_ptr + offs_t.to(tl.int64)[:, None] * D
    acc = tl.zeros((BT, KP), tl.float32)
    ss = tl.zeros((BT,), tl.float32)
    for d0 in range(0, d_per_split, BD):
        offs_d = d_start + d0 + tl.arange(0, BD)
        mask_d = offs_d < D
        x = tl.load(x_rows + offs_d[None, :], mask=mask_t[:, None] & mask_d[None, :], other=0.0)
        # [BD, KP] tile of W^T (rows >= K read as 0), L2 resident, fp32 in registers.
        w = tl.load(w_ptr + offs_k[None, :] * D + offs_d[:, None],
                    mask=mask_d[:, None] & (offs_k[None, :] < K), other=0.0).to(tl.float32)
        xf = x.to(tl.float32)
        ss += tl.sum(xf * xf, axis=1)
        if SPLIT_BF16:
            # The tensor cores accumulate with truncation; keep their chain to one BD tile
            # and add tiles in fp32 on the CUDA cores (round-to-nearest), or the error grows
            # with D/BD (measured ~1e-4 relative at D = 6000 when chained through `acc`).
            w_hi = w.to(tl.bfloat16)
            w_lo = (w - w_hi.to(tl.float32)).to(tl.bfloat16)
            tile = tl.dot(x, w_hi)
            tile = tl.dot(x, w_lo, tile)
            acc += tile
        else:
            acc = tl.dot(xf, w, acc, input_precision="ieee")
    # lanes >= K of acc are 0; lane K carries this split's sum of squares
    acc = tl.where(offs_k[None, :] == K, ss[:, None], acc)
    out = part_ptr + pid_s * T * KP + offs_t[:, None] * KP + offs_k[None, :]
    tl.store(out, acc, mask=mask_t[:, None])


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
def _coef_fwd_kernel(part_ptr, bias_ptr, apre_ptr, apost_ptr, ares_ptr,
                     pre_ptr, post_ptr, res_ptr, proj_ptr,
                     T, D, n_split, eps,
                     N: tl.constexpr, NP: tl.constexpr, K: tl.constexpr, KP: tl.constexpr,
                     BT: tl.constexpr, ITERS: tl.constexpr, SINKHORN_SOFTMAX: tl.constexpr,
                     PRE_EPS: tl.constexpr, RMS_INV_NORM: tl.constexpr):
    pid = tl.program_id(0)
    t = pid * BT + tl.arange(0, BT)
    mt = t < T
    n = tl.arange(0, NP)
    mn = n < N
    t2 = t[:, None]
    n2 = n[None, :]
    m2 = mt[:, None] & mn[None, :]
    t3 = t[:, None, None]
    i3 = n[None, :, None]
    j3 = n[None, None, :]
    valid = (i3 < N) & (j3 < N)
    m3 = mt[:, None, None] & valid
    k_res = 2 * N + i3 * N + j3
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
    # proj [T, KP] keeps the sum of squares in lane K (saved for the backward)
    tl.store(proj_ptr + t2 * KP + n2, p_pre, mask=m2)
    tl.store(proj_ptr + t2 * KP + N + n2, p_post, mask=m2)
    tl.store(proj_ptr + t3 * KP + k_res, p_res, mask=m3)
    tl.store(proj_ptr + t * KP + K, ss, mask=mt)
    r = _rms(ss, D, eps, RMS_INV_NORM)
    a_pre, a_post, a_res = _load_alphas(apre_ptr, apost_ptr, ares_ptr)
    # Eq. 16: h = r * proj * alpha + bias, per group [pre | post | res].
    b_pre = tl.load(bias_ptr + n2, mask=mn[None, :], other=0.0).to(tl.float32)
    b_post = tl.load(bias_ptr + N + n2, mask=mn[None, :], other=0.0).to(tl.float32)
    b_res = tl.load(bias_ptr + k_res, mask=valid, other=0.0).to(tl.float32)
    h_pre = r[:, None] * p_pre * a_pre + b_pre
    h_post = r[:, None] * p_post * a_post + b_post
    h_res = r[:, None, None] * p_res * a_res + b_res
    # Eq. 17-18: H_pre = sigmoid (+eps with PRE_EPS), H_post = 2 sigmoid.
    H_pre = tl.sigmoid(h_pre)
    if PRE_EPS:
        H_pre = H_pre + eps
    H_post = 2.0 * tl.sigmoid(h_post)
    tl.store(pre_ptr + t2 * N + n2, H_pre, mask=m2)
    tl.store(post_ptr + t2 * N + n2, H_post, mask=m2)
    # Eq. 19: Sinkhorn-Knopp on the N x N logits, in registers.
    M = sinkhorn_fwd(h_res, valid, eps, ITERS, SINKHORN_SOFTMAX)
    tl.store(res_ptr + t3 * (N * N) + i3 * N + j3, M, mask=m3)


@triton.jit
def _coef_bwd_kernel(dpre_ptr, dpost_ptr, dres_ptr, proj_ptr, bias_ptr,
                     apre_ptr, apost_ptr, ares_ptr,
                     hist_ptr, dproj_ptr, coef_ptr, dbias_part_ptr, dalpha_part_ptr,
                     T, D, eps,
                     N: tl.constexpr, NP: tl.constexpr, K: tl.constexpr, KP: tl.constexpr,
                     BT: tl.constexpr, ITERS: tl.constexpr, SINKHORN_SOFTMAX: tl.constexpr,
                     RMS_INV_NORM: tl.constexpr, DP_SPLIT: tl.constexpr):
    pid = tl.program_id(0)
    t = pid * BT + tl.arange(0, BT)
    mt = t < T
    n = tl.arange(0, NP)
    mn = n < N
    t2 = t[:, None]
    n2 = n[None, :]
    m2 = mt[:, None] & mn[None, :]
    t3 = t[:, None, None]
    i3 = n[None, :, None]
    j3 = n[None, None, :]
    valid = (i3 < N) & (j3 < N)
    m3 = mt[:, None, None] & valid
    k_res = 2 * N + i3 * N + j3
    p_pre = tl.load(proj_ptr + t2 * KP + n2, mask=m2, other=0.0)
    p_post = tl.load(proj_ptr + t2 * KP + N + n2, mask=m2, other=0.0)
    p_res = tl.load(proj_ptr + t3 * KP + k_res, mask=m3, other=0.0)
    ss = tl.load(proj_ptr + t * KP + K, mask=mt, other=0.0)
    r = _rms(ss, D, eps, RMS_INV_NORM)
    a_pre, a_post, a_res = _load_alphas(apre_ptr, apost_ptr, ares_ptr)
    b_pre = tl.load(bias_ptr + n2, mask=mn[None, :], other=0.0).to(tl.float32)
    b_post = tl.load(bias_ptr + N + n2, mask=mn[None, :], other=0.0).to(tl.float32)
    b_res = tl.load(bias_ptr + k_res, mask=valid, other=0.0).to(tl.float32)
    h_pre = r[:, None] * p_pre * a_pre + b_pre
    h_post = r[:, None] * p_post * a_post + b_post
    h_res = r[:, None, None] * p_res * a_res + b_res
    # Gates: d sigmoid = s (1 - s); H_post = 2 sigmoid.
    s_pre = tl.sigmoid(h_pre)
    s_post = tl.sigmoid(h_post)
    dh_pre = tl.load(dpre_ptr + t2 * N + n2, mask=m2, other=0.0) * s_pre * (1.0 - s_pre)
    dh_post = tl.load(dpost_ptr + t2 * N + n2, mask=m2, other=0.0) * 2.0 * s_post * (1.0 - s_post)
    dH_res = tl.load(dres_ptr + t3 * (N * N) + i3 * N + j3, mask=m3, other=0.0)
    hist = hist_ptr + pid.to(tl.int64) * ((2 * ITERS) * BT * NP * NP)
    dh_res = sinkhorn_bwd(h_res, dH_res, valid, hist, eps, ITERS, SINKHORN_SOFTMAX, BT, NP)
    dh_pre = tl.where(m2, dh_pre, 0.0)
    dh_post = tl.where(m2, dh_post, 0.0)
    dh_res = tl.where(m3, dh_res, 0.0)
    # h = r * proj * alpha + bias  ->  dproj = dh r alpha, dr = sum dh proj alpha.
    r2 = r[:, None]
    r3 = r[:, None, None]
    dp_pre = dh_pre * r2 * a_pre
    dp_post = dh_post * r2 * a_post
    dp_res = dh_res * r3 * a_res
    kp = tl.arange(0, KP)[None, :]
    mpad = mt[:, None] & (kp >= K)
    if DP_SPLIT:
        # bf16 (hi, lo) pair: hi = rn(v), lo = rn(v - hi); [2, T, KP], padding lanes 0
        lo_ptr = dproj_ptr + T * KP
        h = dp_pre.to(tl.bfloat16)
        tl.store(dproj_ptr + t2 * KP + n2, h, mask=m2)
        tl.store(lo_ptr + t2 * KP + n2, (dp_pre - h.to(tl.float32)).to(tl.bfloat16), mask=m2)
        h = dp_post.to(tl.bfloat16)
        tl.store(dproj_ptr + t2 * KP + N + n2, h, mask=m2)
        tl.store(lo_ptr + t2 * KP + N + n2, (dp_post - h.to(tl.float32)).to(tl.bfloat16),
                 mask=m2)
        h3 = dp_res.to(tl.bfloat16)
        tl.store(dproj_ptr + t3 * KP + k_res, h3, mask=m3)
        tl.store(lo_ptr + t3 * KP + k_res, (dp_res - h3.to(tl.float32)).to(tl.bfloat16),
                 mask=m3)
        zero = tl.zeros((BT, KP), tl.bfloat16)
        tl.store(dproj_ptr + t2 * KP + kp, zero, mask=mpad)
        tl.store(lo_ptr + t2 * KP + kp, zero, mask=mpad)
    else:
        tl.store(dproj_ptr + t2 * KP + n2, dp_pre, mask=m2)
        tl.store(dproj_ptr + t2 * KP + N + n2, dp_post, mask=m2)
        tl.store(dproj_ptr + t3 * KP + k_res, dp_res, mask=m3)
        tl.store(dproj_ptr + t2 * KP + kp, tl.zeros((BT, KP), tl.float32), mask=mpad)
    g_pre = tl.sum(dh_pre * p_pre, axis=1)
    g_post = tl.sum(dh_post * p_post, axis=1)
    g_res = tl.sum(tl.sum(dh_res * p_res, axis=2), axis=1)
    dr = g_pre * a_pre + g_post * a_post + g_res * a_res
    # d r / d x = c * x with c = -r^3 / D (rsqrt_mean) or -r^2 / (D rms) (inv_norm).
    if RMS_INV_NORM:
        rms = tl.sqrt_rn(ss) / tl.sqrt_rn(D * 1.0)
        coef = tl.where(rms > 0.0, -dr * r * r / (D * tl.where(rms > 0.0, rms, 1.0)), 0.0)
    else:
        coef = -dr * r * r * r / D
    tl.store(coef_ptr + t, coef, mask=mt)
    # Per-program partials of d bias [KP] and d alpha [4]; summed by _finalize_kernel.
    db = dbias_part_ptr + pid * KP
    tl.store(db + n, tl.sum(dh_pre, axis=0), mask=mn)
    tl.store(db + N + n, tl.sum(dh_post, axis=0), mask=mn)
    tl.store(db + 2 * N + n[:, None] * N + n[None, :], tl.sum(dh_res, axis=0),
             mask=(n[:, None] < N) & (n[None, :] < N))
    da = dalpha_part_ptr + pid * 4
    tl.store(da, tl.sum(g_pre * r, axis=0))
    tl.store(da + 1, tl.sum(g_post * r, axis=0))
    tl.store(da + 2, tl.sum(g_res * r, axis=0))
    tl.store(da + 3, 0.0)


@triton.jit
def _reduce_bias_alpha(dbias_part_ptr, dbias_ptr, dalpha_part_ptr, dalpha_ptr, G,
                       K: tl.constexpr, KP: tl.constexpr, BG: tl.constexpr):
    # d bias [K] (in the bias dtype) and d alpha [3] (fp32) from the per-program partials
    # of the coefficient backward; fixed summation order.
    g = tl.arange(0, BG)
    k = tl.arange(0, KP)
    a = tl.arange(0, 4)
    acc_b = tl.zeros((BG, KP), tl.float32)
    acc_a = tl.zeros((BG, 4), tl.float32)
    for g0 in range(0, G, BG):
        mg = (g0 + g) < G
        acc_b += tl.load(dbias_part_ptr + (g0 + g)[:, None] * KP + k[None, :],
                         mask=mg[:, None], other=0.0)
        acc_a += tl.load(dalpha_part_ptr + (g0 + g)[:, None] * 4 + a[None, :],
                         mask=mg[:, None], other=0.0)
    tl.store(dbias_ptr + k, tl.sum(acc_b, axis=0).to(dbias_ptr.dtype.element_ty), mask=k < K)
    tl.store(dalpha_ptr + a, tl.sum(acc_a, axis=0), mask=a < 3)


@triton.jit
def _proj_bwd_kernel(x_ptr, w_ptr, dproj_ptr, coef_ptr, dx_ptr, dw_part_ptr,
                     T, D, t_per_split,
                     K: tl.constexpr, KP: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
                     SPLIT_BF16: tl.constexpr, PRESPLIT: tl.constexpr, DW_T: tl.constexpr):
    """One [T-split, BD] stripe: W stays in registers / shared memory, x is streamed once.
    dx = dproj @ W + coef * x is stored per tile; the dW partial of the stripe is
    accumulated over the split's tokens ([BD, KP] as dW^T when DW_T) and stored once; with
    a single T split the partial is dW itself, stored in the weight dtype."""
    pid_d = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_d = pid_d * BD + tl.arange(0, BD)
    mask_d = offs_d < D
    offs_k = tl.arange(0, KP)
    w_off = offs_k[:, None] * D + offs_d[None, :]
    w_mask = mask_d[None, :] & (offs_k[:, None] < K)
    w = tl.load(w_ptr + w_off, mask=w_mask, other=0.0).to(tl.float32)
    if SPLIT_BF16:
        # W = W_hi + W_lo in bf16 (see the module docstring)
        w_hi = w.to(tl.bfloat16)
        w_lo = (w - w_hi.to(tl.float32)).to(tl.bfloat16)
    if DW_T:  # noqa: SIM108 (constexpr branch)
        acc = tl.zeros((BD, KP), tl.float32)
    else:
        acc = tl.zeros((KP, BD), tl.float32)
    t_start = pid_s * t_per_split  # a multiple of BT: splits never overlap
    for t0 in range(0, t_per_split, BT):
        offs_t = t_start + t0 + tl.arange(0, BT)
        mask_t = offs_t < T
        x_off = offs_t.to(tl.int64)[:, None] * D + offs_d[None, :]
        mask_x = mask_t[:, None] & mask_d[None, :]
        x = tl.load(x_ptr + x_off, mask=mask_x, other=0.0)
        dp_off = offs_t[:, None] * KP + offs_k[None, :]
        cf = tl.load(coef_ptr + offs_t, mask=mask_t, other=0.0)
        if SPLIT_BF16:
            if PRESPLIT:
                dp_hi = tl.load(dproj_ptr + dp_off, mask=mask_t[:, None], other=0.0)
                dp_lo = tl.load(dproj_ptr + T * KP + dp_off, mask=mask_t[:, None], other=0.0)
            else:
                dp = tl.load(dproj_ptr + dp_off, mask=mask_t[:, None], other=0.0)
                dp_hi = dp.to(tl.bfloat16)
                dp_lo = (dp - dp_hi.to(tl.float32)).to(tl.bfloat16)
            # dproj = hi + lo in bf16; the hi*lo cross terms keep ~fp32 accuracy.
            dx = tl.dot(dp_hi, w_hi)
            dx = tl.dot(dp_hi, w_lo, dx)
            dx = tl.dot(dp_lo, w_hi, dx)
            # per-tile chain, fp32 sum (see forward)
            if DW_T:
                xt = tl.trans(x)
                tile = tl.dot(xt, dp_hi)
                tile = tl.dot(xt, dp_lo, tile)
            else:
                tile = tl.dot(tl.trans(dp_hi), x)
                tile = tl.dot(tl.trans(dp_lo), x, tile)
            acc += tile
            xf = x.to(tl.float32)
        else:
            dp = tl.load(dproj_ptr + dp_off, mask=mask_t[:, None], other=0.0)
            xf = x.to(tl.float32)
            dx = tl.dot(dp, w, input_precision="ieee")
            if DW_T:
                acc = tl.dot(tl.trans(xf), dp, acc, input_precision="ieee")
            else:
                acc = tl.dot(tl.trans(dp), xf, acc, input_precision="ieee")
        dx += cf[:, None] * xf
        tl.store(dx_ptr + x_off, dx.to(dx_ptr.dtype.element_ty), mask=mask_x)
    dw = dw_part_ptr + pid_s * K * D
    acc = acc.to(dw_part_ptr.dtype.element_ty)  # fp32 partials, or dW itself (one split)
    if DW_T:
        tl.store(dw + offs_k[None, :] * D + offs_d[:, None], acc,
                 mask=mask_d[:, None] & (offs_k[None, :] < K))
    else:
        tl.store(dw + w_off, acc, mask=w_mask)


@triton.jit
def _finalize_kernel(dw_part_ptr, dw_ptr, dbias_part_ptr, dbias_ptr, dalpha_part_ptr,
                     dalpha_ptr, S, KD, G,
                     K: tl.constexpr, KP: tl.constexpr, BLOCK: tl.constexpr, BG: tl.constexpr):
    """Program 0: d bias and d alpha from the coefficient-backward partials (launched first:
    it is the longest); programs 1.. (only with several T splits): dW = sum_s dw_part[s] in
    the weight dtype.  Fixed summation order, so the result is deterministic."""
    pid = tl.program_id(0)
    if pid == 0:
        _reduce_bias_alpha(dbias_part_ptr, dbias_ptr, dalpha_part_ptr, dalpha_ptr, G, K, KP, BG)
    else:
        offs = (pid - 1) * BLOCK + tl.arange(0, BLOCK)
        m = offs < KD
        acc = tl.load(dw_part_ptr + offs, mask=m, other=0.0)
        for s in range(1, S):
            acc += tl.load(dw_part_ptr + s * KD + offs, mask=m, other=0.0)
        tl.store(dw_ptr + offs, acc.to(dw_ptr.dtype.element_ty), mask=m)


_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    idx = device.index if device.index is not None else torch.cuda.current_device()
    n = _SM_COUNT.get(idx)
    if n is None:
        n = _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return n


def _pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


def proj_forward(x_TD, w_KD, K, KP, bf16):
    """Launch (1): returns the D-split partials [S, T, KP] (lane K: sum of squares).
    ``w_KD`` is the weight in its own dtype; bf16 streams split it into hi + lo bf16
    inside the kernel."""
    T, D = x_TD.shape
    BT, BD, warps, stages = CONFIG["proj_fwd"]
    n_t = triton.cdiv(T, BT)
    n_d = triton.cdiv(D, BD)
    S = max(1, min(n_d, triton.cdiv(CONFIG["waves"] * _sm_count(x_TD.device), n_t)))
    d_per_split = triton.cdiv(n_d, S) * BD
    S = triton.cdiv(D, d_per_split)
    part = torch.empty((S, T, KP), dtype=torch.float32, device=x_TD.device)
    _proj_fwd_kernel[(n_t, S)](x_TD, w_KD, part, T, D, d_per_split,
                               K=K, KP=KP, BT=BT, BD=BD, SPLIT_BF16=bf16,
                               num_warps=warps, num_stages=stages)
    return part


def coef_epilogue(part, bias_K, alphas, N, D, iters, conv, eps):
    """Launch (2): gates + Sinkhorn under convention ``conv`` (name or record).  Returns H_pre,
    H_post, H_res and proj [T, KP] (lane K: sum of squares over D)."""
    S, T, KP = part.shape
    dev = part.device
    BT = CONFIG["coef_bt"]
    f = convention(conv).kernel_flags()
    H_pre = torch.empty((T, N), dtype=torch.float32, device=dev)
    H_post = torch.empty((T, N), dtype=torch.float32, device=dev)
    H_res = torch.empty((T, N, N), dtype=torch.float32, device=dev)
    proj = torch.empty((T, KP), dtype=torch.float32, device=dev)
    _coef_fwd_kernel[(triton.cdiv(T, BT),)](
        part, bias_K, *alphas, H_pre, H_post, H_res, proj, T, D, S, eps,
        N=N, NP=_pow2(N), K=N * N + 2 * N, KP=KP, BT=BT, ITERS=iters,
        SINKHORN_SOFTMAX=f["SINKHORN_SOFTMAX"], PRE_EPS=f["PRE_EPS"],
        RMS_INV_NORM=f["RMS_INV_NORM"], num_warps=4)
    return H_pre, H_post, H_res, proj


def _f32(g):
    return g if g.dtype == torch.float32 and g.is_contiguous() else g.float().contiguous()


class Coefficients(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TNC, weight_KD, bias_K, alpha_pre, alpha_post, alpha_res,
                iters, conv, eps):
        conv = convention(conv)
        T, N, C = x_TNC.shape
        D = N * C
        K = N * N + 2 * N
        assert weight_KD.shape == (K, D) and bias_K.shape == (K,)
        KP = max(16, _pow2(K))  # > K always: lane K is free for the sum of squares
        bf16 = x_TNC.dtype == torch.bfloat16
        x_TD = x_TNC.reshape(T, D)
        if not x_TD.is_contiguous():
            x_TD = x_TD.contiguous()
        w_KD = weight_KD if weight_KD.is_contiguous() else weight_KD.contiguous()
        if not bias_K.is_contiguous():
            bias_K = bias_K.contiguous()
        alphas = (alpha_pre, alpha_post, alpha_res)
        part = proj_forward(x_TD, w_KD, K, KP, bf16)
        H_pre, H_post, H_res, proj = coef_epilogue(part, bias_K, alphas, N, D, iters,
                                                   conv, eps)
        ctx.save_for_backward(x_TD, w_KD, bias_K, alpha_pre, alpha_post, alpha_res, proj)
        ctx.meta = (T, N, C, K, KP, bf16, iters, conv, eps)
        return H_pre, H_post, H_res

    @staticmethod
    def backward(ctx, dH_pre, dH_post, dH_res):
        x_TD, w_KD, bias, a_pre, a_post, a_res, proj = ctx.saved_tensors
        T, N, C, K, KP, bf16, iters, conv, eps = ctx.meta
        f = conv.kernel_flags()
        D = N * C
        dev = x_TD.device
        NP = _pow2(N)
        f32 = torch.float32
        dH_pre = torch.zeros((T, N), dtype=f32, device=dev) if dH_pre is None else _f32(dH_pre)
        dH_post = torch.zeros((T, N), dtype=f32, device=dev) if dH_post is None else _f32(dH_post)
        dH_res = (torch.zeros((T, N, N), dtype=f32, device=dev) if dH_res is None
                  else _f32(dH_res))
        BT, cwarps = CONFIG["coef_bwd"]
        G = triton.cdiv(T, BT)
        BTb, BD, warps, stages, dw_t, waves = CONFIG["proj_bwd"]
        n_d = triton.cdiv(D, BD)
        n_t = triton.cdiv(T, BTb)
        S = max(1, min(n_t, round(waves * _sm_count(dev) / n_d)))
        t_per_split = triton.cdiv(n_t, S) * BTb
        S = triton.cdiv(T, t_per_split)
        final = S == 1
        dW = torch.empty((K, D), dtype=w_KD.dtype, device=dev)
        dbias = torch.empty((K,), dtype=bias.dtype, device=dev)
        dalpha = torch.empty((4,), dtype=f32, device=dev)
        presplit = bf16 and CONFIG["proj_bwd_presplit"]
        # one fp32 workspace: dproj (bf16 pair or fp32) | dW partials (S > 1) | Sinkhorn
        # history | coef | dbias / dalpha partials
        sizes = (T * KP, 0 if final else S * K * D, G * 2 * iters * BT * NP * NP, T, G * KP,
                 G * 4)
        ws = torch.empty(sum(sizes), dtype=f32, device=dev)
        dproj, dw_part, hist, coef, dbias_part, dalpha_part = ws.split(sizes)
        if presplit:
            dproj = dproj.view(torch.bfloat16)  # [2, T, KP] bf16 in the same bytes
        if final:
            dw_part = dW
        _coef_bwd_kernel[(G,)](dH_pre, dH_post, dH_res, proj, bias, a_pre, a_post, a_res,
                               hist, dproj, coef, dbias_part, dalpha_part, T, D, eps,
                               N=N, NP=NP, K=K, KP=KP, BT=BT, ITERS=iters,
                               SINKHORN_SOFTMAX=f["SINKHORN_SOFTMAX"],
                               RMS_INV_NORM=f["RMS_INV_NORM"], DP_SPLIT=presplit,
                               num_warps=cwarps)
        dx_TD = torch.empty_like(x_TD)
        _proj_bwd_kernel[(n_d, S)](x_TD, w_KD, dproj, coef, dx_TD, dw_part,
                                   T, D, t_per_split, K=K, KP=KP, BT=BTb, BD=BD,
                                   SPLIT_BF16=bf16, PRESPLIT=presplit, DW_T=dw_t,
                                   num_warps=warps, num_stages=stages)
        BLOCK, BG, fwarps = CONFIG["finalize"]
        _finalize_kernel[(1 + (0 if final else triton.cdiv(K * D, BLOCK)),)](
            dw_part, dW, dbias_part, dbias, dalpha_part, dalpha, S, K * D, G,
            K=K, KP=KP, BLOCK=BLOCK, BG=BG, num_warps=fwarps)
        da = [dalpha[i:i + 1].view(a.shape) if a.dtype == f32 and a.numel() == 1
              else dalpha[i].reshape(a.shape).to(a.dtype)
              for i, a in enumerate((a_pre, a_post, a_res))]
        return (dx_TD.view(T, N, C), dW, dbias, da[0], da[1], da[2], None, None, None)
