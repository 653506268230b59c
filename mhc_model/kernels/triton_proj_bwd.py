"""Triton kernels for the backward of the mHC projection x_TD @ W^T (paper Eq. 14-15).

  ``_proj_bwd_kernel``      dx = dproj @ W + coef * x [+ H_pre (x) du] [+ dx_extra] and per-T-split
                            partials of dW^T = x^T @ dproj in one pass over x.  The optional
                            terms let one mHC site write its whole stream gradient in this pass:
                            the aggregate's dx (H_pre[j] du, Eq. 3 F_pre) and the mix's dx,
                            instead of three nC tensors that autograd then sums (DESIGN.md
                            section 7 bytes).
  ``_proj_bwd_tma_kernel``  the same for bf16 streams with every [T, *] operand moved by TMA
                            descriptors (Hopper), loads and the dx store.
  ``_finalize_kernel``      fixed-order sums of the dW / d bias / d alpha partials.

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

from mhc_model.kernels.triton_proj import (
    CONFIG,
    TensorDescriptor,
    _sm_count,
    _tma_ok,
    bf16_pair,
)


@triton.jit
def store_dproj_pair(dproj_ptr, t, lane, v, mask, KP: tl.constexpr):
    """dproj as the bf16 (hi, lo) pair the projection backward reads: [T, 2, KP], row t holds
    hi = rn(v) in lanes 0 .. KP-1 and lo = rn(v - hi) in KP .. 2 KP-1, so one TMA box of
    [BT, 2 KP] brings both halves (``_proj_bwd_tma_kernel``)."""
    # ``bf16_pair``'s rule, with hi stored before lo is formed: computing both first changed
    # the gate backward's SASS (4 scalar stores, 3 more branch regions; Triton 3.6 ptxas)
    hi = v.to(tl.bfloat16)
    row = dproj_ptr + t * (2 * KP) + lane
    tl.store(row, hi, mask=mask)
    tl.store(row + KP, (v - hi.to(tl.float32)).to(tl.bfloat16), mask=mask)


@triton.jit
def _reduce_lane(part_ptr, out_ptr, G, lane, STRIDE: tl.constexpr, BG: tl.constexpr):
    # out[lane] = sum over the G rows of part[:, lane] (rows STRIDE apart), fixed order, in
    # out's dtype
    g = tl.arange(0, BG)
    acc = tl.zeros((BG,), tl.float32)
    for g0 in range(0, G, BG):
        acc += tl.load(part_ptr + (g0 + g) * STRIDE + lane, mask=(g0 + g) < G, other=0.0)
    tl.store(out_ptr + lane, tl.sum(acc, axis=0).to(out_ptr.dtype.element_ty))


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
def _group_side(du_ptr, hpre_ptr, g_ptr, hres_ptr, offs_t, mask_t, c0, C, N: tl.constexpr,
                BT: tl.constexpr, BC: tl.constexpr, AGG: tl.constexpr, MIXG: tl.constexpr,
                MIX_T: tl.constexpr):
    """fp32 [BT, N BC] in GROUP's column order (j, c0 + cc): H_pre[t, j] du[t, c] (AGG) +
    sum_i Hm[i, j] g[t, i, c] (MIXG: the mix's dx, the F_post,res backward of Eq. 3, formed
    from its output gradient g [T, N, C] and the fp32 mapping [T, N, N] as
    ``triton_stream._mix_bwd_kernel`` forms it).  du and every g_i are read once per program:
    its tile holds the C block of all N streams."""
    cc = c0 + tl.arange(0, BC)
    jn = tl.arange(0, N)
    t64 = offs_t.to(tl.int64)
    mt = mask_t[:, None]
    side = tl.zeros((BT, N, BC), tl.float32)
    if AGG:
        du = tl.load(du_ptr + t64[:, None] * C + cc[None, :], mask=mt, other=0.0)
        hp = tl.load(hpre_ptr + offs_t[:, None] * N + jn[None, :], mask=mt, other=0.0)
        side += hp[:, :, None] * du.to(tl.float32)[:, None, :]
    if MIXG:
        for i in tl.static_range(N):
            g = tl.load(g_ptr + t64[:, None] * (N * C) + i * C + cc[None, :], mask=mt,
                        other=0.0)
            if MIX_T:  # noqa: SIM108 (constexpr branch); Hm[i, j] = H[j, i]
                hoff = jn * N + i
            else:
                hoff = i * N + jn
            hm = tl.load(hres_ptr + offs_t[:, None] * (N * N) + hoff[None, :], mask=mt,
                         other=0.0)
            side += hm[:, :, None] * g.to(tl.float32)[:, None, :]
    return tl.reshape(side, (BT, N * BC))


@triton.jit
def _proj_bwd_kernel(x_ptr, w_ptr, dproj_ptr, coef_ptr, dx_ptr, dw_part_ptr,
                     du_ptr, hpre_ptr, dxe_ptr, g_ptr, hres_ptr, T, D, C, t_per_split,
                     N: tl.constexpr, K: tl.constexpr, KP: tl.constexpr, BT: tl.constexpr,
                     BD: tl.constexpr, SPLIT_BF16: tl.constexpr, PRESPLIT: tl.constexpr,
                     DW_T: tl.constexpr, AGG: tl.constexpr, EXTRA: tl.constexpr,
                     GROUP: tl.constexpr, MIXG: tl.constexpr, MIX_T: tl.constexpr):
    """One [T-split, BD] stripe: W stays in registers / shared memory, x is streamed once.
    dx = dproj @ W + coef * x is stored per tile; the dW partial of the stripe is
    accumulated over the split's tokens ([BD, KP] as dW^T when DW_T) and stored once; with
    a single T split the partial is dW itself, stored in the weight dtype.
    AGG: dx[t, j*C + c] += H_pre[t, j] * du[t, c] (the aggregate's backward, du [T, C];
    needs C % BD == 0, see ``agg_fold_ok``);
    EXTRA: dx += dx_extra [T, D] (another consumer's gradient of x); both summed in fp32 and
    rounded once; their loads are issued after the tile's dots (before them the site
    backward ran 1035 vs 640 us on the H200, 2026-12-01).  ``dx_ptr`` may be ``dxe_ptr`` (in place:
    each element is read, then written, by the same program).
    GROUP: program pid_d holds the C block c0 = pid_d BC (BC = BD / N) of every stream, columns
    j C + c0 + cc in the tile, so AGG reads du once (not once per stream) and MIXG can add the
    mix's dx sum_i Hm[i, j] g_i from g itself (``_group_side``): the mix backward then writes
    no dx (``triton_site``); needs N a power of two and C % BC == 0 (``group_ok``)."""
    pid_d = tl.program_id(0)
    pid_s = tl.program_id(1)
    if GROUP:
        BC: tl.constexpr = BD // N
        dd = tl.arange(0, BD)
        c0 = pid_d * BC
        offs_d = (dd // BC) * C + c0 + dd % BC
    else:
        offs_d = pid_d * BD + tl.arange(0, BD)
        # AGG: C % BD == 0 (host), so the tile lies in one stream j and du loads are contiguous
        j = (pid_d * BD) // C
        c0 = pid_d * BD - j * C
    mask_d = offs_d < D
    offs_k = tl.arange(0, KP)
    w_off = offs_k[:, None] * D + offs_d[None, :]
    w_mask = mask_d[None, :] & (offs_k[:, None] < K)
    w = tl.load(w_ptr + w_off, mask=w_mask, other=0.0).to(tl.float32)
    if SPLIT_BF16:
        # W = W_hi + W_lo in bf16 (see the module docstring)
        w_hi, w_lo = bf16_pair(w)
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
            if PRESPLIT:  # [T, 2, KP] (store_dproj_pair)
                dp_pair = dproj_ptr + offs_t[:, None] * (2 * KP) + offs_k[None, :]
                dp_hi = tl.load(dp_pair, mask=mask_t[:, None], other=0.0)
                dp_lo = tl.load(dp_pair + KP, mask=mask_t[:, None], other=0.0)
            else:
                dp = tl.load(dproj_ptr + dp_off, mask=mask_t[:, None], other=0.0)
                dp_hi, dp_lo = bf16_pair(dp)
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
        if GROUP:
            if AGG or MIXG:
                dx += _group_side(du_ptr, hpre_ptr, g_ptr, hres_ptr, offs_t, mask_t, c0, C, N,
                                  BT, BC, AGG, MIXG, MIX_T)
            if EXTRA:
                dx += tl.load(dxe_ptr + x_off, mask=mask_x, other=0.0).to(tl.float32)
        elif AGG or EXTRA:
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


@triton.jit
def _finalize_kernel(dw_part_ptr, dw_ptr, dbias_part_ptr, dbias_ptr, dalpha_part_ptr,
                     dalpha_ptr, S, KD, G,
                     K: tl.constexpr, KP: tl.constexpr, BLOCK: tl.constexpr, BG: tl.constexpr):
    """Programs 0 .. K-1: d bias[k], K .. K+2: d alpha[a], each the sum of one lane of the
    gate backward's G partial rows (one lane per program: one program walking all G rows
    was the kernel's longest, 7.8-8.2 us at G 1024 on the H200, 2026-12-01); programs
    K+3 .. (only with several T splits): dW = sum_s dw_part[s] in the weight dtype.  Fixed
    summation order, so the result is deterministic."""
    pid = tl.program_id(0)
    if pid < K:
        _reduce_lane(dbias_part_ptr, dbias_ptr, G, pid, KP, BG)
    elif pid < K + 3:
        _reduce_lane(dalpha_part_ptr, dalpha_ptr, G, pid - K, 4, BG)
    else:
        offs = (pid - K - 3) * BLOCK + tl.arange(0, BLOCK)
        m = offs < KD
        acc = tl.load(dw_part_ptr + offs, mask=m, other=0.0)
        for s in range(1, S):
            acc += tl.load(dw_part_ptr + s * KD + offs, mask=m, other=0.0)
        tl.store(dw_ptr + offs, acc.to(dw_ptr.dtype.element_ty), mask=m)


@triton.jit
def _proj_bwd_tma_kernel(x_desc, w_ptr, dp_desc, coef_ptr, dx_desc, dw_part_ptr,
                         du_desc, hpre_ptr, dxe_desc, T, D, C, N, t_per_split,
                         K: tl.constexpr, KP: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
                         AGG: tl.constexpr, EXTRA: tl.constexpr):
    """``_proj_bwd_kernel`` for bf16 streams, presplit dproj and DW_T, with x, the dproj pair,
    du and dx_extra loaded and dx stored through TMA descriptors: tiles past T read as 0
    (they add nothing to dW) and their dx rows are not written.
    The dproj pair [BT, 2 KP] (hi | lo, one TMA box) is one operand, so a tile is 3 dots:
    dx = pair @ [W_hi; W_hi] + pair @ [W_lo; W_lo] (hi hi + lo hi + hi lo, and the lo lo term
    that only adds accuracy), dW^T += x^T @ pair with hi and lo in separate fp32 lanes added
    once at the end.  Triton folds that add into the wgmma accumulator, so the dW chain
    runs on the tensor cores over the split's tiles, not one tile as in the forward: dW
    5.3e-6 of max |dW| against fp64 at T 8192 (2.6e-6 with the 5 dots, whose tiles were
    summed in fp32; run 9).  Five dots over the two halves ran 148.9-150.5 us
    against 139.5-141.1 (coefficient backward, H200, 2026-12-01: kernels_sweeps_h200.md
    run 9)."""
    pid_d = tl.program_id(0)
    pid_s = tl.program_id(1)
    d0 = pid_d * BD
    offs_d = d0 + tl.arange(0, BD)
    mask_d = offs_d < D
    offs_k = tl.arange(0, KP)
    # [2 KP, BD]: row r holds W[r % KP] (rows >= K of each half read as 0)
    k2 = tl.arange(0, 2 * KP) % KP
    w = tl.load(w_ptr + k2[:, None] * D + offs_d[None, :],
                mask=mask_d[None, :] & (k2[:, None] < K), other=0.0).to(tl.float32)
    w_hi, w_lo = bf16_pair(w)  # W = W_hi + W_lo in bf16 (see triton_proj)
    acc = tl.zeros((BD, 2 * KP), tl.float32)
    j = d0 // C  # AGG: C % BD == 0 (host), the tile lies in stream j
    c0 = d0 - j * C
    t_start = pid_s * t_per_split  # a multiple of BT: splits never overlap
    for t0 in range(0, t_per_split, BT):
        tt = t_start + t0
        offs_t = tt + tl.arange(0, BT)
        mask_t = offs_t < T
        x = x_desc.load([tt, d0])
        cf = tl.load(coef_ptr + offs_t, mask=mask_t, other=0.0)
        xt = tl.trans(x)
        dp = dp_desc.load([tt, 0])  # [BT, 2 KP]
        # dW first: Triton 3.6 folds this add into a wgmma it leaves pending, and x (also
        # loaded to registers below) gets a ring of 2 at prefetch distance 2, so a wgmma
        # still pending when the TMA for tile i + 2 is issued reads an overwritten x tile
        # (see triton_proj._proj_fwd_tma_kernel).  The dx dots after it wait for every
        # wgmma group before the TMA is issued.
        acc += tl.dot(xt, dp)  # chained over the tiles (see the docstring)
        dx = tl.dot(dp, w_hi)
        dx = tl.dot(dp, w_lo, dx)
        dx += cf[:, None] * x.to(tl.float32)
        if AGG:
            hp = tl.load(hpre_ptr + offs_t * N + j, mask=mask_t, other=0.0)
            dx += hp[:, None] * du_desc.load([tt, c0]).to(tl.float32)
        if EXTRA:
            dx += dxe_desc.load([tt, d0]).to(tl.float32)
        dx_desc.store([tt, d0], dx.to(dx_desc.dtype))
    acc = tl.sum(tl.reshape(acc, (BD, 2, KP)), axis=1)
    tl.store(dw_part_ptr + pid_s * K * D + offs_k[None, :] * D + offs_d[:, None],
             acc.to(dw_part_ptr.dtype.element_ty),
             mask=mask_d[:, None] & (offs_k[None, :] < K))


def proj_backward(x_TD, w_KD, dproj, coef, dx_TD, dw_part, du_TC, H_pre, dx_extra, *,
                  C, N, K, KP, bf16, presplit, tile, t_per_split, S, mix_g=None, group=False):
    """Launch (4): ``_proj_bwd_tma_kernel`` where it applies (``CONFIG["proj_bwd_tma"]``, or
    ``"proj_bwd_site_tma"`` with the site's operands; bf16, presplit dproj, DW_T, aligned
    operands), else ``_proj_bwd_kernel`` (GROUP tiles when ``group``; ``mix_g`` = (g [T, D],
    fp32 H_res [T, N, N], mix_transposed): the mix's dx formed in the kernel, MIXG)."""
    T, D = x_TD.shape
    BT, BD, warps, stages, dw_t, _ = tile
    agg, extra = du_TC is not None, dx_extra is not None
    operands = [x_TD, dx_TD] + ([du_TC] if agg else []) + ([dx_extra] if extra else [])
    if (not group and CONFIG["proj_bwd_site_tma" if agg or extra else "proj_bwd_tma"] and bf16
            and presplit and dw_t and all(_tma_ok(t) for t in operands)):
        def desc(t):
            return TensorDescriptor.from_tensor(t, [BT, BD])

        x_desc = desc(x_TD)
        _proj_bwd_tma_kernel[(triton.cdiv(D, BD), S)](
            x_desc, w_KD, TensorDescriptor.from_tensor(dproj.view(T, 2 * KP), [BT, 2 * KP]),
            coef, desc(dx_TD), dw_part, desc(du_TC) if agg else x_desc,
            H_pre if agg else coef, desc(dx_extra) if extra else x_desc,
            T, D, C, N, t_per_split, K=K, KP=KP, BT=BT, BD=BD, AGG=agg, EXTRA=extra,
            num_warps=warps, num_stages=stages)
        return
    if group:  # tile[1] is the C block BC of each stream; the tile is N BC wide
        assert C % BD == 0 and N & (N - 1) == 0, (C, BD, N)
        grid, BD = (C // BD, S), N * BD
    else:
        grid = (triton.cdiv(D, BD), S)
    g, hres, mix_t = mix_g if mix_g is not None else (x_TD, coef, False)
    _proj_bwd_kernel[grid](
        x_TD, w_KD, dproj, coef, dx_TD, dw_part, du_TC if agg else x_TD,
        H_pre if agg else coef, dx_extra if extra else x_TD, g, hres, T, D, C, t_per_split,
        N=N, K=K, KP=KP, BT=BT, BD=BD, SPLIT_BF16=bf16, PRESPLIT=presplit, DW_T=dw_t,
        AGG=agg, EXTRA=extra, GROUP=group, MIXG=mix_g is not None, MIX_T=mix_t,
        num_warps=warps, num_stages=stages)


class BwdWork(NamedTuple):
    """The projection backward's T split and its one fp32 workspace (``bwd_work``)."""

    tile: tuple  # CONFIG["proj_bwd"], ["proj_bwd_site"] or ["proj_bwd_group"]
    group: bool  # GROUP tiles (``_proj_bwd_kernel``): tile[1] is the C block of a stream
    S: int  # T splits (dW partials); 1: the kernel writes dW itself
    t_per_split: int
    G: int  # programs of the gate backward (rows of the d bias / d alpha partials)
    presplit: bool  # dproj is the bf16 (hi, lo) pair [T, 2, KP] (store_dproj_pair)
    dproj: torch.Tensor  # [T, KP] fp32, or the pair in the same bytes
    dw_part: torch.Tensor  # [S, K, D] fp32 partials, or dW when S == 1
    coef: torch.Tensor  # [T] RMS chain coefficient
    dbias_part: torch.Tensor  # [G, KP]
    dalpha_part: torch.Tensor  # [G, 4]
    extra: torch.Tensor  # caller's scratch (the coefficient backward's Sinkhorn history)
    dW: torch.Tensor  # [K, D] in the weight dtype


def bwd_work(T, D, K, KP, G, *, site, bf16, w_dtype, device, extra=0, group_n=0) -> BwdWork:
    """T split of the projection backward (``CONFIG["proj_bwd_site"]`` when the site's AGG /
    EXTRA operands go in, ``"proj_bwd_group"`` for GROUP tiles of ``group_n`` streams,
    ``"proj_bwd"`` otherwise; ``waves`` programs per SM) and one fp32 workspace:
    dproj | dW partials (S > 1) | coef | d bias / d alpha partials | extra."""
    tile = CONFIG["proj_bwd_group" if group_n else "proj_bwd_site" if site else "proj_bwd"]
    BT, BD, _, _, _, waves = tile
    n_d = triton.cdiv(D, BD * (group_n or 1))
    n_t = triton.cdiv(T, BT)
    S = max(1, min(n_t, round(waves * _sm_count(device) / n_d)))
    t_per_split = triton.cdiv(n_t, S) * BT
    S = triton.cdiv(T, t_per_split)
    dW = torch.empty((K, D), dtype=w_dtype, device=device)
    presplit = bf16 and CONFIG["proj_bwd_presplit"]
    sizes = (T * KP, 0 if S == 1 else S * K * D, T, G * KP, G * 4, extra)
    ws = torch.empty(sum(sizes), dtype=torch.float32, device=device)
    dproj, dw_part, coef, dbias_part, dalpha_part, extra_ws = ws.split(sizes)
    if presplit:
        dproj = dproj.view(torch.bfloat16)  # [T, 2, KP] bf16 in the same bytes
    return BwdWork(tile, group_n > 0, S, t_per_split, G, presplit, dproj,
                   dW if S == 1 else dw_part, coef, dbias_part, dalpha_part, extra_ws, dW)


def bwd_finish(work: BwdWork, x_TD, w_KD, bias_dtype, dx_TD, du_TC, H_pre, dx_extra, *,
               C, N, K, KP, bf16, mix_g=None):
    """Launches (4) and (5) once the gate backward has filled ``work``'s dproj, coef and
    partials (``mix_g``: see ``proj_backward``).  Returns (dW in the weight dtype, d bias [K]
    in ``bias_dtype``, d alpha [4] fp32: lanes 0-2 the sums of the gate backward's d alpha
    partials)."""
    proj_backward(x_TD, w_KD, work.dproj, work.coef, dx_TD, work.dw_part, du_TC, H_pre,
                  dx_extra, C=C, N=N, K=K, KP=KP, bf16=bf16, presplit=work.presplit,
                  tile=work.tile, t_per_split=work.t_per_split, S=work.S, mix_g=mix_g,
                  group=work.group)
    D = x_TD.shape[1]
    dbias = torch.empty((K,), dtype=bias_dtype, device=x_TD.device)
    dalpha = torch.empty((4,), dtype=torch.float32, device=x_TD.device)
    BLOCK, BG, warps = CONFIG["finalize"]
    _finalize_kernel[(K + 3 + (0 if work.S == 1 else triton.cdiv(K * D, BLOCK)),)](
        work.dw_part, work.dW, work.dbias_part, dbias, work.dalpha_part, dalpha, work.S,
        K * D, work.G, K=K, KP=KP, BLOCK=BLOCK, BG=BG, num_warps=warps)
    return work.dW, dbias, dalpha
