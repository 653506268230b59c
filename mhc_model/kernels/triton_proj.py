"""Triton kernels for the mHC projection x_TD @ W^T (paper Eq. 14-15) and its backward.

Used by ``triton_coef`` (the coefficient pipeline, whose docstring gives the whole forward /
backward order) and ``triton_site`` (one mHC site with the aggregate folded in).

  ``_proj_fwd_kernel``  x_TD @ W^T on tensor cores + sum of squares, split over D; partials
                        ``[S, T, KP]`` (lane K carries the sum of squares), no atomics.
  ``_proj_bwd_kernel``  dx = dproj @ W + coef * x [+ H_pre (x) du] [+ dx_extra] and per-T-split
                        partials of dW^T = x^T @ dproj in one pass over x.  The optional terms
                        let one mHC site write its whole stream gradient in this pass: the
                        aggregate's dx (H_pre[j] du, Eq. 3 F_pre) and the mix's dx, instead of
                        three nC tensors that autograd then sums (DESIGN.md section 7 bytes).
  ``_finalize_kernel``  fixed-order sums of the dW / d bias / d alpha partials.
  ``_split_w_kernel``   the fp32 weight as a bf16 (hi, lo) pair, once per forward call.

bf16 streams: x is exact in bf16, the fp32 weight is split into W_hi + W_lo (both bf16; once
up front for the forward, in registers per program for the backward), so two bf16 MMAs give
~fp32 accuracy at tensor-core speed.  fp32 streams use exact fp32 dots.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

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
    "waves": 8,  # H200 sweep 2026-12-01: 111 us at 8 vs 119 at 1 (wave quantisation, 132 SMs)
    # bf16: W split into hi + lo once (split_weight), not per tile: H200 2026-12-01, the
    # coefficient forward 103 us vs 109
    "proj_fwd_presplit_w": True,
    "proj_bwd": (64, 128, 4, 3, True, 4),  # same sweep: waves 4 203 us vs 2 210 us
    "proj_bwd_presplit": True,
    # the site's du / dx_extra loads before the tile's dots: slower on the H200 (1020 vs 640
    # us site backward, 2026-12-01), kept as a sweep option
    "side_first": False,
    # the site's projection backward (AGG / EXTRA terms): 8 warps, or the two extra [BT, BD]
    # operands spill at 4 (H200, 2026-12-01: 255 registers, 110 spills, 1104 us vs 182 us)
    # H200 sweeps 2026-12-01 (site backward 913 -> 712 us): BT 32 halves the [BT, BD] fp32
    # tiles (128 registers, no spills, at BD 128) where BT 64 needed 215
    "proj_bwd_site": (32, 64, 4, 3, True, 4),  # second sweep: 712 vs 734 us at (32, 128, 8)
    "coef_bt": 64,  # H200 sweep 2026-12-01: coefficient forward 107 us vs 113 at 16
    "coef_bwd": (8, 1),  # same sweep: 196 us vs 203 at (16, 2) (coefficient backward)
    "finalize": (2048, 256, 8),
}


@triton.jit
def _split_w_kernel(w_ptr, out_ptr, D, K: tl.constexpr, KP: tl.constexpr, BD: tl.constexpr):
    # out [2, KP, D] bf16: W = hi + lo (hi = rn(W), lo = rn(W - hi)); rows >= K are 0
    d = tl.program_id(0) * BD + tl.arange(0, BD)
    k = tl.arange(0, KP)
    m = (k[:, None] < K) & (d[None, :] < D)
    w = tl.load(w_ptr + k[:, None] * D + d[None, :], mask=m, other=0.0).to(tl.float32)
    hi = w.to(tl.bfloat16)
    lo = (w - hi.to(tl.float32)).to(tl.bfloat16)
    md = (k[:, None] < KP) & (d[None, :] < D)
    tl.store(out_ptr + k[:, None] * D + d[None, :], hi, mask=md)
    tl.store(out_ptr + KP * D + k[:, None] * D + d[None, :], lo, mask=md)


def split_weight(w_KD, KP: int):
    """[2, KP, D] bf16 (hi, lo) of the fp32 weight, zero-padded to KP rows (one launch)."""
    K, D = w_KD.shape
    out = torch.empty((2, KP, D), dtype=torch.bfloat16, device=w_KD.device)
    BD = 256
    _split_w_kernel[(triton.cdiv(D, BD),)](w_KD, out, D, K=K, KP=KP, BD=BD, num_warps=4)
    return out


@triton.jit
def _proj_tile(x_ptr, w_ptr, t0, d_start, d_len, T, D, K: tl.constexpr, KP: tl.constexpr,
               BT: tl.constexpr, BD: tl.constexpr, SPLIT_BF16: tl.constexpr,
               PRESPLIT_W: tl.constexpr = False):
    """[BT, KP] fp32: rows t0.. of x[:, d_start:d_start+d_len] @ W^T, lane K the sum of
    squares of the same x (lanes > K are 0).  ``d_len`` is a multiple of BD or ends at D.
    PRESPLIT_W: ``w_ptr`` is ``split_weight``'s [2, KP, D] bf16 pair (bf16 streams), so the
    tiles are loaded as they go to the tensor cores, half the bytes, no split per tile."""
    offs_t = t0 + tl.arange(0, BT)
    mask_t = offs_t < T
    offs_k = tl.arange(0, KP)
    x_rows = x_ptr + offs_t.to(tl.int64)[:, None] * D
    acc = tl.zeros((BT, KP), tl.float32)
    ss = tl.zeros((BT,), tl.float32)
    for d0 in range(0, d_len, BD):
        offs_d = d_start + d0 + tl.arange(0, BD)
        mask_d = offs_d < D
        x = tl.load(x_rows + offs_d[None, :], mask=mask_t[:, None] & mask_d[None, :], other=0.0)
        xf = x.to(tl.float32)
        ss += tl.sum(xf * xf, axis=1)
        if PRESPLIT_W:
            w_off = offs_k[None, :] * D + offs_d[:, None]
            w_hi = tl.load(w_ptr + w_off, mask=mask_d[:, None], other=0.0)
            w_lo = tl.load(w_ptr + KP * D + w_off, mask=mask_d[:, None], other=0.0)
            tile = tl.dot(x, w_hi)
            acc += tl.dot(x, w_lo, tile)  # per-tile chain, fp32 sum (see below)
        else:
            # [BD, KP] tile of W^T (rows >= K read as 0), L2 resident, fp32 in registers.
            w = tl.load(w_ptr + offs_k[None, :] * D + offs_d[:, None],
                        mask=mask_d[:, None] & (offs_k[None, :] < K), other=0.0).to(tl.float32)
            if SPLIT_BF16:
                # The tensor cores accumulate with truncation; keep their chain to one BD
                # tile and add tiles in fp32 on the CUDA cores (round-to-nearest), or the
                # error grows with D/BD (~1e-4 relative at D = 6000 when chained through acc).
                w_hi = w.to(tl.bfloat16)
                w_lo = (w - w_hi.to(tl.float32)).to(tl.bfloat16)
                tile = tl.dot(x, w_hi)
                acc += tl.dot(x, w_lo, tile)
            else:
                acc = tl.dot(xf, w, acc, input_precision="ieee")
    # lanes >= K of acc are 0; lane K carries the sum of squares
    return tl.where(offs_k[None, :] == K, ss[:, None], acc)


@triton.jit
def _proj_fwd_kernel(x_ptr, w_ptr, part_ptr, T, D, d_per_split,
                     K: tl.constexpr, KP: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
                     SPLIT_BF16: tl.constexpr, PRESPLIT_W: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_s = tl.program_id(1)
    # d_per_split is a multiple of BD: splits never overlap
    acc = _proj_tile(x_ptr, w_ptr, pid_t * BT, pid_s * d_per_split, d_per_split, T, D,
                     K, KP, BT, BD, SPLIT_BF16, PRESPLIT_W)
    offs_t = pid_t * BT + tl.arange(0, BT)
    offs_k = tl.arange(0, KP)
    out = part_ptr + pid_s * T * KP + offs_t[:, None] * KP + offs_k[None, :]
    tl.store(out, acc, mask=(offs_t < T)[:, None])


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
def _side_terms(du_ptr, hpre_ptr, dxe_ptr, offs_t, mask_t, x_off, mask_x, j, c0, C, N,
                BD: tl.constexpr, AGG: tl.constexpr, EXTRA: tl.constexpr):
    """fp32 [BT, BD]: H_pre[t, j] du[t, c0 + c] (AGG) + dx_extra[t, d] (EXTRA)."""
    side = tl.zeros(mask_x.shape, tl.float32)
    if AGG:
        du = tl.load(du_ptr + offs_t.to(tl.int64)[:, None] * C + c0 + tl.arange(0, BD)[None, :],
                     mask=mask_x, other=0.0).to(tl.float32)
        hp = tl.load(hpre_ptr + offs_t * N + j, mask=mask_t, other=0.0)
        side += hp[:, None] * du
    if EXTRA:
        side += tl.load(dxe_ptr + x_off, mask=mask_x, other=0.0).to(tl.float32)
    return side


@triton.jit
def _proj_bwd_kernel(x_ptr, w_ptr, dproj_ptr, coef_ptr, dx_ptr, dw_part_ptr,
                     du_ptr, hpre_ptr, dxe_ptr, T, D, C, N, t_per_split,
                     K: tl.constexpr, KP: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
                     SPLIT_BF16: tl.constexpr, PRESPLIT: tl.constexpr, DW_T: tl.constexpr,
                     AGG: tl.constexpr, EXTRA: tl.constexpr, SIDE_FIRST: tl.constexpr):
    """One [T-split, BD] stripe: W stays in registers / shared memory, x is streamed once.
    dx = dproj @ W + coef * x is stored per tile; the dW partial of the stripe is
    accumulated over the split's tokens ([BD, KP] as dW^T when DW_T) and stored once; with
    a single T split the partial is dW itself, stored in the weight dtype.
    AGG: dx[t, j*C + c] += H_pre[t, j] * du[t, c] (the aggregate's backward, du [T, C];
    needs C % BD == 0, see ``agg_fold_ok``);
    EXTRA: dx += dx_extra [T, D] (another consumer's gradient of x); both summed in fp32 and
    rounded once.  SIDE_FIRST: those two loads are issued before the tile's dots (their
    latency overlaps the MMAs) rather than after.  ``dx_ptr`` may be ``dxe_ptr`` (in place:
    each element is read, then written, by the same program)."""
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
    # AGG: C % BD == 0 (host), so the tile lies in one stream j and du loads are contiguous
    j = (pid_d * BD) // C
    c0 = pid_d * BD - j * C
    t_start = pid_s * t_per_split  # a multiple of BT: splits never overlap
    for t0 in range(0, t_per_split, BT):
        offs_t = t_start + t0 + tl.arange(0, BT)
        mask_t = offs_t < T
        x_off = offs_t.to(tl.int64)[:, None] * D + offs_d[None, :]
        mask_x = mask_t[:, None] & mask_d[None, :]
        x = tl.load(x_ptr + x_off, mask=mask_x, other=0.0)
        if SIDE_FIRST:
            side = _side_terms(du_ptr, hpre_ptr, dxe_ptr, offs_t, mask_t, x_off, mask_x, j, c0,
                               C, N, BD, AGG, EXTRA)
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
        if AGG or EXTRA:
            if not SIDE_FIRST:
                side = _side_terms(du_ptr, hpre_ptr, dxe_ptr, offs_t, mask_t, x_off, mask_x, j,
                                   c0, C, N, BD, AGG, EXTRA)
            dx += side
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
    ``w_KD`` is the weight in its own dtype; bf16 streams split it into hi + lo bf16, per
    tile inside the kernel or once up front (``proj_fwd_presplit_w``)."""
    T, D = x_TD.shape
    BT, BD, warps, stages = CONFIG["proj_fwd"]
    n_t = triton.cdiv(T, BT)
    n_d = triton.cdiv(D, BD)
    S = max(1, min(n_d, triton.cdiv(CONFIG["waves"] * _sm_count(x_TD.device), n_t)))
    d_per_split = triton.cdiv(n_d, S) * BD
    S = triton.cdiv(D, d_per_split)
    part = torch.empty((S, T, KP), dtype=torch.float32, device=x_TD.device)
    presplit = bf16 and CONFIG["proj_fwd_presplit_w"]
    w = split_weight(w_KD, KP) if presplit else w_KD
    _proj_fwd_kernel[(n_t, S)](x_TD, w, part, T, D, d_per_split,
                               K=K, KP=KP, BT=BT, BD=BD, SPLIT_BF16=bf16, PRESPLIT_W=presplit,
                               num_warps=warps, num_stages=stages)
    return part


def agg_fold_ok(C: int, site: bool = True) -> bool:
    """Whether the projection backward can add the aggregate's dx (AGG): its C tiles must not
    straddle two streams."""
    return C % CONFIG["proj_bwd_site" if site else "proj_bwd"][1] == 0
