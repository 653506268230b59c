"""Sinkhorn-Knopp (paper Eq. 19) on [BT, NP, NP] register tiles, forward and backward.

NP is N rounded up to a power of two; ``valid`` [1, NP, NP] masks the real N x N block.
Padded entries are kept at exactly 0 and every denominator carries +eps, so padding never
produces NaN and never leaks into the real block.

Forms (``Convention.sinkhorn``, DESIGN.md section 1), selected by the constexpr SOFTMAX:
  softmax_first (SOFTMAX)  M = softmax_row(L) + eps; col; (iters - 1) x {row, col}
                                                                    -> 2*iters - 1 steps
  exp_rowmax               M = exp(L - rowmax);       iters x {row, col}  -> 2*iters steps

APPROX (constexpr): every reciprocal is the SFU's ``rcp.approx.ftz.f32`` (``_rcp``).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _init(L, valid):
    # exp(L - rowmax) on the valid block; rows that are entirely padding give 0.
    Lm = tl.where(valid, L, float("-inf"))
    mx = tl.max(Lm, axis=2, keep_dims=True)
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    E = tl.where(valid, tl.exp(Lm - mx), 0.0)
    return Lm, mx, E


@triton.jit
def _rcp(v, APPROX: tl.constexpr):
    """1 / v.  APPROX: one ``rcp.approx.ftz.f32`` (PTX ISA: at most 1 ulp from the correctly
    rounded reciprocal; v here is a sum of positives + eps or >= 1, never subnormal) where
    ``1.0 / v`` is div.rn.f32, a refinement sequence with a slow-path branch.  The 2 ITERS
    Sinkhorn steps are one serial chain of them: the epilogue 4.3 -> 3.6 us on the H200
    with outputs bitwise equal on that data (bench/results/kernels_sweeps_h200.md, run 11).
    NVIDIA only (inline PTX): the host sets APPROX from the target."""
    if APPROX:
        r = tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=f,f", [v],
                                      dtype=tl.float32, is_pure=True, pack=1)
    else:
        r = 1.0 / v
    return r


# Divisions: one reciprocal per reduced row / column, then products, where a division per
# element sat in every one of the 2 x ITERS serial steps: gate backward 14.0 -> 13.1 us on
# the H200 (2026-12-01; the epilogue's 4.6 us unchanged).  The product is within one
# rounding of the quotient.
@triton.jit
def _softmax(E, APPROX: tl.constexpr):
    s = tl.sum(E, axis=2, keep_dims=True)
    return E * _rcp(tl.where(s == 0.0, 1.0, s), APPROX)


@triton.jit
def _norm(M, eps, AXIS: tl.constexpr, APPROX: tl.constexpr):
    # M' = M / (sum_AXIS M + eps)
    return M * _rcp(tl.sum(M, axis=AXIS, keep_dims=True) + eps, APPROX)


@triton.jit
def sinkhorn_fwd(L, valid, eps, ITERS: tl.constexpr, SOFTMAX: tl.constexpr,
                 APPROX: tl.constexpr):
    Lm, mx, E = _init(L, valid)
    if SOFTMAX:
        M = tl.where(valid, _softmax(E, APPROX) + eps, 0.0)
        M = _norm(M, eps, 1, APPROX)
        for _ in range(ITERS - 1):
            M = _norm(M, eps, 2, APPROX)
            M = _norm(M, eps, 1, APPROX)
    else:
        M = E
        for _ in range(ITERS):
            M = _norm(M, eps, 2, APPROX)
            M = _norm(M, eps, 1, APPROX)
    return M


@triton.jit
def _norm_bwd(G, Min, valid, eps, AXIS: tl.constexpr, APPROX: tl.constexpr):
    # M' = M / (sum_AXIS M + eps)  ->  dM = (dM' - sum_AXIS(dM' * M')) / (sum_AXIS M + eps)
    inv = _rcp(tl.sum(Min, axis=AXIS, keep_dims=True) + eps, APPROX)
    GMo = G * (Min * inv)
    dot = tl.sum(GMo, axis=AXIS, keep_dims=True)
    return tl.where(valid, (G - dot) * inv, 0.0)


@triton.jit
def _keep(h, M, hist, s: tl.constexpr, off, STEP: tl.constexpr, REGS: tl.constexpr):
    # the input of step s: in the register tuple h (REGS), else in the scratch
    if REGS:
        h = h + (M,)
    else:
        tl.store(hist + s * STEP + off, M)
    return h


@triton.jit
def sinkhorn_bwd(L, dM, valid, hist, eps, ITERS: tl.constexpr, SOFTMAX: tl.constexpr,
                 BT: tl.constexpr, NP: tl.constexpr, PREFETCH: tl.constexpr,
                 APPROX: tl.constexpr):
    """Gradient of the unrolled iteration w.r.t. the logits L.

    The input of each normalisation step is recomputed, kept, then replayed in reverse.  For
    M' = M / (sum_axis M + eps):  dM = (dM' - sum_axis(dM' * M')) / (sum_axis M + eps).
    Both passes are unrolled (static steps), so each step reduces along its own axis only.
    PREFETCH 0: the step inputs stay in registers (a tuple; ``hist`` unused).  PREFETCH p > 0:
    they go to this program's slice of ``hist`` (L2 resident, (2 ITERS) BT NP NP fp32) and
    the replay loads each one p steps before it is needed (used where the registers cannot
    hold them; on the H200 any p of 1-8 ran alike, 12.3-12.6 us against 7.5-7.8 in registers:
    bench/results/kernels_sweeps_h200.md run 9).
    """
    off = (tl.arange(0, BT)[:, None, None] * (NP * NP) + tl.arange(0, NP)[None, :, None] * NP
           + tl.arange(0, NP)[None, None, :])
    STEP: tl.constexpr = BT * NP * NP
    REGS: tl.constexpr = PREFETCH == 0
    # softmax_first: col, then (ITERS - 1) x {row, col}; exp_rowmax: ITERS x {row, col}
    BASE: tl.constexpr = 1 if SOFTMAX else 0
    S: tl.constexpr = 2 * ITERS - BASE  # steps; step s reduces rows when (s - BASE) is even
    Lm, mx, E = _init(L, valid)
    h = ()
    if SOFTMAX:
        P = _softmax(E, APPROX)
        M = tl.where(valid, P + eps, 0.0)
    else:
        P = E
        M = E
    for s in tl.static_range(S):
        h = _keep(h, M, hist, s, off, STEP, REGS)
        M = _norm(M, eps, 2 if (s - BASE) % 2 == 0 else 1, APPROX)
    q = ()
    if not REGS:
        # Make this program's scratch writes visible to all of its threads.
        tl.debug_barrier()
        for r in tl.static_range(min(PREFETCH, S)):
            q = q + (tl.load(hist + (S - 1 - r) * STEP + off),)
    G = tl.where(valid, dM, 0.0)
    for r in tl.static_range(S):
        if REGS:
            Min = h[S - 1 - r]
        else:
            if r + PREFETCH < S:
                q = q + (tl.load(hist + (S - 1 - r - PREFETCH) * STEP + off),)
            Min = q[r]
        G = _norm_bwd(G, Min, valid, eps, 2 if (S - 1 - r - BASE) % 2 == 0 else 1, APPROX)
    if SOFTMAX:
        # M0 = softmax(L) + eps: softmax backward, row-wise.
        dL = P * (G - tl.sum(G * P, axis=2, keep_dims=True))
    else:
        # M0 = exp(L - rowmax): the rowmax path gets -sum(G E), split evenly over ties
        # (torch.amax's backward rule).
        GE = G * P
        is_max = (Lm == mx) & valid
        cnt = tl.sum(is_max.to(tl.float32), axis=2, keep_dims=True)
        dL = GE - tl.where(is_max, tl.sum(GE, axis=2, keep_dims=True) / tl.maximum(cnt, 1.0),
                           0.0)
    return tl.where(valid, dL, 0.0)
