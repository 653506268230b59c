"""Triton kernels for the stream-side mHC ops, forward and backward (memory bound).

aggregate   u = sum_j H_pre[j] x_j                        (F_pre, paper Eq. 3 / 14)
mix_post    x'[i] = sum_j Hm[i,j] x_j + H_post[i] y       (F_post,res, Eq. 3)
            Hm = H_res^T (MIX_T: Convention.mix_transposed) or H_res
broadcast   x[i] = h (the stream start; the mean contract's backward with h = g / N)

All arithmetic is fp32 in registers; streams are read and written once in their own dtype.
Backward kernels run one program per token and loop over C so the reductions over C that
give dH_pre / dH_post / dH_res stay in registers (deterministic, no atomics).  Tiles are
3-D [NP(i), NP(j), BC] so the N x N contractions are intra-thread broadcasts; the mix backward
reduces each C tile into its dH accumulators as it goes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mhc_model.conventions import convention
from mhc_model.kernels.triton_proj import _pow2


@triton.jit
def _agg_fwd_kernel(x_ptr, h_ptr, u_ptr, C, N: tl.constexpr, NP: tl.constexpr,
                    BC: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    n = tl.arange(0, NP)
    mn = n < N
    mc = c < C
    h = tl.load(h_ptr + t * N + n, mask=mn, other=0.0)
    X = tl.load(x_ptr + t * N * C + n[:, None] * C + c[None, :],
                mask=mn[:, None] & mc[None, :], other=0.0).to(tl.float32)
    u = tl.sum(h[:, None] * X, axis=0)
    tl.store(u_ptr + t * C + c, u.to(u_ptr.dtype.element_ty), mask=mc)


@triton.jit
def _agg_bwd_kernel(x_ptr, h_ptr, du_ptr, dx_ptr, dh_ptr, C, N: tl.constexpr,
                    NP: tl.constexpr, BC: tl.constexpr, NEED_DX: tl.constexpr,
                    NEED_DH: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    n = tl.arange(0, NP)
    mn = n < N
    h = tl.load(h_ptr + t * N + n, mask=mn, other=0.0)
    acc = tl.zeros((NP, BC), tl.float32)
    for c0 in range(0, C, BC):
        c = c0 + tl.arange(0, BC)
        mc = c < C
        m2 = mn[:, None] & mc[None, :]
        off = t * N * C + n[:, None] * C + c[None, :]
        du = tl.load(du_ptr + t * C + c, mask=mc, other=0.0).to(tl.float32)
        if NEED_DX:
            tl.store(dx_ptr + off, (h[:, None] * du[None, :]).to(dx_ptr.dtype.element_ty), mask=m2)
        if NEED_DH:
            X = tl.load(x_ptr + off, mask=m2, other=0.0).to(tl.float32)
            acc += X * du[None, :]
    if NEED_DH:
        tl.store(dh_ptr + t * N + n, tl.sum(acc, axis=1), mask=mn)


@triton.jit
def _mix_fwd_kernel(x_ptr, hres_ptr, hpost_ptr, y_ptr, out_ptr, C, N: tl.constexpr,
                    NP: tl.constexpr, BC: tl.constexpr, MIX_T: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, NP)[:, None, None]
    j = tl.arange(0, NP)[None, :, None]
    c = (tl.program_id(1) * BC + tl.arange(0, BC))[None, None, :]
    mi = i < N
    mj = j < N
    mc = c < C
    if MIX_T:  # noqa: SIM108 (constexpr branch); Hm[i, j] = H[j, i]
        hoff = j * N + i
    else:
        hoff = i * N + j
    Hm = tl.load(hres_ptr + t * N * N + hoff, mask=mi & mj, other=0.0)  # [NP, NP, 1]
    hp = tl.load(hpost_ptr + t * N + i, mask=mi, other=0.0)  # [NP, 1, 1]
    X = tl.load(x_ptr + t * N * C + j * C + c, mask=mj & mc, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + t * C + c, mask=mc, other=0.0).to(tl.float32)  # [1, 1, BC]
    out = tl.sum(Hm * X, axis=1, keep_dims=True) + hp * y  # [NP, 1, BC]
    tl.store(out_ptr + t * N * C + i * C + c, out.to(out_ptr.dtype.element_ty), mask=mi & mc)


@triton.jit
def _mix_bwd_kernel(x_ptr, hres_ptr, hpost_ptr, y_ptr, g_ptr, dx_ptr, dhres_ptr, dhpost_ptr,
                    dy_ptr, C, N: tl.constexpr, NP: tl.constexpr, BC: tl.constexpr,
                    MIX_T: tl.constexpr, NEED_DX: tl.constexpr):
    # NEED_DX False: the site's projection backward forms dx_j = sum_i Hm[i, j] g_i itself
    # from g (``triton_site``), so this pass writes no nC tensor
    t = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, NP)[:, None, None]
    j = tl.arange(0, NP)[None, :, None]
    mi = i < N
    mj = j < N
    if MIX_T:  # noqa: SIM108 (constexpr branch)
        hoff = j * N + i
    else:
        hoff = i * N + j
    Hm = tl.load(hres_ptr + t * N * N + hoff, mask=mi & mj, other=0.0)
    hp = tl.load(hpost_ptr + t * N + i, mask=mi, other=0.0)
    # the C tile is reduced every step into [.., 1]: 72-80 registers, where per-lane
    # [.., BC] accumulators reduced once at the end needed 96-185 and ran 335 vs 233 us
    # (H200, 2026-12-01)
    acc_res = tl.zeros((NP, NP, 1), tl.float32)
    acc_post = tl.zeros((NP, 1, 1), tl.float32)
    for c0 in range(0, C, BC):
        c = (c0 + tl.arange(0, BC))[None, None, :]
        mc = c < C
        G = tl.load(g_ptr + t * N * C + i * C + c, mask=mi & mc, other=0.0).to(tl.float32)
        X = tl.load(x_ptr + t * N * C + j * C + c, mask=mj & mc, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + t * C + c, mask=mc, other=0.0).to(tl.float32)
        # dy = sum_i H_post[i] g_i ; dx_j = sum_i Hm[i, j] g_i
        dy = tl.sum(hp * G, axis=0, keep_dims=True)
        tl.store(dy_ptr + t * C + c, dy.to(dy_ptr.dtype.element_ty), mask=mc)
        if NEED_DX:
            dx = tl.sum(Hm * G, axis=0, keep_dims=True)
            tl.store(dx_ptr + t * N * C + j * C + c, dx.to(dx_ptr.dtype.element_ty),
                     mask=mj & mc)
        acc_res += tl.sum(G * X, axis=2, keep_dims=True)
        acc_post += tl.sum(G * y, axis=2, keep_dims=True)
    # dHm[i, j] = sum_c g_i x_j, written back through the same (transposing) offsets.
    tl.store(dhres_ptr + t * N * N + hoff, tl.sum(acc_res, axis=2, keep_dims=True),
             mask=mi & mj)
    tl.store(dhpost_ptr + t * N + i, tl.sum(acc_post, axis=2, keep_dims=True), mask=mi)


@triton.jit
def _broadcast_kernel(h_ptr, out_ptr, C, N: tl.constexpr, BC: tl.constexpr, DIV: tl.constexpr):
    # out[t, i, c] = h[t, c] (DIV: h / N, fp32 correctly rounded, then the output dtype)
    t = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    mc = c < C
    h = tl.load(h_ptr + t * C + c, mask=mc, other=0.0)
    if DIV:
        h = tl.math.div_rn(h.to(tl.float32), tl.full((BC,), N, tl.float32))
    h = h.to(out_ptr.dtype.element_ty)
    for i in tl.static_range(N):
        tl.store(out_ptr + (t * N + i) * C + c, h, mask=mc)


def broadcast_streams(h_TC, n: int, divide: bool = False):
    """[T, n, C] with every stream h (``divide``: h / n in fp32, rounded to h's dtype): a
    contiguous write of n C per token, where ``expand(...).contiguous()`` took torch's
    strided copy at ~0.8 TB/s on the H200 (step profile)."""
    h = h_TC.contiguous()
    T, C = h.shape
    out = torch.empty((T, n, C), dtype=h.dtype, device=h.device)
    BC = min(_pow2(C), 2048)
    if T > 0:
        _broadcast_kernel[(T, triton.cdiv(C, BC))](h, out, C, N=n, BC=BC, DIV=divide,
                                                   num_warps=4)
    return out


# Tunables: (register budget per program in fp32 elements, warps).  The C tile is
# budget / NP (aggregate) or budget / NP^2 (mix, whose tiles are [NP, NP, BC]).
CONFIG = {
    "agg_fwd": (8192, 4),
    "agg_bwd": (4096, 4),
    "mix_fwd": (16384, 4),
    # H200 sweeps 2026-12-01: C reduced every step (72-80 registers instead of 96-185 for
    # per-lane accumulators: more tokens in flight per SM), C tile 1024: 233 us vs 335 at
    # (4096, 4) with per-lane accumulators (0.95 of copy bandwidth)
    "mix_bwd": (16384, 4),
}


def _bc(C: int, NP: int, name: str, square: bool) -> tuple[int, int]:
    budget, warps = CONFIG[name]
    per = NP * NP if square else NP
    return max(16, min(_pow2(C), budget // per)), warps


def agg_forward(x, h):
    """u [T, C] = sum_j h[t, j] x[t, j] (x contiguous [T, N, C], h fp32 [T, N])."""
    T, N, C = x.shape
    NP = _pow2(N)
    u_TC = torch.empty((T, C), dtype=x.dtype, device=x.device)
    BC, warps = _bc(C, NP, "agg_fwd", False)
    if T > 0:
        _agg_fwd_kernel[(T, triton.cdiv(C, BC))](x, h, u_TC, C, N=N, NP=NP, BC=BC,
                                                 num_warps=warps)
    return u_TC


def agg_backward(x, h, du, need_dx: bool, need_dh: bool):
    """(dx or None, dh fp32 [T, N] or None) of ``agg_forward``."""
    T, N, C = x.shape
    NP = _pow2(N)
    du = du.contiguous()
    dx = torch.empty_like(x) if need_dx else x
    dh = torch.empty((T, N), dtype=torch.float32, device=x.device) if need_dh else h
    BC, warps = _bc(C, NP, "agg_bwd", False)
    if T > 0 and (need_dx or need_dh):
        _agg_bwd_kernel[(T,)](x, h, du, dx, dh, C, N=N, NP=NP, BC=BC, NEED_DX=need_dx,
                              NEED_DH=need_dh, num_warps=warps)
    return (dx if need_dx else None), (dh if need_dh else None)


def mix_forward(x, hr, hp, y, mix_t: bool):
    """x' = mix(H_res, x) + H_post y (contiguous inputs, fp32 mappings)."""
    T, N, C = x.shape
    NP = _pow2(N)
    out = torch.empty_like(x)
    BC, warps = _bc(C, NP, "mix_fwd", True)
    if T > 0:
        _mix_fwd_kernel[(T, triton.cdiv(C, BC))](x, hr, hp, y, out, C, N=N, NP=NP, BC=BC,
                                                 MIX_T=mix_t, num_warps=warps)
    return out


def mix_backward(x, hr, hp, y, g, mix_t: bool, need_dx: bool = True):
    """(dx or None, dH_res fp32, dH_post fp32, dy) of ``mix_forward``; g contiguous."""
    T, N, C = x.shape
    NP = _pow2(N)
    dx = torch.empty_like(x) if need_dx else x
    dy = torch.empty_like(y)
    dhr = torch.empty((T, N, N), dtype=torch.float32, device=x.device)
    dhp = torch.empty((T, N), dtype=torch.float32, device=x.device)
    BC, warps = _bc(C, NP, "mix_bwd", True)
    if T > 0:
        _mix_bwd_kernel[(T,)](x, hr, hp, y, g, dx, dhr, dhp, dy, C, N=N, NP=NP, BC=BC,
                              MIX_T=mix_t, NEED_DX=need_dx, num_warps=warps)
    return (dx if need_dx else None), dhr, dhp, dy


class Aggregate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TNC, H_pre_TN):
        x = x_TNC.contiguous()
        h = H_pre_TN.float().contiguous()
        ctx.save_for_backward(x, h)
        ctx.h_dtype = H_pre_TN.dtype
        return agg_forward(x, h)

    @staticmethod
    def backward(ctx, du_TC):
        x, h = ctx.saved_tensors
        dx, dh = agg_backward(x, h, du_TC, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return dx, (dh.to(ctx.h_dtype) if dh is not None else None)


class MixPost(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TNC, H_res_TNN, H_post_TN, y_TC, conv):
        mix_t = convention(conv).mix_transposed
        x = x_TNC.contiguous()
        hr = H_res_TNN.float().contiguous()
        hp = H_post_TN.float().contiguous()
        y = y_TC.contiguous()
        ctx.save_for_backward(x, hr, hp, y)
        ctx.meta = (mix_t, H_res_TNN.dtype, H_post_TN.dtype)
        return mix_forward(x, hr, hp, y, mix_t)

    @staticmethod
    def backward(ctx, g_TNC):
        x, hr, hp, y = ctx.saved_tensors
        mix_t, hr_dtype, hp_dtype = ctx.meta
        dx, dhr, dhp, dy = mix_backward(x, hr, hp, y, g_TNC.contiguous(), mix_t)
        return dx, dhr.to(hr_dtype), dhp.to(hp_dtype), dy, None


class ExpandStreams(torch.autograd.Function):
    """Stream start x [T, N, C] = N copies of h [T, C] (``mhc_ref.expand``).  The backward sums
    the N stream gradients with the aggregate kernel (H = 1: fp32 sum, rounded once, as
    autograd's sum over the expanded dim, up to the order of the N additions): one read of
    N C and one write of C, where the generic reduction over a middle dim of 4 ran at ~40%
    of copy bandwidth (H200 profile)."""

    @staticmethod
    def forward(ctx, h_TC, n):
        ctx.n = n
        return broadcast_streams(h_TC, n)

    @staticmethod
    def backward(ctx, g_TNC):
        g = g_TNC.contiguous()
        ones = torch.ones((g.shape[0], ctx.n), dtype=torch.float32, device=g.device)
        return agg_forward(g, ones), None


class ContractMean(torch.autograd.Function):
    """u [T, C] = mean_j x_j in the stream dtype (``mhc_ref.contract_mean``, the mean output
    contract).  Forward: the aggregate kernel with H = 1/N (fp32 in registers, one rounding;
    the reference's fp32 mean up to the order of the N additions, and for N not a power of
    two the rounding of 1/N), where ``x.float().mean(1)`` writes and re-reads an fp32 copy of
    all N streams.  Backward: g / N (fp32, correctly rounded) in the stream dtype, written to
    every stream in one pass: the reference's values, whose fp32 g / N per stream element
    rounds to the same number."""

    @staticmethod
    def forward(ctx, x_TNC):
        x = x_TNC.contiguous()
        T, N, _ = x.shape
        ctx.n = N
        w = torch.full((T, N), 1.0 / N, dtype=torch.float32, device=x.device)
        return agg_forward(x, w)

    @staticmethod
    def backward(ctx, g_TC):
        return broadcast_streams(g_TC, ctx.n, divide=True)
