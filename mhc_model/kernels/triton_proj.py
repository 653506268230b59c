"""Triton kernels for the mHC projection x_TD @ W^T (paper Eq. 14-15), forward, and the
tunables of every projection kernel (``CONFIG``).

Used by ``triton_coef`` (the coefficient pipeline, whose docstring gives the whole forward /
backward order) and ``triton_site`` (one mHC site with the aggregate folded in); the backward
kernels live in ``triton_proj_bwd``.

  ``_split_w_kernel``        the fp32 weight as a bf16 (hi, lo) pair, once per forward call.
  ``_proj_fwd_kernel``       x_TD @ W^T on tensor cores + sum of squares, split over D;
                             partials ``[S, T, KP]`` (lane K carries the sum of squares).
  ``_proj_fwd_tma_kernel``   the same for bf16 streams with x and the weight pair read by TMA.
  ``gluon_proj``             the TMA form in Gluon with x as the wgmma A operand in
                             registers (Hopper; run ahead of the Triton TMA kernel there).
The coefficient epilogue is its own launch (``triton_coef``): run in this one by each token
block's last split to finish (an arrival counter, CUTLASS ``GenericBarrier`` style) it made
the coefficient forward 164-193 us against 99-101 (H200, 2026-12-01: the last programs' 20
Sinkhorn iterations run serially in the tail), so it was removed.

bf16 streams: x is exact in bf16, the fp32 weight is split into W_hi + W_lo (both bf16; once
up front for the forward, in registers per program for the backward), so the hi and lo bf16
products (two dots) give ~fp32 accuracy at tensor-core speed.  fp32 streams use exact fp32 dots.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from mhc_model.kernels import gluon_proj

try:  # host-side TMA descriptors (Triton >= 3.4); without them the plain kernels run
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - depends on the Triton version
    TensorDescriptor = None

# Tunables (the bench may override them).
#   proj_fwd (plain loads) / proj_fwd_tma_tile (TMA) / proj_fwd_gluon_tile (``gluon_proj``,
#     stages = its ring's slots): (BT, BD, warps, stages, per_sm); the D split gives per_sm
#     programs per SM in all (rounded down: one full wave, no ragged second one;
#     ``proj_split``).  proj_fwd_gluon_ws: ``gluon_proj``'s warp-specialized kernel, else
#     its one-barrier ring.
#   proj_bwd: (BT, BD, warps, stages, DW_T, waves).  DW_T computes dW^T = x^T @ dproj so
#     every dot has M >= 64 (Hopper wgmma); waves: T-split target in programs per SM.
#   proj_bwd_presplit: dproj goes to the projection backward as a bf16 (hi, lo) pair
#     written by the coefficient backward, instead of fp32 split per tile.
#   *_tma: bf16 streams read (and dx written) through TMA descriptors where the operands
#     allow it (16-byte aligned rows), else plain loads.
#   coef_fwd: (BT, warps) of the coefficient epilogue; coef_bwd: (BT, warps, prefetch) of
#     its backward, prefetch the read-ahead in steps of the Sinkhorn history scratch, used
#     only where the history (2 iters BT NP^2 fp32) exceeds coef_bwd_hist_regs per thread;
#     below that it stays in registers.
#   split_w_block: D columns per program of ``split_weight``.
#   finalize: (BLOCK of dW elements, BG rows of partials per step, warps).
#   rcp_approx: the Sinkhorn reciprocals as rcp.approx.ftz.f32 (``triton_sinkhorn._rcp``)
#     where the target is NVIDIA; False: IEEE division everywhere.
CONFIG = {
    # H200 sweep 2026-12-01: 111 us at 8 programs per SM vs 119 at 1 (BT 128, 8 warps)
    "proj_fwd": (128, 128, 8, 3, 8),
    # ``_proj_fwd_tma_kernel``, H200 sweeps 2026-12-01 (bench/results/kernels_sweeps_h200.md,
    # run 8): 64 x 128 tiles, 4 warps, 3 stages (96 KB: two programs per SM), D split 2 at
    # T 8192: projection 68.4-69.1 us against 79-81 at (128, 128, 8 warps, 3 stages, split 16)
    "proj_fwd_tma": True,
    "proj_fwd_tma_tile": (64, 128, 4, 3, 2),
    # ``gluon_proj``, ahead of the Triton TMA kernel on Hopper where Gluon imports: H200
    # 2026-12-02 (kernels_sweeps_h200.md run 13, 60 interleaved calls): coefficient forward
    # 72.4-75.3 vs 76.1-76.7 us at (128, 128, 8 warps, 3 slots, split 2: 144 KB, one program
    # per SM); kernels.py 73.5 vs 75.9 us
    "proj_fwd_gluon": True,
    "proj_fwd_gluon_tile": (128, 128, 8, 3, 1),
    # its warp-specialized form (a producer warp, slots released by mbarrier): 73.7 vs 74.5-
    # 75.3 us for the one-barrier ring in the same call (run 13e)
    "proj_fwd_gluon_ws": True,
    "split_w_block": 128,  # 1.9 vs 2.2 us at 256 (D 16384)
    "proj_bwd": (64, 128, 4, 3, True, 2),
    "proj_bwd_presplit": True,
    # ``triton_proj_bwd._proj_bwd_tma_kernel``: H200 2026-12-01, coefficient backward 167 vs
    # 199 us; the site's (AGG / EXTRA operands) ran slower with it, 669-751 vs 628-637 us
    "proj_bwd_tma": True,
    "proj_bwd_site_tma": False,
    # the site's projection backward (AGG / EXTRA terms): the two extra [BT, BD] operands
    # spill at BT 64, BD 128, 4 warps (255 registers, 110 spills, 1104 us); H200 sweeps
    # 2026-12-01: 628 / 630 us at (64, 64, 4) (214 registers) vs 637 / 640 at (32, 64, 4)
    "proj_bwd_site": (64, 64, 4, 3, True, 4),
    # GROUP tiles of ``_proj_bwd_kernel`` (a C block of every stream per program: du / dy read
    # once, not once per stream); (BT, C block, warps, stages, DW_T, waves), the tile N
    # C-blocks wide.  The learned head's backward: H200 2026-12-02 (kernels_h200.md, tenth
    # session) 334.8 vs 389.3 us with per-stream tiles.
    "proj_bwd_head_group": True,
    # the site's: "stream" (per-stream tiles, the mix's dx added as EXTRA), "group" (GROUP
    # tiles, the mix's dx EXTRA at the gathered columns) or "group_mixg" (GROUP tiles forming
    # the mix's dx from g, so the mix backward writes none: mix backward 167.5 vs 232.3 us but
    # the projection backward 900-1600 vs 288 us at every tile swept, H200 2026-12-02)
    "proj_bwd_site_tiles": "stream",
    "proj_bwd_group": (32, 16, 4, 3, True, 4),
    # one-warp programs hide the serial Sinkhorn iterations' latency; H200 2026-12-01 with
    # the D split 2 forward: 4.4-4.6 us at (16, 1) vs 4.9-5.2 at (8, 1), 7.2 at (16, 2)
    "coef_fwd": (16, 1),
    # H200 2026-12-01 (kernels_sweeps_h200.md, run 9): the history in registers, 7.5-7.7 us
    # at (8, 1) against 12.2-12.6 read from the L2 scratch (any read-ahead 1-8, BT 4-64;
    # one token per thread, BT 32: 39-41 us); 156 floats a thread at ITERS 20, N 4
    "coef_bwd": (8, 1, 4),
    "coef_bwd_hist_regs": 160,
    "finalize": (2048, 1024, 8),  # BG 1024: one step per lane at G 1024 (T 8192)
    "rcp_approx": True,
}


@triton.jit
def bf16_pair(v):
    """The (hi, lo) bf16 pair of fp32 v: hi = rn(v), lo = rn(v - hi), so hi + lo carries
    ~16 mantissa bits and two bf16 products give ~fp32 accuracy on tensor cores."""
    hi = v.to(tl.bfloat16)
    return hi, (v - hi.to(tl.float32)).to(tl.bfloat16)


@triton.jit
def _split_w_kernel(w_ptr, out_ptr, D, K: tl.constexpr, KP: tl.constexpr, BD: tl.constexpr):
    # out [2, KP, D] bf16: W = hi + lo (hi = rn(W), lo = rn(W - hi)); rows >= K are 0
    d = tl.program_id(0) * BD + tl.arange(0, BD)
    k = tl.arange(0, KP)
    m = (k[:, None] < K) & (d[None, :] < D)
    w = tl.load(w_ptr + k[:, None] * D + d[None, :], mask=m, other=0.0).to(tl.float32)
    hi, lo = bf16_pair(w)
    md = (k[:, None] < KP) & (d[None, :] < D)
    tl.store(out_ptr + k[:, None] * D + d[None, :], hi, mask=md)
    tl.store(out_ptr + KP * D + k[:, None] * D + d[None, :], lo, mask=md)


def split_weight(w_KD, KP: int):
    """[2, KP, D] bf16 (hi, lo) of the fp32 weight, zero-padded to KP rows (one launch)."""
    K, D = w_KD.shape
    out = torch.empty((2, KP, D), dtype=torch.bfloat16, device=w_KD.device)
    BD = CONFIG["split_w_block"]
    _split_w_kernel[(triton.cdiv(D, BD),)](w_KD, out, D, K=K, KP=KP, BD=BD, num_warps=4)
    return out


@triton.jit
def _proj_tile(x_ptr, w_ptr, t0, d_start, d_len, T, D, K: tl.constexpr, KP: tl.constexpr,
               BT: tl.constexpr, BD: tl.constexpr, SPLIT_BF16: tl.constexpr):
    """[BT, KP] fp32: rows t0.. of x[:, d_start:d_start+d_len] @ W^T, lane K the sum of
    squares of the same x (lanes > K are 0).  ``d_len`` is a multiple of BD or ends at D.
    SPLIT_BF16: ``w_ptr`` is ``split_weight``'s [2, KP, D] bf16 pair, loaded as it goes to
    the tensor cores; otherwise the fp32 weight [K, D] (exact fp32 dots)."""
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
        if SPLIT_BF16:
            w_off = offs_k[None, :] * D + offs_d[:, None]
            w_hi = tl.load(w_ptr + w_off, mask=mask_d[:, None], other=0.0)
            w_lo = tl.load(w_ptr + KP * D + w_off, mask=mask_d[:, None], other=0.0)
            # The tensor cores accumulate with truncation; keep their chain to one BD tile
            # and add tiles in fp32 on the CUDA cores (round-to-nearest), or the error grows
            # with D/BD (~1e-4 relative at D = 6000 when chained through acc).
            tile = tl.dot(x, w_hi)
            acc += tl.dot(x, w_lo, tile)
        else:
            # [BD, KP] tile of W^T (rows >= K read as 0), L2 resident
            w = tl.load(w_ptr + offs_k[None, :] * D + offs_d[:, None],
                        mask=mask_d[:, None] & (offs_k[None, :] < K), other=0.0).to(tl.float32)
            acc = tl.dot(xf, w, acc, input_precision="ieee")
    # lanes >= K of acc are 0; lane K carries the sum of squares
    return tl.where(offs_k[None, :] == K, ss[:, None], acc)


@triton.jit
def _store_partial(part_ptr, acc, pid_s, t0, T, KP: tl.constexpr, BT: tl.constexpr):
    offs_t = t0 + tl.arange(0, BT)
    offs_k = tl.arange(0, KP)
    out = part_ptr + pid_s * T * KP + offs_t[:, None] * KP + offs_k[None, :]
    tl.store(out, acc, mask=(offs_t < T)[:, None])


@triton.jit
def _proj_fwd_kernel(x_ptr, w_ptr, part_ptr, T, D, d_per_split,
                     K: tl.constexpr, KP: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
                     SPLIT_BF16: tl.constexpr):
    """Partials of one (token block, D split)."""
    pid_t = tl.program_id(0)
    pid_s = tl.program_id(1)
    # d_per_split is a multiple of BD: splits never overlap
    acc = _proj_tile(x_ptr, w_ptr, pid_t * BT, pid_s * d_per_split, d_per_split, T, D,
                     K, KP, BT, BD, SPLIT_BF16)
    _store_partial(part_ptr, acc, pid_s, pid_t * BT, T, KP, BT)


@triton.jit
def _proj_fwd_tma_kernel(x_desc, w_desc, part_ptr, T, d_per_split,
                         K: tl.constexpr, KP: tl.constexpr, BT: tl.constexpr,
                         BD: tl.constexpr):
    """``_proj_fwd_kernel`` for bf16 streams with x and the (hi, lo) weight pair read through
    TMA descriptors (Hopper): the copy engine fills shared memory, no per-thread address
    math or masks; out-of-range rows / columns read as 0, which adds nothing to either the
    projection or the sum of squares.  The squares are summed elementwise into a [BT, BD]
    tile and reduced over BD once at the end (reduced per tile: 74.5 vs 70.0 us, H200).

    Two N = KP dots per tile, hi then lo chained on the tile, added to ``acc`` in fp32 on
    the CUDA cores.  That add consumes the dots inside the iteration, so every wgmma has
    completed when the pipeliner issues the TMA loads two tiles ahead.  The one-dot form
    ``acc2 += dot(x, [hi; lo]^T)`` (67.6-67.7 vs 68.4-69.1 us) is folded by Triton 3.6 into
    a wgmma left pending across the TMA issue, while x, also loaded to registers for the
    squares, gets a ring of only 2 buffers at prefetch distance 2: the TMA for tile i + 2
    overwrites the x tile wgmma i is still reading.  On the H200 that returned a wrong
    row in 982 of 107,200 launches (T 3001, 3 stages; bench/results/tma_race_h200.md);
    ``tests/model/test_kernels_ir.py`` checks the compiled loop for it."""
    pid_t = tl.program_id(0)
    pid_s = tl.program_id(1)
    t0 = pid_t * BT
    d_start = pid_s * d_per_split
    offs_k = tl.arange(0, KP)
    acc = tl.zeros((BT, KP), tl.float32)
    sq = tl.zeros((BT, BD), tl.float32)
    for d0 in range(0, d_per_split, BD):
        x = x_desc.load([t0, d_start + d0])
        xf = x.to(tl.float32)
        sq += xf * xf
        w_hi = w_desc.load([0, d_start + d0])  # [KP, BD]
        w_lo = w_desc.load([KP, d_start + d0])
        tile = tl.dot(x, tl.trans(w_hi))  # per-tile chain, fp32 sum (see _proj_tile)
        acc += tl.dot(x, tl.trans(w_lo), tile)
    acc = tl.where(offs_k[None, :] == K, tl.sum(sq, axis=1)[:, None], acc)
    _store_partial(part_ptr, acc, pid_s, t0, T, KP, BT)


def rcp_approx() -> bool:
    """CONFIG["rcp_approx"] where the active Triton target is NVIDIA (the PTX instruction)."""
    return CONFIG["rcp_approx"] and _nvidia()


@functools.cache
def _nvidia() -> bool:
    return triton.runtime.driver.active.get_current_target().backend == "cuda"


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


def _tma_ok(x_TD) -> bool:
    # TMA: 16-byte aligned base and row stride (D bf16 elements: D % 8 == 0)
    return (TensorDescriptor is not None and x_TD.data_ptr() % 16 == 0
            and x_TD.shape[1] % 8 == 0)


def proj_split(T: int, D: int, BT: int, BD: int, per_sm: int,
               device: torch.device) -> tuple[int, int]:
    """(S, d_per_split): the D split of the projection forward, S = per_sm programs per SM
    over the token blocks, rounded down; d_per_split is a multiple of BD."""
    n_t = triton.cdiv(T, BT)
    n_d = triton.cdiv(D, BD)
    S = max(1, min(n_d, per_sm * _sm_count(device) // n_t))
    d_per_split = triton.cdiv(n_d, S) * BD
    return triton.cdiv(D, d_per_split), d_per_split


def proj_forward(x_TD, w_KD, K, KP, bf16):
    """Launch (1): returns the D-split partials [S, T, KP] (lane K: sum of squares).
    ``w_KD`` is the weight in its own dtype; bf16 streams split it into a hi + lo bf16 pair
    once per call (``split_weight``; per tile it cost 109 vs 103 us on the H200 with plain
    loads, 95.5 vs 73.7 with TMA)."""
    T, D = x_TD.shape
    tma = bf16 and CONFIG["proj_fwd_tma"] and _tma_ok(x_TD)
    glu = tma and CONFIG["proj_fwd_gluon"] and gluon_proj.available(x_TD.device)
    tile = "proj_fwd_gluon_tile" if glu else "proj_fwd_tma_tile" if tma else "proj_fwd"
    BT, BD, warps, stages, per_sm = CONFIG[tile]
    S, d_per_split = proj_split(T, D, BT, BD, per_sm, x_TD.device)
    part = torch.empty((S, T, KP), dtype=torch.float32, device=x_TD.device)
    w = split_weight(w_KD, KP) if bf16 else w_KD
    if glu:  # ``gluon_proj.launch`` makes its own grid
        gluon_proj.launch(x_TD, w, part, d_per_split, K, KP, BT, BD, stages, warps,
                          ws=CONFIG["proj_fwd_gluon_ws"])
        return part
    grid = (triton.cdiv(T, BT), S)
    if tma:
        x_desc = TensorDescriptor.from_tensor(x_TD, [BT, BD])
        w_desc = TensorDescriptor.from_tensor(w.view(2 * KP, D), [KP, BD])
        _proj_fwd_tma_kernel[grid](x_desc, w_desc, part, T, d_per_split, K=K, KP=KP, BT=BT,
                                   BD=BD, num_warps=warps, num_stages=stages)
    else:
        _proj_fwd_kernel[grid](x_TD, w, part, T, D, d_per_split, K=K, KP=KP, BT=BT,
                               BD=BD, SPLIT_BF16=bf16, num_warps=warps, num_stages=stages)
    return part


def group_ok(N: int, C: int) -> bool:
    """Whether GROUP tiles of the projection backward fit: N a power of two (the tile's
    [BT, N, BC] view), C a multiple of the C block."""
    return N & (N - 1) == 0 and C % CONFIG["proj_bwd_group"][1] == 0


def head_group(N: int, C: int) -> bool:
    """Whether the learned head's projection backward runs GROUP tiles
    (``CONFIG["proj_bwd_head_group"]`` where they fit)."""
    return CONFIG["proj_bwd_head_group"] and group_ok(N, C)


def site_tiles(N: int, C: int) -> str:
    """The site's projection backward tiles (``CONFIG["proj_bwd_site_tiles"]`` where GROUP
    tiles fit, else "stream")."""
    mode = CONFIG["proj_bwd_site_tiles"]
    return mode if mode == "stream" or group_ok(N, C) else "stream"


def agg_fold_ok(C: int, site: bool = True) -> bool:
    """Whether the projection backward can add the aggregate's dx (AGG): its C tiles must not
    straddle two streams."""
    return C % CONFIG["proj_bwd_site" if site else "proj_bwd"][1] == 0
