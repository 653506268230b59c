"""The projection forward x_TD @ W^T + sum of squares (paper Eq. 14-15) in Gluon, Triton's
lower-level language, for Hopper (sm_90): the form ``triton_proj.proj_forward`` launches on
bf16 streams where it runs, ahead of ``triton_proj._proj_fwd_tma_kernel``.

Same inputs and the same partials ``[S, T, KP]`` (lane K: the sum of squares) as the Triton TMA
kernel, same products: x exact in bf16, the fp32 weight as its (hi, lo) bf16 pair from
``triton_proj.split_weight``, per-tile hi then lo wgmma chain added to the accumulator in fp32.
What differs is where x goes after TMA lands it in shared memory:

  * it is read once, by ldmatrix, into the registers of the wgmma A operand; the hi and lo
    wgmmas take A from those registers and the squares are summed from them.  The Triton
    kernel feeds the wgmma from shared memory and reads the tile back a second time for the
    squares (in Triton 3.6 a ``tl.dot`` operand loaded by TMA stays in shared memory).
  * the ring of NS (x, weight pair) slots is written out, so no copy can land in a slot a
    wgmma still reads, by construction (the Triton kernel needs
    ``tests/model/test_kernels_ir.py`` for that).  Two forms: ``_proj_fwd_gluon_ws_kernel``
    (shipped: one producer warp issues the TMA loads, the consumers release each slot through
    its own mbarrier after their wgmma wait) and ``_proj_fwd_gluon_kernel`` (every warp waits
    on tile i's mbarrier, then after a CTA barrier the slot tile i - 1 freed is refilled with
    tile i + NS - 1, before tile i's work).

H200 (bench/results/kernels_sweeps_h200.md run 13, 60 interleaved calls, medians): whole
coefficient forward 73.7 us (ws) and 74.5-75.3 (ring) against 76.7 for the Triton TMA kernel in
one call, at 128-token tiles, 8 warps, 3 slots, D split 2; the ring reading x back for the
squares instead took 75.6-76.1.  ``bench/kernels.py``: 73.5 us, 0.86 of copy bandwidth.

Gluon and its Hopper ops are imported only where Triton ships them; ``available`` says whether
this form can run on a device: Triton's NVIDIA backend, Gluon present, Triton at least
``TRITON_MIN`` (the version it was written and measured on: Gluon's API still moves between
releases, e.g. ``warp_specialize``'s signature), compute capability 9.x (wgmma exists on
Hopper only).  Elsewhere ``proj_forward`` runs the Triton kernels.
"""

from __future__ import annotations

import functools
import re

import torch
import triton

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
except ImportError:  # pragma: no cover - depends on the Triton version
    gluon = None


TRITON_MIN = (3, 6)


def triton_ok(version: str) -> bool:
    """Whether Triton ``version`` ("3.6.0", "3.7.0+git...") is at least ``TRITON_MIN``."""
    m = re.match(r"(\d+)\.(\d+)", version)
    return m is not None and (int(m[1]), int(m[2])) >= TRITON_MIN


def available(device: torch.device) -> bool:
    """Whether ``launch`` can run on ``device``: Gluon importable, Triton >= ``TRITON_MIN``, a
    CUDA device of compute capability 9.x."""
    if gluon is None or device.type != "cuda" or not triton_ok(triton.__version__):
        return False
    idx = device.index if device.index is not None else torch.cuda.current_device()
    return _hopper(idx)


@functools.cache
def _hopper(idx: int) -> bool:
    return (triton.runtime.driver.active.get_current_target().backend == "cuda"
            and torch.cuda.get_device_capability(idx)[0] == 9)


