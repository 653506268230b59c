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
     program are kept (in registers where they fit, else in a small L2-resident scratch
     read ahead of use) and replayed backwards, giving the exact gradient of the unrolled
     iteration (the reference is unrolled, so an implicit fixed-point gradient would
     differ).  Emits dproj (bf16 hi + lo pair [T, 2, KP] for bf16
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

The projection kernels (1), (4), (5) live in ``triton_proj``; ``coef_backward`` is shared
with ``triton_site``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mhc_model.conventions import convention
from mhc_model.kernels.triton_epi import _rms, coef_epi_block, coef_index, gate_logits
from mhc_model.kernels.triton_proj import CONFIG, _pow2, proj_forward, rcp_approx
from mhc_model.kernels.triton_proj_bwd import bwd_finish, bwd_work, store_dproj_pair
from mhc_model.kernels.triton_sinkhorn import sinkhorn_bwd


@triton.jit
def _coef_fwd_kernel(part_ptr, bias_ptr, apre_ptr, apost_ptr, ares_ptr,
                     pre_ptr, post_ptr, res_ptr, proj_ptr,
                     T, D, n_split, eps,
                     N: tl.constexpr, NP: tl.constexpr, K: tl.constexpr, KP: tl.constexpr,
                     BT: tl.constexpr, ITERS: tl.constexpr, SINKHORN_SOFTMAX: tl.constexpr,
                     PRE_EPS: tl.constexpr, RMS_INV_NORM: tl.constexpr,
                     RCP_APPROX: tl.constexpr):
    coef_epi_block(part_ptr, bias_ptr, apre_ptr, apost_ptr, ares_ptr, pre_ptr, post_ptr,
                   res_ptr, proj_ptr, tl.program_id(0) * BT, T, D, n_split, eps,
                   N, NP, K, KP, BT, ITERS, SINKHORN_SOFTMAX, PRE_EPS, RMS_INV_NORM,
                   RCP_APPROX)


@triton.jit
def _coef_bwd_kernel(dpre_ptr, dpost_ptr, dres_ptr, proj_ptr, bias_ptr,
                     apre_ptr, apost_ptr, ares_ptr,
                     hist_ptr, dproj_ptr, coef_ptr, dbias_part_ptr, dalpha_part_ptr,
                     T, D, eps,
                     N: tl.constexpr, NP: tl.constexpr, K: tl.constexpr, KP: tl.constexpr,
                     BT: tl.constexpr, ITERS: tl.constexpr, SINKHORN_SOFTMAX: tl.constexpr,
                     RMS_INV_NORM: tl.constexpr, DP_SPLIT: tl.constexpr,
                     PREFETCH: tl.constexpr, RCP_APPROX: tl.constexpr):
    pid = tl.program_id(0)
    t, mt, n, mn, t2, n2, m2, t3, i3, j3, valid, m3, k_res = coef_index(pid * BT, T, N, NP, BT)
    p_pre = tl.load(proj_ptr + t2 * KP + n2, mask=m2, other=0.0)
    p_post = tl.load(proj_ptr + t2 * KP + N + n2, mask=m2, other=0.0)
    p_res = tl.load(proj_ptr + t3 * KP + k_res, mask=m3, other=0.0)
    ss = tl.load(proj_ptr + t * KP + K, mask=mt, other=0.0)
    r = _rms(ss, D, eps, RMS_INV_NORM)
    h_pre, h_post, h_res, a_pre, a_post, a_res = gate_logits(
        p_pre, p_post, p_res, r, bias_ptr, apre_ptr, apost_ptr, ares_ptr, n2, mn, k_res, valid, N)
    # Gates: d sigmoid = s (1 - s); H_post = 2 sigmoid.
    s_pre = tl.sigmoid(h_pre)
    s_post = tl.sigmoid(h_post)
    dh_pre = tl.load(dpre_ptr + t2 * N + n2, mask=m2, other=0.0) * s_pre * (1.0 - s_pre)
    dh_post = tl.load(dpost_ptr + t2 * N + n2, mask=m2, other=0.0) * 2.0 * s_post * (1.0 - s_post)
    dH_res = tl.load(dres_ptr + t3 * (N * N) + i3 * N + j3, mask=m3, other=0.0)
    hist = hist_ptr + pid.to(tl.int64) * ((2 * ITERS) * BT * NP * NP)
    dh_res = sinkhorn_bwd(h_res, dH_res, valid, hist, eps, ITERS, SINKHORN_SOFTMAX, BT, NP,
                          PREFETCH, RCP_APPROX)
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
    if DP_SPLIT:  # the bf16 (hi, lo) pair [T, 2, KP], padding lanes 0
        store_dproj_pair(dproj_ptr, t2, n2, dp_pre, m2, KP)
        store_dproj_pair(dproj_ptr, t2, N + n2, dp_post, m2, KP)
        store_dproj_pair(dproj_ptr, t3, k_res, dp_res, m3, KP)
        store_dproj_pair(dproj_ptr, t2, kp, tl.zeros((BT, KP), tl.float32), mpad, KP)
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


def coef_epilogue(part, bias_K, alphas, N, D, iters, conv, eps):
    """Launch (2): gates + Sinkhorn under convention ``conv`` (name or record).  Returns H_pre,
    H_post, H_res and proj [T, KP] (lane K: sum of squares over D)."""
    S, T, KP = part.shape
    dev = part.device
    BT, warps = CONFIG["coef_fwd"]
    f = convention(conv).kernel_flags()
    H_pre = torch.empty((T, N), dtype=torch.float32, device=dev)
    H_post = torch.empty((T, N), dtype=torch.float32, device=dev)
    H_res = torch.empty((T, N, N), dtype=torch.float32, device=dev)
    proj = torch.empty((T, KP), dtype=torch.float32, device=dev)
    _coef_fwd_kernel[(triton.cdiv(T, BT),)](
        part, bias_K, *alphas, H_pre, H_post, H_res, proj, T, D, S, eps,
        N=N, NP=_pow2(N), K=N * N + 2 * N, KP=KP, BT=BT, ITERS=iters,
        SINKHORN_SOFTMAX=f["SINKHORN_SOFTMAX"], PRE_EPS=f["PRE_EPS"],
        RMS_INV_NORM=f["RMS_INV_NORM"], RCP_APPROX=rcp_approx(), num_warps=warps)
    return H_pre, H_post, H_res, proj


def _f32(g):
    return g if g.dtype == torch.float32 and g.is_contiguous() else g.float().contiguous()


def coef_backward(saved, meta, dH_pre, dH_post, dH_res, du_TC=None, H_pre=None,
                  dx_extra=None, mix_g=None, group=False):
    """Launches (3)-(5): gradients of x, W, bias and the alphas from those of the mappings.
    ``saved`` = (x_TD, w_KD, bias, a_pre, a_post, a_res, proj) as the forward keeps them.
    With ``du_TC`` and ``H_pre`` the aggregate's dx (H_pre[j] du) and with ``dx_extra`` [T, D]
    a further gradient of x are added inside the projection backward's single pass;
    ``dx_extra`` (contiguous, x's dtype, owned by the caller) is overwritten with dx.
    ``group``: the pass on GROUP tiles (``triton_proj.group_ok`` must hold); ``mix_g`` = (g
    [T, D], fp32 H_res, mix_transposed): the mix's dx formed from its output gradient inside
    the pass (GROUP tiles)."""
    x_TD, w_KD, bias, a_pre, a_post, a_res, proj = saved
    T, N, C, K, KP, bf16, iters, conv, eps = meta
    f = conv.kernel_flags()
    D = N * C
    dev = x_TD.device
    NP = _pow2(N)
    f32 = torch.float32
    dH_pre = torch.zeros((T, N), dtype=f32, device=dev) if dH_pre is None else _f32(dH_pre)
    dH_post = torch.zeros((T, N), dtype=f32, device=dev) if dH_post is None else _f32(dH_post)
    dH_res = (torch.zeros((T, N, N), dtype=f32, device=dev) if dH_res is None
              else _f32(dH_res))
    BT, cwarps, prefetch = CONFIG["coef_bwd"]
    G = triton.cdiv(T, BT)
    agg, extra = du_TC is not None, dx_extra is not None
    group = group or mix_g is not None
    hist = 2 * iters * BT * NP * NP  # fp32 Sinkhorn step inputs of one program
    if hist <= CONFIG["coef_bwd_hist_regs"] * 32 * cwarps:
        prefetch = 0  # they fit in registers: no scratch
    work = bwd_work(T, D, K, KP, G, site=agg or extra, bf16=bf16, w_dtype=w_KD.dtype,
                    device=dev, extra=G * hist if prefetch else 0, group_n=N if group else 0)
    if agg and C % work.tile[1]:
        raise ValueError(f"C = {C} is not a multiple of the tile {work.tile[1]}: see agg_fold_ok")
    _coef_bwd_kernel[(G,)](dH_pre, dH_post, dH_res, proj, bias, a_pre, a_post, a_res,
                           work.extra, work.dproj, work.coef, work.dbias_part,
                           work.dalpha_part, T, D, eps,
                           N=N, NP=NP, K=K, KP=KP, BT=BT, ITERS=iters,
                           SINKHORN_SOFTMAX=f["SINKHORN_SOFTMAX"],
                           RMS_INV_NORM=f["RMS_INV_NORM"], DP_SPLIT=work.presplit,
                           PREFETCH=prefetch, RCP_APPROX=rcp_approx(), num_warps=cwarps)
    # the mix's dx (ours, contiguous [T, D]) is overwritten in place: one nC buffer fewer
    dx_TD = dx_extra if extra else torch.empty_like(x_TD)
    dW, dbias, dalpha = bwd_finish(work, x_TD, w_KD, bias.dtype, dx_TD,
                                   du_TC if agg else None, H_pre if agg else None, dx_extra,
                                   C=C, N=N, K=K, KP=KP, bf16=bf16, mix_g=mix_g)
    da = [dalpha[i:i + 1].view(a.shape) if a.dtype == f32 and a.numel() == 1
          else dalpha[i].reshape(a.shape).to(a.dtype)
          for i, a in enumerate((a_pre, a_post, a_res))]
    return dx_TD.view(T, N, C), dW, dbias, da[0], da[1], da[2]


def coef_forward(x_TNC, weight_KD, bias_K, alphas, iters, conv, eps):
    """Launches (1)-(2).  Returns (H_pre, H_post, H_res), the tensors ``coef_backward`` needs
    (``saved``) and its ``meta``."""
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
    part = proj_forward(x_TD, w_KD, K, KP, bf16)
    H_pre, H_post, H_res, proj = coef_epilogue(part, bias_K, alphas, N, D, iters, conv, eps)
    saved = (x_TD, w_KD, bias_K, *alphas, proj)
    return (H_pre, H_post, H_res), saved, (T, N, C, K, KP, bf16, iters, conv, eps)


class Coefficients(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TNC, weight_KD, bias_K, alpha_pre, alpha_post, alpha_res,
                iters, conv, eps):
        H, saved, ctx.meta = coef_forward(x_TNC, weight_KD, bias_K,
                                          (alpha_pre, alpha_post, alpha_res), iters, conv, eps)
        ctx.save_for_backward(*saved)
        return H

    @staticmethod
    def backward(ctx, dH_pre, dH_post, dH_res):
        grads = coef_backward(ctx.saved_tensors, ctx.meta, dH_pre, dH_post, dH_res)
        return (*grads, None, None, None)
