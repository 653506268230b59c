"""Triton kernels for the backward of the mHC projection x_TD @ W^T (paper Eq. 14-15).

  ``_proj_bwd_kernel``      dx = dproj @ W + coef * x [+ H_pre (x) du] [+ dx_extra] and per-T-split
                            partials of dW^T = x^T @ dproj in one pass over x.  The optional
                            terms let one mHC site write its whole stream gradient in this pass:
                            the aggregate's dx (H_pre[j] du, Eq. 3 F_pre) and the mix's dx,
                            instead of three nC tensors that autograd then sums (DESIGN.md
                            section 7 bytes).
  ``_proj_bwd_tma_kernel``  the same for bf16 streams with every [T, *] operand moved by TMA
                            descriptors (Hopper), loads and the dx store.
  ``_finalize_kernel``      fixed-order sums of the dW / d bias / d alpha partials (the latter
                            summed per program by the projection backward first).

``proj_backward`` picks the kernel and launches it; ``bwd_work`` plans the T split and
allocates the workspace that a gate backward (``triton_coef._coef_bwd_kernel``,
``triton_head._head_bwd_kernel``) fills before ``bwd_finish`` launches (4) and (5).
``triton_coef.coef_backward`` orders the whole coefficient backward.  Forward kernels and the
tunables (``CONFIG``) live in ``triton_proj``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from mhc_model.kernels.triton_proj import CONFIG, TensorDescriptor, _pow2, _sm_count, _tma_ok


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
def _bias_alpha_rows(dbias_part_ptr, dalpha_part_ptr, G, rpp, K: tl.constexpr,
                     KP: tl.constexpr, RB: tl.constexpr):
    """Stage 1 of the d bias / d alpha sums, run by every projection-backward program: its
    ``rpp`` rows of the gate backward's G partial rows, loaded first and summed by
    ``_store_rows`` after the main loop (the loads' latency hides behind it); program 0 of
    ``_finalize_kernel`` then sums one row per program.  Two fixed-order stages: as
    deterministic as one, and the finalize no longer walks G rows alone (its program 0 was
    the longest: 8.2 us at G 1024 on the H200, 2026-12-01)."""
    p = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
    g = p * rpp + tl.arange(0, RB)
    mg = (g < G) & (tl.arange(0, RB) < rpp)
    k = tl.arange(0, KP)
    # lanes K.. of the partials are never written: read as 0
    b = tl.load(dbias_part_ptr + g[:, None] * KP + k[None, :],
                mask=mg[:, None] & (k[None, :] < K), other=0.0)
    al = tl.load(dalpha_part_ptr + g[:, None] * 4 + tl.arange(0, 4)[None, :],
                 mask=mg[:, None], other=0.0)
    return p, b, al


@triton.jit
def _store_rows(p, b, al, rows_b_ptr, rows_a_ptr, KP: tl.constexpr):
    tl.store(rows_b_ptr + p * KP + tl.arange(0, KP), tl.sum(b, axis=0))
    tl.store(rows_a_ptr + p * 4 + tl.arange(0, 4), tl.sum(al, axis=0))


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
                     du_ptr, hpre_ptr, dxe_ptr, dbp_ptr, dap_ptr, rows_b_ptr, rows_a_ptr,
                     T, D, C, N, t_per_split, G, rpp,
                     K: tl.constexpr, KP: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
                     RB: tl.constexpr,
                     SPLIT_BF16: tl.constexpr, PRESPLIT: tl.constexpr, DW_T: tl.constexpr,
                     AGG: tl.constexpr, EXTRA: tl.constexpr):
    """One [T-split, BD] stripe: W stays in registers / shared memory, x is streamed once.
    dx = dproj @ W + coef * x is stored per tile; the dW partial of the stripe is
    accumulated over the split's tokens ([BD, KP] as dW^T when DW_T) and stored once; with
    a single T split the partial is dW itself, stored in the weight dtype.
    AGG: dx[t, j*C + c] += H_pre[t, j] * du[t, c] (the aggregate's backward, du [T, C];
    needs C % BD == 0, see ``agg_fold_ok``);
    EXTRA: dx += dx_extra [T, D] (another consumer's gradient of x); both summed in fp32 and
    rounded once; their loads are issued after the tile's dots (before them the site
    backward ran 1035 vs 640 us on the H200, 2026-12-01).  ``dx_ptr`` may be ``dxe_ptr`` (in place:
    each element is read, then written, by the same program).  Each program also sums its
    rows of the d bias / d alpha partials (``_bias_alpha_rows``)."""
    p, row_b, row_a = _bias_alpha_rows(dbp_ptr, dap_ptr, G, rpp, K, KP, RB)
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
            dx += _side_terms(du_ptr, hpre_ptr, dxe_ptr, offs_t, mask_t, x_off, mask_x, j, c0,
                              C, N, BD, AGG, EXTRA)
        tl.store(dx_ptr + x_off, dx.to(dx_ptr.dtype.element_ty), mask=mask_x)
    dw = dw_part_ptr + pid_s * K * D
    acc = acc.to(dw_part_ptr.dtype.element_ty)  # fp32 partials, or dW itself (one split)
    if DW_T:
        tl.store(dw + offs_k[None, :] * D + offs_d[:, None], acc,
                 mask=mask_d[:, None] & (offs_k[None, :] < K))
    else:
        tl.store(dw + w_off, acc, mask=w_mask)
    _store_rows(p, row_b, row_a, rows_b_ptr, rows_a_ptr, KP)


@triton.jit
def _finalize_kernel(dw_part_ptr, dw_ptr, dbias_part_ptr, dbias_ptr, dalpha_part_ptr,
                     dalpha_ptr, S, KD, G,
                     K: tl.constexpr, KP: tl.constexpr, BLOCK: tl.constexpr, BG: tl.constexpr):
    """Program 0: d bias and d alpha from the G rows the projection backward's programs
    summed (``_bias_alpha_rows``); programs 1.. (only with several T splits): dW =
    sum_s dw_part[s] in the weight dtype.  Fixed summation order: deterministic."""
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


@triton.jit
def _proj_bwd_tma_kernel(x_desc, w_ptr, dp_desc, coef_ptr, dx_desc, dw_part_ptr,
                         du_desc, hpre_ptr, dxe_desc, dbp_ptr, dap_ptr, rows_b_ptr, rows_a_ptr,
                         T, D, C, N, t_per_split, G, rpp,
                         K: tl.constexpr, KP: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
                         RB: tl.constexpr,
                         AGG: tl.constexpr, EXTRA: tl.constexpr):
    """``_proj_bwd_kernel`` for bf16 streams, presplit dproj and DW_T, with x, the dproj pair,
    du and dx_extra loaded and dx stored through TMA descriptors: tiles past T read as 0
    (they add nothing to dW) and their dx rows are not written."""
    p, row_b, row_a = _bias_alpha_rows(dbp_ptr, dap_ptr, G, rpp, K, KP, RB)
    pid_d = tl.program_id(0)
    pid_s = tl.program_id(1)
    d0 = pid_d * BD
    offs_d = d0 + tl.arange(0, BD)
    mask_d = offs_d < D
    offs_k = tl.arange(0, KP)
    w = tl.load(w_ptr + offs_k[:, None] * D + offs_d[None, :],
                mask=mask_d[None, :] & (offs_k[:, None] < K), other=0.0).to(tl.float32)
    w_hi = w.to(tl.bfloat16)  # W = W_hi + W_lo in bf16 (see triton_proj)
    w_lo = (w - w_hi.to(tl.float32)).to(tl.bfloat16)
    acc = tl.zeros((BD, KP), tl.float32)
    j = d0 // C  # AGG: C % BD == 0 (host), the tile lies in stream j
    c0 = d0 - j * C
    t_start = pid_s * t_per_split  # a multiple of BT: splits never overlap
    for t0 in range(0, t_per_split, BT):
        tt = t_start + t0
        offs_t = tt + tl.arange(0, BT)
        mask_t = offs_t < T
        x = x_desc.load([tt, d0])
        dp_hi = dp_desc.load([0, tt, 0]).reshape(BT, KP)
        dp_lo = dp_desc.load([1, tt, 0]).reshape(BT, KP)
        cf = tl.load(coef_ptr + offs_t, mask=mask_t, other=0.0)
        dx = tl.dot(dp_hi, w_hi)
        dx = tl.dot(dp_hi, w_lo, dx)
        dx = tl.dot(dp_lo, w_hi, dx)
        xt = tl.trans(x)
        tile = tl.dot(xt, dp_hi)
        acc += tl.dot(xt, dp_lo, tile)  # per-tile chain, fp32 sum (see triton_proj)
        dx += cf[:, None] * x.to(tl.float32)
        if AGG:
            hp = tl.load(hpre_ptr + offs_t * N + j, mask=mask_t, other=0.0)
            dx += hp[:, None] * du_desc.load([tt, c0]).to(tl.float32)
        if EXTRA:
            dx += dxe_desc.load([tt, d0]).to(tl.float32)
        dx_desc.store([tt, d0], dx.to(dx_desc.dtype))
    tl.store(dw_part_ptr + pid_s * K * D + offs_k[None, :] * D + offs_d[:, None],
             acc.to(dw_part_ptr.dtype.element_ty),
             mask=mask_d[:, None] & (offs_k[None, :] < K))
    _store_rows(p, row_b, row_a, rows_b_ptr, rows_a_ptr, KP)


def proj_backward(x_TD, w_KD, dx_TD, du_TC, H_pre, dx_extra, work, *, C, N, K, KP, bf16):
    """Launch (4) on ``work`` (``bwd_work``): ``_proj_bwd_tma_kernel`` where it applies
    (``CONFIG["proj_bwd_tma"]``, or ``"proj_bwd_site_tma"`` with the site's operands; bf16,
    presplit dproj, DW_T, aligned operands), else ``_proj_bwd_kernel``."""
    T, D = x_TD.shape
    BT, BD, warps, stages, dw_t, _ = work.tile
    agg, extra = du_TC is not None, dx_extra is not None
    grid = (triton.cdiv(D, BD), work.S)
    rows = (work.dbias_part, work.dalpha_part, work.rows_b, work.rows_a)
    split = dict(G=work.G, rpp=triton.cdiv(work.G, grid[0] * grid[1]))
    meta = dict(K=K, KP=KP, BT=BT, BD=BD, RB=_pow2(split["rpp"]), AGG=agg, EXTRA=extra,
                num_warps=warps, num_stages=stages)
    operands = [x_TD, dx_TD] + ([du_TC] if agg else []) + ([dx_extra] if extra else [])
    if (CONFIG["proj_bwd_site_tma" if agg or extra else "proj_bwd_tma"] and bf16
            and work.presplit and dw_t and all(_tma_ok(t) for t in operands)):
        def desc(t):
            return TensorDescriptor.from_tensor(t, [BT, BD])

        x_desc = desc(x_TD)
        _proj_bwd_tma_kernel[grid](
            x_desc, w_KD, TensorDescriptor.from_tensor(work.dproj.view(2, T, KP), [1, BT, KP]),
            work.coef, desc(dx_TD), work.dw_part, desc(du_TC) if agg else x_desc,
            H_pre if agg else work.coef, desc(dx_extra) if extra else x_desc, *rows,
            T, D, C, N, work.t_per_split, **split, **meta)
        return
    _proj_bwd_kernel[grid](
        x_TD, w_KD, work.dproj, work.coef, dx_TD, work.dw_part, du_TC if agg else x_TD,
        H_pre if agg else work.coef, dx_extra if extra else x_TD, *rows,
        T, D, C, N, work.t_per_split, **split, SPLIT_BF16=bf16, PRESPLIT=work.presplit,
        DW_T=dw_t, **meta)


class BwdWork(NamedTuple):
    """The projection backward's T split and its one fp32 workspace (``bwd_work``)."""

    tile: tuple  # CONFIG["proj_bwd"] or CONFIG["proj_bwd_site"]
    S: int  # T splits (dW partials); 1: the kernel writes dW itself
    t_per_split: int
    G: int  # programs of the gate backward (rows of the d bias / d alpha partials)
    presplit: bool  # dproj is the bf16 (hi, lo) pair [2, T, KP]
    dproj: torch.Tensor  # [T, KP] fp32, or the pair in the same bytes
    dw_part: torch.Tensor  # [S, K, D] fp32 partials, or dW when S == 1
    coef: torch.Tensor  # [T] RMS chain coefficient
    dbias_part: torch.Tensor  # [G, KP]
    dalpha_part: torch.Tensor  # [G, 4]
    rows_b: torch.Tensor  # [P, KP]: per projection-backward program, its d bias rows' sum
    rows_a: torch.Tensor  # [P, 4]: the same for d alpha
    extra: torch.Tensor  # caller's scratch (the coefficient backward's Sinkhorn history)
    dW: torch.Tensor  # [K, D] in the weight dtype


def bwd_work(T, D, K, KP, G, *, site, bf16, w_dtype, device, extra=0) -> BwdWork:
    """T split of the projection backward (``CONFIG["proj_bwd_site"]`` when the site's AGG /
    EXTRA operands go in, ``"proj_bwd"`` otherwise; ``waves`` programs per SM) and one fp32
    workspace: dproj | dW partials (S > 1) | coef | d bias / d alpha partials | their per-
    program sums (P = programs of the projection backward) | extra."""
    tile = CONFIG["proj_bwd_site" if site else "proj_bwd"]
    BT, BD, _, _, _, waves = tile
    n_d = triton.cdiv(D, BD)
    n_t = triton.cdiv(T, BT)
    S = max(1, min(n_t, round(waves * _sm_count(device) / n_d)))
    t_per_split = triton.cdiv(n_t, S) * BT
    S = triton.cdiv(T, t_per_split)
    dW = torch.empty((K, D), dtype=w_dtype, device=device)
    presplit = bf16 and CONFIG["proj_bwd_presplit"]
    P = n_d * S
    sizes = (T * KP, 0 if S == 1 else S * K * D, T, G * KP, G * 4, P * KP, P * 4, extra)
    ws = torch.empty(sum(sizes), dtype=torch.float32, device=device)
    dproj, dw_part, coef, dbias_part, dalpha_part, rows_b, rows_a, extra_ws = ws.split(sizes)
    if presplit:
        dproj = dproj.view(torch.bfloat16)  # [2, T, KP] bf16 in the same bytes
    return BwdWork(tile, S, t_per_split, G, presplit, dproj, dW if S == 1 else dw_part, coef,
                   dbias_part, dalpha_part, rows_b.view(P, KP), rows_a.view(P, 4), extra_ws,
                   dW)


def bwd_finish(work: BwdWork, x_TD, w_KD, bias_dtype, dx_TD, du_TC, H_pre, dx_extra, *,
               C, N, K, KP, bf16):
    """Launches (4) and (5) once the gate backward has filled ``work``'s dproj, coef and
    partials.  Returns (dW in the weight dtype, d bias [K] in ``bias_dtype``, d alpha [4]
    fp32: lanes 0-2 the sums of the gate backward's d alpha partials)."""
    proj_backward(x_TD, w_KD, dx_TD, du_TC, H_pre, dx_extra, work, C=C, N=N, K=K, KP=KP,
                  bf16=bf16)
    D = x_TD.shape[1]
    dbias = torch.empty((K,), dtype=bias_dtype, device=x_TD.device)
    dalpha = torch.empty((4,), dtype=torch.float32, device=x_TD.device)
    BLOCK, BG, warps = CONFIG["finalize"]
    _finalize_kernel[(1 + (0 if work.S == 1 else triton.cdiv(K * D, BLOCK)),)](
        work.dw_part, work.dW, work.rows_b, dbias, work.rows_a, dalpha, work.S,
        K * D, work.rows_b.shape[0], K=K, KP=KP, BLOCK=BLOCK, BG=BG, num_warps=warps)
    return work.dW, dbias, dalpha
