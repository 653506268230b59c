"""The learned output contract (DeepSeek-V4 "hc_head") as fused Triton kernels.

Math (``mhc_ref.contract_learned``; Megatron dsv4 ``hyper_connection.py:117``
``learned_output_contract``), x [T, N, C] flattened to x_TD (D = N C), fp32 arithmetic:

    p   = x_TD @ fn^T                      [T, N]
    r   = rsqrt(sum_d x^2 / D + eps)       [T]
    pre = sigmoid(p r scale + base) + eps  [T, N]
    y   = sum_j pre_j x_j                  [T, C], in x's dtype

It is the mHC coefficient pipeline (``triton_coef``, paper Eq. 14-17) restricted to one gate
group of K = N lanes, with ``scale`` in the place of alpha_pre and the rsqrt_mean RMS factor,
followed by the aggregate F_pre (``triton_stream``).  KP = max(16, pow2(N + 1)) lanes: lane
K = N must be free for the sum of squares, so the projection runs ``proj_forward`` unchanged.

forward
  1. ``triton_proj.proj_forward``  x_TD @ fn^T on tensor cores + the sum of squares in lane N,
     D-split partials [S, T, KP] (x is read once).
  2. ``_head_fwd_kernel``          fixed-order sum of the partials, the RMS factor, scale /
     base, sigmoid + eps: pre [T, N] and the summed lanes proj [T, KP] (kept for backward).
  3. ``triton_stream.agg_forward`` y = sum_j pre_j x_j (x read a second time).
  Saved: x, fn, base, scale, proj, pre; no fp32 copy of x (the reference keeps two).
backward (dy [T, C])
  4. ``triton_stream.agg_backward`` dpre = sum_c x_j dy (and dx_agg = pre_j dy when the
     projection backward cannot fold it: C not a multiple of its tile, ``agg_fold_ok``).
  5. ``_head_bwd_kernel``          dh = dpre s (1 - s); dproj = dh r scale (the bf16 hi + lo
     pair for bf16 streams, as ``_coef_bwd_kernel`` DP_SPLIT), the RMS chain coefficient
     coef = -r^3 / D sum_n dh p scale, per-program partials of d base = sum_t dh and
     d scale = sum_t,n dh p r.
  6. ``triton_proj_bwd.bwd_finish`` the projection backward's single pass over x: dx =
     dproj @ fn + coef x + pre_j dy (AGG fold; on GROUP tiles where ``head_group``, so dy
     is read once) or + dx_agg (EXTRA, overwritten in place), dfn
     partials; then ``_finalize_kernel``: dfn, d base, d scale in fixed order (deterministic).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mhc_model.kernels.triton_epi import _rms
from mhc_model.kernels.triton_proj import _pow2, agg_fold_ok, head_group, proj_forward
from mhc_model.kernels.triton_proj_bwd import bwd_finish, bwd_work, store_dproj_pair
from mhc_model.kernels.triton_stream import agg_backward, agg_forward

# (BT tokens per program, warps) of the gate kernels (2) and (5): N lanes a token and no
# Sinkhorn, so one warp over 32 tokens; not swept yet.
CONFIG = {
    "head_fwd": (32, 1),
    "head_bwd": (32, 1),
}


def head_lanes(N: int) -> int:
    """KP of the head: > N always (lane N carries the sum of squares), >= 16 for tl.dot."""
    return max(16, _pow2(N + 1))


@triton.jit
def _head_fwd_kernel(part_ptr, base_ptr, scale_ptr, pre_ptr, proj_ptr, T, D, n_split, eps,
                     N: tl.constexpr, KP: tl.constexpr, BT: tl.constexpr):
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    mt = t < T
    k = tl.arange(0, KP)
    off = t[:, None] * KP + k[None, :]
    p = tl.zeros((BT, KP), tl.float32)
    for s in range(n_split):  # fixed order: deterministic
        p += tl.load(part_ptr + s * T * KP + off, mask=mt[:, None], other=0.0)
    tl.store(proj_ptr + off, p, mask=mt[:, None])
    ss = tl.sum(tl.where(k[None, :] == N, p, 0.0), axis=1)  # lane N: sum of squares
    r = _rms(ss, D, eps, False)  # rsqrt(mean x^2 + eps), whatever the convention
    scale = tl.load(scale_ptr).to(tl.float32)
    base = tl.load(base_ptr + k, mask=k < N, other=0.0).to(tl.float32)
    pre = tl.sigmoid(p * r[:, None] * scale + base[None, :]) + eps
    tl.store(pre_ptr + t[:, None] * N + k[None, :], pre, mask=mt[:, None] & (k[None, :] < N))


@triton.jit
def _head_bwd_kernel(dpre_ptr, proj_ptr, base_ptr, scale_ptr, dproj_ptr, coef_ptr,
                     dbase_part_ptr, dscale_part_ptr, T, D, eps,
                     N: tl.constexpr, KP: tl.constexpr, BT: tl.constexpr,
                     DP_SPLIT: tl.constexpr):
    pid = tl.program_id(0)
    t = pid * BT + tl.arange(0, BT)
    mt = t < T
    k = tl.arange(0, KP)
    m2 = mt[:, None] & (k[None, :] < N)
    off = t[:, None] * KP + k[None, :]
    p = tl.load(proj_ptr + off, mask=mt[:, None], other=0.0)
    ss = tl.sum(tl.where(k[None, :] == N, p, 0.0), axis=1)
    r = _rms(ss, D, eps, False)
    scale = tl.load(scale_ptr).to(tl.float32)
    base = tl.load(base_ptr + k, mask=k < N, other=0.0).to(tl.float32)
    s = tl.sigmoid(p * r[:, None] * scale + base[None, :])
    dh = tl.load(dpre_ptr + t[:, None] * N + k[None, :], mask=m2, other=0.0) * s * (1.0 - s)
    dh = tl.where(m2, dh, 0.0)  # lanes >= N (the sum of squares, padding) carry nothing
    # h = p r scale + base  ->  dp = dh r scale, dr = sum_n dh p scale
    dp = dh * r[:, None] * scale
    if DP_SPLIT:  # the bf16 (hi, lo) pair [T, 2, KP], padding lanes 0
        store_dproj_pair(dproj_ptr, t[:, None], k[None, :], dp, mt[:, None], KP)
    else:
        tl.store(dproj_ptr + off, dp, mask=mt[:, None])
    g = tl.sum(dh * p, axis=1)
    # d r / d x = c x with c = -r^3 / D (r = rsqrt(ss / D + eps))
    tl.store(coef_ptr + t, -(g * scale) * r * r * r / D, mask=mt)
    # per-program partials, summed in fixed order by _finalize_kernel (lane 0 of d alpha)
    tl.store(dbase_part_ptr + pid * KP + k, tl.sum(dh, axis=0))
    a = tl.arange(0, 4)
    tl.store(dscale_part_ptr + pid * 4 + a, tl.where(a == 0, tl.sum(g * r, axis=0), 0.0))


def head_epilogue(part, base_N, scale_1, N, D, eps):
    """Launch (2): (pre [T, N] fp32, proj [T, KP] the summed lanes, lane N the sum of squares)."""
    S, T, KP = part.shape
    BT, warps = CONFIG["head_fwd"]
    pre = torch.empty((T, N), dtype=torch.float32, device=part.device)
    proj = torch.empty((T, KP), dtype=torch.float32, device=part.device)
    _head_fwd_kernel[(triton.cdiv(T, BT),)](part, base_N, scale_1, pre, proj, T, D, S, eps,
                                            N=N, KP=KP, BT=BT, num_warps=warps)
    return pre, proj


def _contiguous(t):
    return t if t.is_contiguous() else t.contiguous()


class LearnedHead(torch.autograd.Function):
    """y [T, C] = sum_j pre_j x_j with the learned gates (module docstring: math, launches)."""

    @staticmethod
    def forward(ctx, x_TNC, fn_ND, base_N, scale_1, eps):
        T, N, C = x_TNC.shape
        D = N * C
        if fn_ND.shape != (N, D) or base_N.shape != (N,) or scale_1.numel() != 1:
            raise ValueError(f"learned head: fn {tuple(fn_ND.shape)}, base "
                             f"{tuple(base_N.shape)}, scale {tuple(scale_1.shape)} do not fit "
                             f"x [{T}, {N}, {C}] (want [N, N C], [N], [1])")
        x = _contiguous(x_TNC)
        fn, base, scale = _contiguous(fn_ND), _contiguous(base_N), _contiguous(scale_1)
        KP = head_lanes(N)
        bf16 = x.dtype == torch.bfloat16
        part = proj_forward(x.view(T, D), fn, N, KP, bf16)
        pre, proj = head_epilogue(part, base, scale, N, D, float(eps))
        ctx.save_for_backward(x, fn, base, scale, proj, pre)
        ctx.meta = (float(eps), bf16, KP)
        return agg_forward(x, pre)

    @staticmethod
    def backward(ctx, dy_TC):
        x, fn, base, scale, proj, pre = ctx.saved_tensors
        eps, bf16, KP = ctx.meta
        T, N, C = x.shape
        D = N * C
        dy = _contiguous(dy_TC)
        group = head_group(N, C)  # GROUP tiles: dy read once, not once per stream
        fold = group or agg_fold_ok(C)
        dx_agg, dpre = agg_backward(x, pre, dy, not fold, True)
        BT, warps = CONFIG["head_bwd"]
        G = triton.cdiv(T, BT)
        work = bwd_work(T, D, N, KP, G, site=True, bf16=bf16, w_dtype=fn.dtype,
                        device=x.device, group_n=N if group else 0)
        _head_bwd_kernel[(G,)](dpre, proj, base, scale, work.dproj, work.coef,
                               work.dbias_part, work.dalpha_part, T, D, eps, N=N, KP=KP,
                               BT=BT, DP_SPLIT=work.presplit, num_warps=warps)
        x_TD = x.view(T, D)
        # no fold: the aggregate's dx is the EXTRA operand, overwritten in place with dx
        dx_TD = torch.empty_like(x_TD) if fold else dx_agg.view(T, D)
        dfn, dbase, dalpha = bwd_finish(work, x_TD, fn, base.dtype, dx_TD,
                                        dy if fold else None, pre if fold else None,
                                        None if fold else dx_TD, C=C, N=N, K=N, KP=KP,
                                        bf16=bf16)
        dscale = dalpha[:1].reshape(scale.shape).to(scale.dtype)
        return dx_TD.view(T, N, C), dfn, dbase, dscale, None
