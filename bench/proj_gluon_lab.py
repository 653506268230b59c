"""Gluon forms of the projection forward (lab: ``bench/coef_fwd_variants.py`` times them),
built on the shipped ring of ``mhc_model.kernels.gluon_proj``.

``_proj_fwd_gl_kernel`` is the shipped kernel's ring with the squares of x taken another way:
SQUARES 0 x read back from shared memory for them (the Triton TMA kernel's way), 2 x in the
A-operand registers and the squares as the diagonal of x x^T on the tensor cores.  The
shipped form (SQUARES 1: from the A registers) is ``gluon_proj.launch``.  Also stream-K (run
12d) and the weight split in the kernel (``_proj_fwd_gl_w32_kernel``, run 13e).  Run 12d's
warp-specialized form reading x back for the squares was removed once ``gluon_proj`` shipped
the warp-specialized ring with the A operand in registers; it is in this file at 3f26a0c.
"""

from __future__ import annotations

import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from mhc_model.kernels.gluon_proj import (
    a_layout,
    descriptors,
    issue,
    mma_layout,
    next_slot,
    ring,
    ring_start,
    store_partial,
)


@triton.constexpr_function
def _square_layout(BD, num_warps):
    # x read back for the squares: 16-byte rows of 8 bf16 per thread, BD // 8 threads a row
    tpw = min(32, BD // 8)
    return gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[32 // tpw, tpw],
                            warps_per_cta=[num_warps, 1], order=[1, 0])


@gluon.jit
def _tile(xs, ws, zero, acc, sq, KP: gl.constexpr):
    """One [BT, BD] tile: the per-tile chain hi then lo on the tensor cores (one wait), added
    to acc in fp32 as the shipped kernel does; the squares of x read back meanwhile."""
    tile = warpgroup_mma(xs, ws.slice(0, KP, dim=0).permute((1, 0)), zero,
                         use_acc=False, is_async=True)
    tile = warpgroup_mma(xs, ws.slice(KP, KP, dim=0).permute((1, 0)), tile, is_async=True)
    xf = xs.load(sq.type.layout).to(gl.float32)
    sq += xf * xf
    tile = warpgroup_mma_wait(num_outstanding=0, deps=(tile,))
    return acc + tile, sq


@gluon.jit
def _tile_gram(xs, ws, zero, acc, sq, KP: gl.constexpr):
    """``gluon_proj.tile_areg`` with the squares as x x^T on the tensor cores (sq [BT, BT],
    per-tile chain, fp32 add, its diagonal taken at the end)."""
    x = xs.load(a_layout(KP, gl.num_warps()))
    tile = warpgroup_mma(x, ws.slice(0, KP, dim=0).permute((1, 0)), zero,
                         use_acc=False, is_async=True)
    tile = warpgroup_mma(x, ws.slice(KP, KP, dim=0).permute((1, 0)), tile, is_async=True)
    gram = warpgroup_mma(x, xs.permute((1, 0)), gl.zeros_like(sq), use_acc=False,
                         is_async=True)
    tile, gram, x = warpgroup_mma_wait(num_outstanding=0, deps=(tile, gram, x))
    return acc + tile, sq + gram


@gluon.jit
def _proj_fwd_gl_kernel(x_desc, w_desc, part_ptr, T, d_per_split, n_tiles,
                        K: gl.constexpr, KP: gl.constexpr, NS: gl.constexpr,
                        num_warps: gl.constexpr, SQUARES: gl.constexpr):
    BT: gl.constexpr = x_desc.block_type.shape[0]
    BD: gl.constexpr = x_desc.block_type.shape[1]
    t0, d0, x_s, w_s, bars = ring_start(x_desc, w_desc, d_per_split, n_tiles, NS, KP)
    zero = gl.zeros([BT, KP], gl.float32, mma_layout(KP, num_warps))
    acc = zero
    if SQUARES == 2:
        sq = gl.zeros([BT, BT], gl.float32, mma_layout(BT, num_warps))
    else:
        sq = gl.zeros([BT, BD], gl.float32, _square_layout(BD, num_warps))
    for i in range(n_tiles):
        next_slot(x_desc, w_desc, x_s, w_s, bars, i, n_tiles, t0, d0 + (i + NS - 1) * BD, NS)
        if SQUARES == 2:
            acc, sq = _tile_gram(x_s.index(i % NS), w_s.index(i % NS), zero, acc, sq, KP)
        else:
            acc, sq = _tile(x_s.index(i % NS), w_s.index(i % NS), zero, acc, sq, KP)
    for b in gl.static_range(NS):
        mbarrier.invalidate(bars.index(b))
    if SQUARES == 2:  # the diagonal of the summed x x^T tiles: the sums of squares
        rows = gl.arange(0, BT, layout=gl.SliceLayout(1, sq.type.layout))
        cols = gl.arange(0, BT, layout=gl.SliceLayout(0, sq.type.layout))
        sq = gl.where(rows[:, None] == cols[None, :], sq, 0.0)
    store_partial(part_ptr, gl.program_id(1), T, t0, acc, sq, K, KP)


def launch(x_TD, w_pair, part, S, d_per_split, K, KP, BT=64, BD=128, NS=3, warps=4,
           squares=0, ws=False):
    """``_proj_fwd_gl_kernel`` (squares 0 / 2); squares 1 is the shipped ``gluon_proj.launch``
    (its ring, or with ws its warp-specialized kernel)."""
    if squares == 1:
        from mhc_model.kernels import gluon_proj
        return gluon_proj.launch(x_TD, w_pair, part[:S], d_per_split, K, KP, BT, BD, NS,
                                 warps, ws=ws)
    T = x_TD.shape[0]
    x_desc, w_desc = descriptors(x_TD, w_pair, BT, BD, KP)
    _proj_fwd_gl_kernel[(triton.cdiv(T, BT), S)](
        x_desc, w_desc, part, T, d_per_split, d_per_split // BD, K=K, KP=KP, NS=NS,
        num_warps=warps, SQUARES=squares)
    return part


@triton.constexpr_function
def _w32_layout(num_warps):
    # the fp32 weight tile [KP, BD] read from shared memory for the split: 4 floats a thread
    return gl.BlockedLayout(size_per_thread=[1, 4], threads_per_warp=[1, 32],
                            warps_per_cta=[num_warps, 1], order=[1, 0])


@gluon.jit
def _split_tile(w32_slot, pair, KP: gl.constexpr, num_warps: gl.constexpr):
    """The fp32 weight tile in shared memory as its (hi, lo) bf16 pair into ``pair`` [2 KP, BD]
    (``triton_proj.bf16_pair``: hi = rn(w), lo = rn(w - hi))."""
    w = w32_slot.load(_w32_layout(num_warps))
    hi = w.to(gl.bfloat16)
    lo = (w - hi.to(gl.float32)).to(gl.bfloat16)
    pair.slice(0, KP, dim=0).store(hi)
    pair.slice(KP, KP, dim=0).store(lo)


@gluon.jit
def _proj_fwd_gl_w32_kernel(x_desc, w_desc, part_ptr, T, d_per_split, n_tiles,
                            K: gl.constexpr, KP: gl.constexpr, NS: gl.constexpr,
                            num_warps: gl.constexpr):
    """``gluon_proj._proj_fwd_gluon_kernel`` reading the fp32 weight by TMA ([KP, BD] boxes of
    W [K, D], rows >= K as 0) and splitting it into the (hi, lo) pair in the kernel, one tile
    ahead, into a double-buffered pair in shared memory: no weight-split launch.  Iteration i
    refills the slot tile i - 1 freed, runs tile i's wgmmas on pair i % 2 and meanwhile splits
    tile i + 1's weight into pair (i + 1) % 2 (read last by tile i - 1's wgmmas, waited); a
    fence and one CTA barrier end the iteration."""
    BT: gl.constexpr = x_desc.block_type.shape[0]
    BD: gl.constexpr = x_desc.block_type.shape[1]
    pid_s = gl.program_id(1)
    t0 = gl.program_id(0) * BT
    d0 = pid_s * d_per_split
    x_s = gl.allocate_shared_memory(x_desc.dtype, [NS, BT, BD], x_desc.layout)
    w_s = gl.allocate_shared_memory(w_desc.dtype, [NS, KP, BD], w_desc.layout)
    pl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([2 * KP, BD], gl.bfloat16)
    pairs = gl.allocate_shared_memory(gl.bfloat16, [2, 2 * KP, BD], pl)
    bars = gl.allocate_shared_memory(gl.int64, [NS, 1], mbarrier.MBarrierLayout())
    for b in gl.static_range(NS):
        mbarrier.init(bars.index(b), count=1)
    for p in gl.static_range(NS - 1):
        if p < n_tiles:
            issue(x_desc, w_desc, bars.index(p), x_s.index(p), w_s.index(p), t0,
                       d0 + p * BD)
    mbarrier.wait(bars.index(0), 0)
    _split_tile(w_s.index(0), pairs.index(0), KP, num_warps)
    fence_async_shared()
    gl.thread_barrier()
    zero = gl.zeros([BT, KP], gl.float32, mma_layout(KP, num_warps))
    acc = zero
    sq = gl.zeros([BT, BD], gl.float32, a_layout(KP, num_warps))
    for i in range(n_tiles):
        j = i + NS - 1
        if j < n_tiles:
            sj = j % NS
            issue(x_desc, w_desc, bars.index(sj), x_s.index(sj), w_s.index(sj), t0,
                       d0 + j * BD)
        x = x_s.index(i % NS).load(sq.type.layout)
        ws = pairs.index(i % 2)
        tile = warpgroup_mma(x, ws.slice(0, KP, dim=0).permute((1, 0)), zero,
                             use_acc=False, is_async=True)
        tile = warpgroup_mma(x, ws.slice(KP, KP, dim=0).permute((1, 0)), tile, is_async=True)
        xf = x.to(gl.float32)
        sq += xf * xf
        if i + 1 < n_tiles:
            mbarrier.wait(bars.index((i + 1) % NS), ((i + 1) // NS) & 1)
            _split_tile(w_s.index((i + 1) % NS), pairs.index((i + 1) % 2), KP, num_warps)
        tile, x = warpgroup_mma_wait(num_outstanding=0, deps=(tile, x))
        acc = acc + tile
        fence_async_shared()
        gl.thread_barrier()
    for b in gl.static_range(NS):
        mbarrier.invalidate(bars.index(b))
    store_partial(part_ptr, pid_s, T, t0, acc, sq, K, KP)


def launch_w32(x_TD, w_KD, part, S, d_per_split, K, KP, BT=128, BD=128, NS=3, warps=8):
    """``_proj_fwd_gl_w32_kernel`` on the fp32 weight itself (no ``split_weight``)."""
    T, D = x_TD.shape
    xl = gl.NVMMASharedLayout.get_default_for([BT, BD], gl.bfloat16)
    wl = gl.NVMMASharedLayout.get_default_for([KP, BD], gl.float32)
    x_desc = TensorDescriptor(x_TD, [T, D], [D, 1], [BT, BD], xl)
    w_desc = TensorDescriptor(w_KD, [K, D], [D, 1], [KP, BD], wl)
    _proj_fwd_gl_w32_kernel[(triton.cdiv(T, BT), S)](
        x_desc, w_desc, part, T, d_per_split, triton.cdiv(d_per_split, BD), K=K, KP=KP, NS=NS,
        num_warps=warps)
    return part


@gluon.jit
def _proj_fwd_gl_sk_kernel(x_desc, w_desc, part_ptr, T, n_items, NT, P,
                           K: gl.constexpr, KP: gl.constexpr, NS: gl.constexpr,
                           SMAX: gl.constexpr, num_warps: gl.constexpr):
    """Stream-K: P programs (one per SM), program p takes the contiguous run of (token block,
    D tile) items [p I / P, (p + 1) I / P), I = token blocks x NT, and writes one partial per
    token block it touches into slot p - (first program touching that block); the program
    that finishes a block zeroes the block's unused slots < SMAX."""
    BT: gl.constexpr = x_desc.block_type.shape[0]
    BD: gl.constexpr = x_desc.block_type.shape[1]
    p = gl.program_id(0)
    a = (p * n_items) // P
    n = ((p + 1) * n_items) // P - a
    x_s, w_s, bars = ring(x_desc, w_desc, NS, KP, 1)
    for q in gl.static_range(NS - 1):
        if q < n:
            it = a + q
            issue(x_desc, w_desc, bars.index(q), x_s.index(q), w_s.index(q), (it // NT) * BT,
                   (it % NT) * BD)
    zero = gl.zeros([BT, KP], gl.float32, mma_layout(KP, num_warps))
    acc = zero
    sq = gl.zeros([BT, BD], gl.float32, _square_layout(BD, num_warps))
    for i in range(n):
        it = a + i
        tb = it // NT
        tile_d = it % NT
        jt = it + NS - 1
        next_slot(x_desc, w_desc, x_s, w_s, bars, i, n, (jt // NT) * BT, (jt % NT) * BD, NS)
        acc, sq = _tile(x_s.index(i % NS), w_s.index(i % NS), zero, acc, sq, KP)
        if (tile_d == NT - 1) | (i == n - 1):
            slot = p - ((tb * NT + 1) * P - 1) // n_items
            store_partial(part_ptr, slot, T, tb * BT, acc, sq, K, KP)
            if tile_d == NT - 1:
                for z in gl.static_range(1, SMAX):
                    if slot + z < SMAX:
                        store_partial(part_ptr, slot + z, T, tb * BT, zero,
                                       gl.zeros_like(sq), K, KP)
            acc = zero
            sq = gl.zeros_like(sq)
    for b in gl.static_range(NS):
        mbarrier.invalidate(bars.index(b))


def launch_sk(x_TD, w_pair, part, K, KP, P, BT=128, BD=128, NS=4, warps=8):
    """Stream-K form over P programs; ``part`` is [SMAX, T, KP] (SMAX >= the most programs
    touching one token block)."""
    T, D = x_TD.shape
    NT = triton.cdiv(D, BD)
    n_items = triton.cdiv(T, BT) * NT
    x_desc, w_desc = descriptors(x_TD, w_pair, BT, BD, KP)
    _proj_fwd_gl_sk_kernel[(P,)](x_desc, w_desc, part, T, n_items, NT, P, K=K, KP=KP, NS=NS,
                                 SMAX=part.shape[0], num_warps=warps)
    return part


def sk_slots(T, D, BT, BD, P):
    """The most programs of ``launch_sk`` that touch one token block."""
    NT = triton.cdiv(D, BD)
    n_items = triton.cdiv(T, BT) * NT
    first = [((tb * NT + 1) * P - 1) // n_items for tb in range(triton.cdiv(T, BT))]
    last = [(((tb + 1) * NT) * P - 1) // n_items for tb in range(triton.cdiv(T, BT))]
    return max(b - a + 1 for a, b in zip(first, last))