if gluon is not None:

    @triton.constexpr_function
    def mma_layout(KP, num_warps):
        # wgmma accumulator [BT, KP]: m16 x n KP x k16 instructions, warps along the tokens
        return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                         instr_shape=[16, KP, 16])

    @triton.constexpr_function
    def a_layout(KP, num_warps):
        # the wgmma A operand in registers (bf16: two elements per 32 bits)
        return gl.DotOperandLayout(operand_index=0, parent=mma_layout(KP, num_warps),
                                   k_width=2)

    @gluon.jit
    def issue(x_desc, w_desc, bar, x_slot, w_slot, t0, d):
        """TMA of the x tile at (t0, d) and the weight pair's [2 KP, BD] box at d, on bar."""
        mbarrier.expect(bar, x_desc.block_type.nbytes + w_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(x_desc, [t0, d], bar, x_slot)
        tma.async_copy_global_to_shared(w_desc, [0, d], bar, w_slot)

    @gluon.jit
    def ring(x_desc, w_desc, NS: gl.constexpr, KP: gl.constexpr, N_BARS: gl.constexpr):
        """NS (x, weight pair) slots and N_BARS x NS mbarriers (count 1), initialised."""
        BT: gl.constexpr = x_desc.block_type.shape[0]
        BD: gl.constexpr = x_desc.block_type.shape[1]
        x_s = gl.allocate_shared_memory(x_desc.dtype, [NS, BT, BD], x_desc.layout)
        w_s = gl.allocate_shared_memory(w_desc.dtype, [NS, 2 * KP, BD], w_desc.layout)
        bars = gl.allocate_shared_memory(gl.int64, [N_BARS * NS, 1], mbarrier.MBarrierLayout())
        for b in gl.static_range(N_BARS * NS):
            mbarrier.init(bars.index(b), count=1)
        return x_s, w_s, bars

    @gluon.jit
    def ring_start(x_desc, w_desc, d_per_split, n_tiles, NS: gl.constexpr, KP: gl.constexpr):
        """The ring (one mbarrier a slot) of program (token block, D split), its first NS - 1
        tiles issued: (t0, d0, x_s, w_s, bars)."""
        BT: gl.constexpr = x_desc.block_type.shape[0]
        BD: gl.constexpr = x_desc.block_type.shape[1]
        t0 = gl.program_id(0) * BT
        d0 = gl.program_id(1) * d_per_split
        x_s, w_s, bars = ring(x_desc, w_desc, NS, KP, 1)
        for p in gl.static_range(NS - 1):
            if p < n_tiles:
                issue(x_desc, w_desc, bars.index(p), x_s.index(p), w_s.index(p), t0,
                      d0 + p * BD)
        return t0, d0, x_s, w_s, bars

    @gluon.jit
    def next_slot(x_desc, w_desc, x_s, w_s, bars, i, n, t_j, d_j, NS: gl.constexpr):
        """Wait for tile i's slot; then, every warp being past tile i - 1, refill the slot
        tile i - 1 freed with tile j = i + NS - 1 (at t_j, d_j) while tile i is worked on."""
        mbarrier.wait(bars.index(i % NS), (i // NS) & 1)
        gl.thread_barrier()
        j = i + NS - 1
        if j < n:
            sj = j % NS
            issue(x_desc, w_desc, bars.index(sj), x_s.index(sj), w_s.index(sj), t_j, d_j)

    @gluon.jit
    def tile_areg(xs, ws, zero, acc, sq, KP: gl.constexpr):
        """One [BT, BD] tile: x into the A-operand registers (``sq``'s layout), the hi and lo
        wgmmas on them (per-tile chain, one wait, added to acc in fp32 as in
        ``triton_proj._proj_tile``), the squares summed from the same registers."""
        x = xs.load(sq.type.layout)
        tile = warpgroup_mma(x, ws.slice(0, KP, dim=0).permute((1, 0)), zero,
                             use_acc=False, is_async=True)
        tile = warpgroup_mma(x, ws.slice(KP, KP, dim=0).permute((1, 0)), tile, is_async=True)
        xf = x.to(gl.float32)
        sq += xf * xf
        tile, x = warpgroup_mma_wait(num_outstanding=0, deps=(tile, x))
        return acc + tile, sq

    @gluon.jit
    def store_partial(part_ptr, slot, T, t0, acc, sq, K: gl.constexpr, KP: gl.constexpr):
        """The partial layout [S, T, KP]: lanes < K the projection, lane K the sum of squares
        (sq summed over its columns), into slot ``slot``; rows >= T are not written."""
        BT: gl.constexpr = acc.shape[0]
        mma: gl.constexpr = acc.type.layout
        ss = gl.convert_layout(gl.sum(sq, axis=1), gl.SliceLayout(1, mma))
        offs_t = t0 + gl.arange(0, BT, layout=gl.SliceLayout(1, mma))
        offs_k = gl.arange(0, KP, layout=gl.SliceLayout(0, mma))
        ptrs = part_ptr + slot * T * KP + offs_t[:, None] * KP + offs_k[None, :]
        gl.store(ptrs, gl.where(offs_k[None, :] == K, ss[:, None], acc),
                 mask=(offs_t < T)[:, None])

    @gluon.jit
    def _proj_fwd_gluon_kernel(x_desc, w_desc, part_ptr, T, d_per_split, n_tiles,
                               K: gl.constexpr, KP: gl.constexpr, NS: gl.constexpr,
                               num_warps: gl.constexpr):
        """Partials of one (token block, D split): n_tiles tiles of BD columns from
        pid_s * d_per_split (TMA reads columns >= D and rows >= T as 0)."""
        BT: gl.constexpr = x_desc.block_type.shape[0]
        BD: gl.constexpr = x_desc.block_type.shape[1]
        t0, d0, x_s, w_s, bars = ring_start(x_desc, w_desc, d_per_split, n_tiles, NS, KP)
        zero = gl.zeros([BT, KP], gl.float32, mma_layout(KP, num_warps))
        acc = zero
        sq = gl.zeros([BT, BD], gl.float32, a_layout(KP, num_warps))
        for i in range(n_tiles):
            next_slot(x_desc, w_desc, x_s, w_s, bars, i, n_tiles, t0, d0 + (i + NS - 1) * BD,
                      NS)
            acc, sq = tile_areg(x_s.index(i % NS), w_s.index(i % NS), zero, acc, sq, KP)
        for b in gl.static_range(NS):
            mbarrier.invalidate(bars.index(b))
        store_partial(part_ptr, gl.program_id(1), T, t0, acc, sq, K, KP)


    @gluon.jit
    def load_part(x_desc, w_desc, x_s, w_s, bars, t0, d0, n_tiles, NS: gl.constexpr,
                  BD: gl.constexpr):
        """Producer warp: refill slot s once the consumers released it (bars[NS + s]); the
        first pass waits on the phase before a fresh barrier's first, which counts as done."""
        for i in range(n_tiles):
            s = i % NS
            mbarrier.wait(bars.index(NS + s), ((i // NS) & 1) ^ 1)
            issue(x_desc, w_desc, bars.index(s), x_s.index(s), w_s.index(s), t0, d0 + i * BD)

    @gluon.jit
    def mma_part(x_s, w_s, bars, n_tiles, acc, sq, NS: gl.constexpr, KP: gl.constexpr):
        """Consumers: tile i once bars[s] says it landed, then release slot s (bars[NS + s])
        after its wgmmas have been waited."""
        zero = gl.zeros_like(acc)
        for i in range(n_tiles):
            s = i % NS
            mbarrier.wait(bars.index(s), (i // NS) & 1)
            acc, sq = tile_areg(x_s.index(s), w_s.index(s), zero, acc, sq, KP)
            mbarrier.arrive(bars.index(NS + s), count=1)
        return acc, sq

    @gluon.jit
    def _proj_fwd_gluon_ws_kernel(x_desc, w_desc, part_ptr, T, d_per_split, n_tiles,
                                  K: gl.constexpr, KP: gl.constexpr, NS: gl.constexpr,
                                  LOAD_REGS: gl.constexpr, num_warps: gl.constexpr):
        """``_proj_fwd_gluon_kernel`` warp-specialized: one producer warp issues the TMA
        loads into the ring, the num_warps consumers run ``tile_areg`` and release each slot
        through its own mbarrier, so no CTA-wide barrier stalls the loop."""
        BT: gl.constexpr = x_desc.block_type.shape[0]
        BD: gl.constexpr = x_desc.block_type.shape[1]
        pid_s = gl.program_id(1)
        t0 = gl.program_id(0) * BT
        x_s, w_s, bars = ring(x_desc, w_desc, NS, KP, 2)
        acc = gl.zeros([BT, KP], gl.float32, mma_layout(KP, num_warps))
        sq = gl.zeros([BT, BD], gl.float32, a_layout(KP, num_warps))
        acc, sq = gl.warp_specialize([
            (mma_part, (x_s, w_s, bars, n_tiles, acc, sq, NS, KP)),
            (load_part, (x_desc, w_desc, x_s, w_s, bars, t0, pid_s * d_per_split, n_tiles,
                         NS, BD)),
        ], [1], [LOAD_REGS])
        for b in gl.static_range(2 * NS):
            mbarrier.invalidate(bars.index(b))
        store_partial(part_ptr, pid_s, T, t0, acc, sq, K, KP)


def descriptors(x_TD, w_pair, BT: int, BD: int, KP: int):
    """Host TMA descriptors: x [T, D] in boxes [BT, BD]; the (hi, lo) pair [2, KP, D] as
    [2 KP, D] in boxes [2 KP, BD] (hi rows 0 .. KP, lo rows KP .. 2 KP)."""
    T, D = x_TD.shape
    xl = gl.NVMMASharedLayout.get_default_for([BT, BD], gl.bfloat16)
    wl = gl.NVMMASharedLayout.get_default_for([2 * KP, BD], gl.bfloat16)
    w2 = w_pair.view(2 * KP, D)
    return (TensorDescriptor(x_TD, [T, D], [D, 1], [BT, BD], xl),
            TensorDescriptor(w2, [2 * KP, D], [D, 1], [2 * KP, BD], wl))


def launch(x_TD, w_pair, part, d_per_split: int, K: int, KP: int, BT: int, BD: int,
           NS: int, warps: int, ws: bool = True):
    """Fill ``part`` [S, T, KP] (fp32) from bf16 x_TD [T, D] (contiguous, TMA-aligned) and
    ``split_weight``'s pair [2, KP, D]; split s covers columns s * d_per_split onwards.  ws:
    the warp-specialized kernel (a producer warp of LOAD_REGS registers), else the ring with
    one CTA barrier a tile."""
    S, T = part.shape[0], x_TD.shape[0]
    x_desc, w_desc = descriptors(x_TD, w_pair, BT, BD, KP)
    grid = (triton.cdiv(T, BT), S)
    n_tiles = triton.cdiv(d_per_split, BD)
    if ws:
        _proj_fwd_gluon_ws_kernel[grid](x_desc, w_desc, part, T, d_per_split, n_tiles, K=K,
                                        KP=KP, NS=NS, LOAD_REGS=LOAD_REGS, num_warps=warps)
    else:
        _proj_fwd_gluon_kernel[grid](x_desc, w_desc, part, T, d_per_split, n_tiles, K=K,
                                     KP=KP, NS=NS, num_warps=warps)
    return part


# registers of the producer warp (TMA issue and barrier waits only)
LOAD_REGS = 48
