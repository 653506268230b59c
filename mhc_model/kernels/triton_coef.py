"""Triton kernels for the mHC coefficients (paper Eq. 14-19), forward and backward.

Pipeline (T tokens, N streams, C hidden, D = N*C, K = N^2 + 2N padded to KP lanes):

forward
  1. ``_proj_fwd_kernel``   x_TD @ W^T on tensor cores + sum of squares, split over D
     (Eq. 14-15: the RMS normalisation is moved *after* the matmul, so x is read once).
     Partials ``[S, T, KP]`` are written, never atomics: the result is deterministic.
  2. ``_coef_fwd_kernel``   sums the partials, RMS factor, alpha/bias (Eq. 16), sigmoid
     gates (Eq. 17-18) and the Sinkhorn-Knopp projection (Eq. 19), all in registers.
backward
  3. ``_coef_bwd_kernel``   recomputes gates and Sinkhorn on-chip; the iterates of one
     program go to a small scratch (L2 resident) and are replayed backwards, giving the
     exact gradient of the unrolled iteration (the reference is unrolled, so an implicit
     fixed-point gradient would differ).  Emits dproj, the RMS chain coefficient and
     per-program partials of d bias / d alpha.
  4. ``_proj_bwd_kernel``   dx = dproj @ W + coef * x and dW = dproj^T @ x in one pass over x.

bf16 streams: x is exact in bf16, the fp32 weight is split in registers into W_hi + W_lo
(both bf16), so two bf16 MMAs give ~fp32 accuracy at tensor-core speed.  fp32 streams use
exact fp32 dots.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mhc_model.kernels.triton_sinkhorn import sinkhorn_bwd, sinkhorn_fwd

# Tunables (the bench may override them).  proj_fwd: (BT, BD, warps, stages), split target.
CONFIG = {
    "proj_fwd": (128, 128, 8, 3),
    "proj_bwd": (64, 64, 4, 3),
    "coef_bt": 16,
    "waves": 1,
}


@triton.jit
def _proj_fwd_kernel(x_ptr, w_ptr, part_ptr, ss_ptr, T, D, d_per_split,
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
        # [BD, KP] tile of W^T (fp32, rows >= K read as 0), L2 resident.
        w = tl.load(w_ptr + offs_k[None, :] * D + offs_d[:, None],
                    mask=mask_d[:, None] & (offs_k[None, :] < K), other=0.0)
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
    out = part_ptr + pid_s * T * KP + offs_t[:, None] * KP + offs_k[None, :]
    tl.store(out, acc, mask=mask_t[:, None])
    tl.store(ss_ptr + pid_s * T + offs_t, ss, mask=mask_t)


@triton.jit
def _rms(ss, D, eps, DEEPSEEK: tl.constexpr):
    # Eq. 15 without gamma; deepseek rsqrt(mean + eps), megatron_dsv4 1 / (rms + eps).
    if DEEPSEEK:
        r = 1.0 / tl.sqrt_rn(ss / D + eps)
    else:
        r = 1.0 / (tl.sqrt_rn(ss) / tl.sqrt_rn(D * 1.0) + eps)
    return r


@triton.jit
def _coef_fwd_kernel(part_ptr, ss_part_ptr, bias_ptr, alpha_ptr,
                     pre_ptr, post_ptr, res_ptr, proj_ptr, ss_ptr,
                     T, D, n_split, eps,
                     N: tl.constexpr, NP: tl.constexpr, KP: tl.constexpr, BT: tl.constexpr,
                     ITERS: tl.constexpr, DEEPSEEK: tl.constexpr):
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
        ss += tl.load(ss_part_ptr + s * T + t, mask=mt, other=0.0)
    tl.store(proj_ptr + t2 * KP + n2, p_pre, mask=m2)
    tl.store(proj_ptr + t2 * KP + N + n2, p_post, mask=m2)
    tl.store(proj_ptr + t3 * KP + k_res, p_res, mask=m3)
    tl.store(ss_ptr + t, ss, mask=mt)
    r = _rms(ss, D, eps, DEEPSEEK)
    a_pre = tl.load(alpha_ptr)
    a_post = tl.load(alpha_ptr + 1)
    a_res = tl.load(alpha_ptr + 2)
    # Eq. 16: h = r * proj * alpha + bias, per group [pre | post | res].
    h_pre = r[:, None] * p_pre * a_pre + tl.load(bias_ptr + n2, mask=mn[None, :], other=0.0)
    h_post = r[:, None] * p_post * a_post + tl.load(bias_ptr + N + n2, mask=mn[None, :], other=0.0)
    h_res = r[:, None, None] * p_res * a_res + tl.load(bias_ptr + k_res, mask=valid, other=0.0)
    # Eq. 17-18: H_pre = sigmoid (+eps in deepseek), H_post = 2 sigmoid.
    H_pre = tl.sigmoid(h_pre)
    if DEEPSEEK:
        H_pre = H_pre + eps
    H_post = 2.0 * tl.sigmoid(h_post)
    tl.store(pre_ptr + t2 * N + n2, H_pre, mask=m2)
    tl.store(post_ptr + t2 * N + n2, H_post, mask=m2)
    # Eq. 19: Sinkhorn-Knopp on the N x N logits, in registers.
    M = sinkhorn_fwd(h_res, valid, eps, ITERS, DEEPSEEK)
    tl.store(res_ptr + t3 * (N * N) + i3 * N + j3, M, mask=m3)


@triton.jit
def _coef_bwd_kernel(dpre_ptr, dpost_ptr, dres_ptr, proj_ptr, ss_ptr, bias_ptr, alpha_ptr,
                     hist_ptr, dproj_ptr, coef_ptr, dbias_part_ptr, dalpha_part_ptr,
                     T, D, eps,
                     N: tl.constexpr, NP: tl.constexpr, KP: tl.constexpr, BT: tl.constexpr,
                     ITERS: tl.constexpr, DEEPSEEK: tl.constexpr):
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
    ss = tl.load(ss_ptr + t, mask=mt, other=0.0)
    r = _rms(ss, D, eps, DEEPSEEK)
    a_pre = tl.load(alpha_ptr)
    a_post = tl.load(alpha_ptr + 1)
    a_res = tl.load(alpha_ptr + 2)
    h_pre = r[:, None] * p_pre * a_pre + tl.load(bias_ptr + n2, mask=mn[None, :], other=0.0)
    h_post = r[:, None] * p_post * a_post + tl.load(bias_ptr + N + n2, mask=mn[None, :], other=0.0)
    h_res = r[:, None, None] * p_res * a_res + tl.load(bias_ptr + k_res, mask=valid, other=0.0)
    # Gates: d sigmoid = s (1 - s); H_post = 2 sigmoid.
    s_pre = tl.sigmoid(h_pre)
    s_post = tl.sigmoid(h_post)
    dh_pre = tl.load(dpre_ptr + t2 * N + n2, mask=m2, other=0.0) * s_pre * (1.0 - s_pre)
    dh_post = tl.load(dpost_ptr + t2 * N + n2, mask=m2, other=0.0) * 2.0 * s_post * (1.0 - s_post)
    dH_res = tl.load(dres_ptr + t3 * (N * N) + i3 * N + j3, mask=m3, other=0.0)
    hist = hist_ptr + pid.to(tl.int64) * ((2 * ITERS) * BT * NP * NP)
    dh_res = sinkhorn_bwd(h_res, dH_res, valid, hist, eps, ITERS, DEEPSEEK, BT, NP)
    dh_pre = tl.where(m2, dh_pre, 0.0)
    dh_post = tl.where(m2, dh_post, 0.0)
    dh_res = tl.where(m3, dh_res, 0.0)
    # h = r * proj * alpha + bias  ->  dproj = dh r alpha, dr = sum dh proj alpha.
    r2 = r[:, None]
    r3 = r[:, None, None]
    tl.store(dproj_ptr + t2 * KP + n2, dh_pre * r2 * a_pre, mask=m2)
    tl.store(dproj_ptr + t2 * KP + N + n2, dh_post * r2 * a_post, mask=m2)
    tl.store(dproj_ptr + t3 * KP + k_res, dh_res * r3 * a_res, mask=m3)
    g_pre = tl.sum(dh_pre * p_pre, axis=1)
    g_post = tl.sum(dh_post * p_post, axis=1)
    g_res = tl.sum(tl.sum(dh_res * p_res, axis=2), axis=1)
    dr = g_pre * a_pre + g_post * a_post + g_res * a_res
    # d r / d x = c * x with c = -r^3 / D (deepseek) or -r^2 / (D rms) (megatron_dsv4).
    if DEEPSEEK:
        coef = -dr * r * r * r / D
    else:
        rms = tl.sqrt_rn(ss) / tl.sqrt_rn(D * 1.0)
        coef = tl.where(rms > 0.0, -dr * r * r / (D * tl.where(rms > 0.0, rms, 1.0)), 0.0)
    tl.store(coef_ptr + t, coef, mask=mt)
    # Per-program partials of d bias [KP] and d alpha [3]; summed on the host side.
    db = dbias_part_ptr + pid * KP
    tl.store(db + n, tl.sum(dh_pre, axis=0), mask=mn)
    tl.store(db + N + n, tl.sum(dh_post, axis=0), mask=mn)
    tl.store(db + 2 * N + n[:, None] * N + n[None, :], tl.sum(dh_res, axis=0),
             mask=(n[:, None] < N) & (n[None, :] < N))
    da = dalpha_part_ptr + pid * 4
    tl.store(da, tl.sum(g_pre * r, axis=0))
    tl.store(da + 1, tl.sum(g_post * r, axis=0))
    tl.store(da + 2, tl.sum(g_res * r, axis=0))


@triton.jit
def _proj_bwd_kernel(x_ptr, w_ptr, dproj_ptr, coef_ptr, dx_ptr, dw_part_ptr,
                     T, D, t_per_split,
                     K: tl.constexpr, KP: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
                     SPLIT_BF16: tl.constexpr):
    pid_d = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_d = pid_d * BD + tl.arange(0, BD)
    mask_d = offs_d < D
    offs_k = tl.arange(0, KP)
    w_off = offs_k[:, None] * D + offs_d[None, :]
    w = tl.load(w_ptr + w_off, mask=mask_d[None, :] & (offs_k[:, None] < K), other=0.0)
    if SPLIT_BF16:
        # W = W_hi + W_lo in bf16 (see the module docstring)
        w_hi = w.to(tl.bfloat16)
        w_lo = (w - w_hi.to(tl.float32)).to(tl.bfloat16)
    acc = tl.zeros((KP, BD), tl.float32)
    t_start = pid_s * t_per_split  # a multiple of BT: splits never overlap
    for t0 in range(0, t_per_split, BT):
        offs_t = t_start + t0 + tl.arange(0, BT)
        mask_t = offs_t < T
        x_off = offs_t.to(tl.int64)[:, None] * D + offs_d[None, :]
        mask_x = mask_t[:, None] & mask_d[None, :]
        x = tl.load(x_ptr + x_off, mask=mask_x, other=0.0)
        dp = tl.load(dproj_ptr + offs_t[:, None] * KP + offs_k[None, :], mask=mask_t[:, None],
                     other=0.0)
        cf = tl.load(coef_ptr + offs_t, mask=mask_t, other=0.0)
        xf = x.to(tl.float32)
        if SPLIT_BF16:
            # dproj = hi + lo in bf16; the hi*lo cross terms keep ~fp32 accuracy.
            dp_hi = dp.to(tl.bfloat16)
            dp_lo = (dp - dp_hi.to(tl.float32)).to(tl.bfloat16)
            dx = tl.dot(dp_hi, w_hi)
            dx = tl.dot(dp_hi, w_lo, dx)
            dx = tl.dot(dp_lo, w_hi, dx)
            tile = tl.dot(tl.trans(dp_hi), x)  # per-tile chain, fp32 sum (see forward)
            tile = tl.dot(tl.trans(dp_lo), x, tile)
            acc += tile
        else:
            dx = tl.dot(dp, w, input_precision="ieee")
            acc = tl.dot(tl.trans(dp), xf, acc, input_precision="ieee")
        dx += cf[:, None] * xf
        tl.store(dx_ptr + x_off, dx.to(dx_ptr.dtype.element_ty), mask=mask_x)
    tl.store(dw_part_ptr + pid_s * K * D + w_off, acc,
             mask=mask_d[None, :] & (offs_k[:, None] < K))


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def _pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


def proj_forward(x_TD, w_KD, K, KP, bf16):
    """Launch (1): returns the D-split partials [S, T, KP] and sums of squares [S, T].
    ``w_KD`` is the fp32 weight; bf16 streams split it into hi + lo bf16 inside the kernel."""
    T, D = x_TD.shape
    BT, BD, warps, stages = CONFIG["proj_fwd"]
    n_t = triton.cdiv(T, BT)
    n_d = triton.cdiv(D, BD)
    S = max(1, min(n_d, triton.cdiv(CONFIG["waves"] * _sm_count(x_TD.device), n_t)))
    d_per_split = triton.cdiv(n_d, S) * BD
    S = triton.cdiv(D, d_per_split)
    part = torch.empty((S, T, KP), dtype=torch.float32, device=x_TD.device)
    ss = torch.empty((S, T), dtype=torch.float32, device=x_TD.device)
    _proj_fwd_kernel[(n_t, S)](x_TD, w_KD, part, ss, T, D, d_per_split,
                               K=K, KP=KP, BT=BT, BD=BD, SPLIT_BF16=bf16,
                               num_warps=warps, num_stages=stages)
    return part, ss


def coef_epilogue(part, ss_part, bias_K, alpha_3, N, D, iters, deepseek, eps):
    """Launch (2): gates + Sinkhorn.  Returns H_pre, H_post, H_res, proj [T,KP], ss [T]."""
    S, T, KP = part.shape
    dev = part.device
    BT = CONFIG["coef_bt"]
    H_pre = torch.empty((T, N), dtype=torch.float32, device=dev)
    H_post = torch.empty((T, N), dtype=torch.float32, device=dev)
    H_res = torch.empty((T, N, N), dtype=torch.float32, device=dev)
    proj = torch.empty((T, KP), dtype=torch.float32, device=dev)
    ss = torch.empty((T,), dtype=torch.float32, device=dev)
    _coef_fwd_kernel[(triton.cdiv(T, BT),)](
        part, ss_part, bias_K, alpha_3, H_pre, H_post, H_res, proj, ss, T, D, S, eps,
        N=N, NP=_pow2(N), KP=KP, BT=BT, ITERS=iters, DEEPSEEK=deepseek, num_warps=4)
    return H_pre, H_post, H_res, proj, ss


class Coefficients(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TNC, weight_KD, bias_K, alpha_pre, alpha_post, alpha_res,
                iters, convention, eps):
        if convention not in ("deepseek", "megatron_dsv4"):
            raise ValueError(f"unknown mhc_convention {convention!r}")
        T, N, C = x_TNC.shape
        D = N * C
        K = N * N + 2 * N
        assert weight_KD.shape == (K, D) and bias_K.shape == (K,)
        KP = max(16, _pow2(K))
        bf16 = x_TNC.dtype == torch.bfloat16
        x_TD = x_TNC.reshape(T, D).contiguous()
        w_KD = weight_KD.float().contiguous()
        bias = bias_K.float().contiguous()
        alpha_3 = torch.cat([a.float().reshape(1) for a in (alpha_pre, alpha_post, alpha_res)])
        deepseek = convention == "deepseek"
        part, ss_part = proj_forward(x_TD, w_KD, K, KP, bf16)
        H_pre, H_post, H_res, proj, ss = coef_epilogue(part, ss_part, bias, alpha_3, N, D,
                                                       iters, deepseek, eps)
        ctx.save_for_backward(x_TD, w_KD, bias, alpha_3, proj, ss)
        ctx.meta = (T, N, C, K, KP, bf16, iters, deepseek, eps)
        ctx.dtypes = (weight_KD.dtype, bias_K.dtype,
                      [(a.dtype, a.shape) for a in (alpha_pre, alpha_post, alpha_res)])
        return H_pre, H_post, H_res

    @staticmethod
    def backward(ctx, dH_pre, dH_post, dH_res):
        x_TD, w_KD, bias, alpha_3, proj, ss = ctx.saved_tensors
        T, N, C, K, KP, bf16, iters, deepseek, eps = ctx.meta
        D = N * C
        dev = x_TD.device
        NP = _pow2(N)

        def _g(g, shape):
            return torch.zeros(shape, device=dev) if g is None else g.float().contiguous()

        dH_pre = _g(dH_pre, (T, N))
        dH_post = _g(dH_post, (T, N))
        dH_res = _g(dH_res, (T, N, N))
        BT = CONFIG["coef_bt"]
        G = triton.cdiv(T, BT)
        hist = torch.empty((G * 2 * iters * BT * NP * NP,), dtype=torch.float32, device=dev)
        dproj = torch.zeros((T, KP), dtype=torch.float32, device=dev)
        coef = torch.empty((T,), dtype=torch.float32, device=dev)
        dbias_part = torch.zeros((G, KP), dtype=torch.float32, device=dev)
        dalpha_part = torch.zeros((G, 4), dtype=torch.float32, device=dev)
        _coef_bwd_kernel[(G,)](dH_pre, dH_post, dH_res, proj, ss, bias, alpha_3, hist,
                               dproj, coef, dbias_part, dalpha_part, T, D, eps,
                               N=N, NP=NP, KP=KP, BT=BT, ITERS=iters, DEEPSEEK=deepseek,
                               num_warps=4)
        BTb, BD, warps, stages = CONFIG["proj_bwd"]
        n_d = triton.cdiv(D, BD)
        n_t = triton.cdiv(T, BTb)
        S = max(1, min(n_t, triton.cdiv(CONFIG["waves"] * _sm_count(dev), n_d)))
        t_per_split = triton.cdiv(n_t, S) * BTb
        S = triton.cdiv(T, t_per_split)
        dx_TD = torch.empty_like(x_TD)
        dw_part = torch.empty((S, K, D), dtype=torch.float32, device=dev)
        _proj_bwd_kernel[(n_d, S)](x_TD, w_KD, dproj, coef, dx_TD, dw_part,
                                   T, D, t_per_split, K=K, KP=KP, BT=BTb, BD=BD,
                                   SPLIT_BF16=bf16, num_warps=warps, num_stages=stages)
        w_dtype, b_dtype, a_meta = ctx.dtypes
        dW = (dw_part[0] if S == 1 else dw_part.sum(0)).to(w_dtype)
        dbias = dbias_part.sum(0)[:K].to(b_dtype)
        dalpha = dalpha_part.sum(0)
        da = [dalpha[i].reshape(shape).to(dt) for i, (dt, shape) in enumerate(a_meta)]
        return (dx_TD.view(T, N, C), dW, dbias, da[0], da[1], da[2], None, None, None)
