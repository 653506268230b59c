"""Triton forms of the coefficient forward's pieces (lab: ``bench/coef_fwd_variants.py`` times
them; kernels_sweeps_h200.md run 12).

Projection variants (``_proj_var_kernel``, the shipped Triton TMA loop with switches):
  MODE 0 the shipped work (sum of squares + hi / lo dots), 1 the sum of squares only (the x
  stream with no weight: a floor), 2 the dots only, 3 the squares plus the weight loads
  (no dots), 4 / 5 the dots (with / without the squares) on the weight tile of D 0 loaded
  once: no weight stream; IL: split s takes D tiles s, s + S, ... (interleaved) instead of a
  contiguous range; WS: ``tl.range(warp_specialize=True)``; PF: x tile i + PF prefetched
  into L2 at tile i, by bulk prefetches of 256-byte row segments or (PF_LINES) one
  ``prefetch.global.L2`` per 128-byte line.
Epilogue variants (``_epi_var_kernel``): the S partials summed in an unrolled loop (S a
constexpr) with bias and alphas loaded before them, and optionally without the ``proj``
copy the backward reads.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mhc_model.kernels import triton_proj
from mhc_model.kernels.triton_epi import _rms, coef_index
from mhc_model.kernels.triton_proj import TensorDescriptor, _pow2, _store_partial, proj_split
from mhc_model.kernels.triton_sinkhorn import sinkhorn_fwd

T, N, C, ITERS, EPS = 8192, 4, 4096, 20, 1e-6
D, K = N * C, N * N + 2 * N
KP = max(16, _pow2(K))


@triton.jit
def _prefetch_l2(ptrs):
    # one bulk L2 prefetch of 256 contiguous bytes (a BD 128 bf16 row segment) from each
    # pointer (sm_90); a hint: nothing lands in shared memory or registers
    return tl.inline_asm_elementwise(
        "cp.async.bulk.prefetch.L2.global [$1], 256; mov.u32 $0, 0;", "=r,l",
        [ptrs], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _prefetch_lines(ptrs):
    # prefetch.global.L2: one 128-byte line per pointer into L2 through the load path (no
    # data returned, nothing allocated in L1)
    return tl.inline_asm_elementwise(
        "prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l",
        [ptrs], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _proj_var_kernel(x_desc, w_desc, part_ptr, x_ptr, T, D, d_per_split, n_tiles, S,
                     K: tl.constexpr, KP: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
                     MODE: tl.constexpr, IL: tl.constexpr, WS: tl.constexpr,
                     STAGES: tl.constexpr, PF: tl.constexpr, PF_LINES: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_s = tl.program_id(1)
    t0 = pid_t * BT
    offs_k = tl.arange(0, KP)
    acc = tl.zeros((BT, KP), tl.float32)
    sq = tl.zeros((BT, BD), tl.float32)
    rows = x_ptr + tl.minimum(t0 + tl.arange(0, BT), T - 1).to(tl.int64) * D
    if MODE >= 4:  # the weight pair of tile 0 only: the dots without the weight stream
        w_hi0 = w_desc.load([0, 0])
        w_lo0 = w_desc.load([KP, 0])
    for i in tl.range(0, n_tiles, num_stages=STAGES, warp_specialize=WS):
        if IL:  # noqa: SIM108 (a constexpr branch, compiled out)
            d = (i * S + pid_s) * BD
        else:
            d = pid_s * d_per_split + i * BD
        if PF > 0:  # x tile i + PF into L2 (the last tile again near the end)
            j = tl.minimum(i + PF, n_tiles - 1)
            if IL:  # noqa: SIM108
                dp = (j * S + pid_s) * BD
            else:
                dp = pid_s * d_per_split + j * BD
            if PF_LINES:  # [BT, BD / 64] lines of 64 bf16
                lines = rows[:, None] + dp + tl.arange(0, BD // 64)[None, :] * 64
                _prefetch_lines(lines)
            else:
                _prefetch_l2(rows + dp)
        x = x_desc.load([t0, d])
        if MODE >= 4:
            tile = tl.dot(x, tl.trans(w_hi0))
            acc += tl.dot(x, tl.trans(w_lo0), tile)
        if MODE != 2 and MODE != 5:
            xf = x.to(tl.float32)
            sq += xf * xf
        if MODE != 1 and MODE < 4:
            w_hi = w_desc.load([0, d])
            w_lo = w_desc.load([KP, d])
            if MODE == 3:
                acc += (tl.sum(w_hi.to(tl.float32), axis=1)
                        + tl.sum(w_lo.to(tl.float32), axis=1))[None, :]
            else:
                tile = tl.dot(x, tl.trans(w_hi))
                acc += tl.dot(x, tl.trans(w_lo), tile)
    acc = tl.where(offs_k[None, :] == K, tl.sum(sq, axis=1)[:, None], acc)
    _store_partial(part_ptr, acc, pid_s, t0, T, KP, BT)


@triton.jit
def _epi_var_kernel(part_ptr, bias_ptr, apre_ptr, apost_ptr, ares_ptr,
                    pre_ptr, post_ptr, res_ptr, proj_ptr, T, D, eps,
                    NS: tl.constexpr, N: tl.constexpr, NP: tl.constexpr, K: tl.constexpr,
                    KP: tl.constexpr, BT: tl.constexpr, ITERS: tl.constexpr,
                    STORE_PROJ: tl.constexpr, RCP_APPROX: tl.constexpr):
    # deepseek convention: rsqrt_mean RMS, softmax-first Sinkhorn, H_pre + eps
    t, mt, n, mn, t2, n2, m2, t3, i3, j3, valid, m3, k_res = coef_index(
        tl.program_id(0) * BT, T, N, NP, BT)
    a_pre = tl.load(apre_ptr)
    a_post = tl.load(apost_ptr)
    a_res = tl.load(ares_ptr)
    b_pre = tl.load(bias_ptr + n2, mask=mn[None, :], other=0.0)
    b_post = tl.load(bias_ptr + N + n2, mask=mn[None, :], other=0.0)
    b_res = tl.load(bias_ptr + k_res, mask=valid, other=0.0)
    p_pre = tl.zeros((BT, NP), tl.float32)
    p_post = tl.zeros((BT, NP), tl.float32)
    p_res = tl.zeros((BT, NP, NP), tl.float32)
    ss = tl.zeros((BT,), tl.float32)
    for s in tl.static_range(NS):
        base = part_ptr + s * T * KP
        p_pre += tl.load(base + t2 * KP + n2, mask=m2, other=0.0)
        p_post += tl.load(base + t2 * KP + N + n2, mask=m2, other=0.0)
        p_res += tl.load(base + t3 * KP + k_res, mask=m3, other=0.0)
        ss += tl.load(base + t * KP + K, mask=mt, other=0.0)
    if STORE_PROJ:
        tl.store(proj_ptr + t2 * KP + n2, p_pre, mask=m2)
        tl.store(proj_ptr + t2 * KP + N + n2, p_post, mask=m2)
        tl.store(proj_ptr + t3 * KP + k_res, p_res, mask=m3)
        tl.store(proj_ptr + t * KP + K, ss, mask=mt)
    r = _rms(ss, D, eps, False)
    h_pre = r[:, None] * p_pre * a_pre + b_pre
    h_post = r[:, None] * p_post * a_post + b_post
    h_res = r[:, None, None] * p_res * a_res + b_res
    tl.store(pre_ptr + t2 * N + n2, tl.sigmoid(h_pre) + eps, mask=m2)
    tl.store(post_ptr + t2 * N + n2, 2.0 * tl.sigmoid(h_post), mask=m2)
    M = sinkhorn_fwd(h_res, valid, eps, ITERS, True, RCP_APPROX)
    tl.store(res_ptr + t3 * (N * N) + i3 * N + j3, M, mask=m3)


def proj_var(x, W, tile, mode=0, il=False, ws=False, w=None, pf=0, pf_lines=False):
    BT, BD, warps, stages, per_sm = tile
    assert pf == 0 or BD == 128, "the L2 prefetch is written for 256-byte row segments"
    S, d_per_split = proj_split(T, D, BT, BD, per_sm, x.device)
    n_d = triton.cdiv(D, BD)
    n_tiles = triton.cdiv(n_d, S) if il else d_per_split // BD
    part = torch.empty((S, T, KP), dtype=torch.float32, device=x.device)
    w = triton_proj.split_weight(W, KP) if w is None else w
    x_desc = TensorDescriptor.from_tensor(x, [BT, BD])
    w_desc = TensorDescriptor.from_tensor(w.view(2 * KP, D), [KP, BD])
    _proj_var_kernel[(triton.cdiv(T, BT), S)](
        x_desc, w_desc, part, x, T, D, d_per_split, n_tiles, S, K=K, KP=KP, BT=BT, BD=BD,
        MODE=mode, IL=il, WS=ws, STAGES=stages, PF=pf, PF_LINES=pf_lines, num_warps=warps,
        num_stages=stages)
    return part


def epi_var(part, b, al, BT=16, warps=1, store_proj=True):
    S = part.shape[0]
    dev = part.device
    H_pre = torch.empty((T, N), dtype=torch.float32, device=dev)
    H_post = torch.empty((T, N), dtype=torch.float32, device=dev)
    H_res = torch.empty((T, N, N), dtype=torch.float32, device=dev)
    proj = torch.empty((T, KP), dtype=torch.float32, device=dev)
    _epi_var_kernel[(triton.cdiv(T, BT),)](
        part, b, *al, H_pre, H_post, H_res, proj, T, D, EPS, NS=S, N=N, NP=_pow2(N), K=K,
        KP=KP, BT=BT, ITERS=ITERS, STORE_PROJ=store_proj,
        RCP_APPROX=triton_proj.rcp_approx(), num_warps=warps)
    return H_pre, H_post, H_res
