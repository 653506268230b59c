"""Coefficient-forward variants on one GPU, against the shipped kernels (issue 16 sweeps).

Not a benchmark of record (that is ``bench/kernels.py``): a lab bench for the pieces of the
coefficient forward (weight split, projection, epilogue) at T 8192, C 4096, n 4, bf16.
Every variant writes the shipped partial layout ``[S, T, KP]``, so any projection runs with
any epilogue, and each whole forward is checked against the shipped outputs.  The groups are
the tables of bench/results/kernels_sweeps_h200.md run 12 (12a-12c here, 12d the Gluon forms
of ``bench/proj_gluon_lab.py``: groups gluon, ws, sk).

Projection variants (``_proj_var_kernel``, the shipped TMA loop with switches):
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

    PYTHONPATH=. python bench/coef_fwd_variants.py [--rounds 3] [--only 12a,gluon,ws,...]
"""

from __future__ import annotations

import argparse
import itertools

import torch
import triton
import triton.language as tl
from triton.testing import do_bench_cudagraph

from bench.kernels import kernel_us
from mhc_model.conventions import convention
from mhc_model.kernels import triton_coef, triton_proj
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


def _setup():
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(T, D, generator=gen, device="cuda").bfloat16()
    W = torch.randn(K, D, generator=gen, device="cuda") / D**0.5
    b = torch.randn(K, generator=gen, device="cuda")
    al = [torch.tensor([0.5], device="cuda") for _ in range(3)]
    return x, W, b, al


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


def shipped(x, W, b, al, **config):
    """The shipped coefficient forward, under ``triton_proj.CONFIG`` overrides ``config``."""
    old = {k: triton_proj.CONFIG[k] for k in config}
    triton_proj.CONFIG.update(config)
    try:
        return triton_coef.coef_forward(x.view(T, N, C), W, b, al, ITERS, "deepseek", EPS)[0]
    finally:
        triton_proj.CONFIG.update(old)


def _diff(a, b):
    return max(float((p - q).abs().max() / q.abs().max().clamp_min(1e-30)) for p, q in zip(a, b))


# (label, tile, MODE, IL, WS, PF, PF_LINES) per table of kernels_sweeps_h200.md run 12
_B = triton_proj.CONFIG["proj_fwd_tma_tile"]  # the shipped tile
PROJ_GROUPS = {
    "12a": [("var", _B, 0, 0, 0, 0, 0), ("var IL", _B, 0, 1, 0, 0, 0),
            ("var (64,128,8,3,2)", (64, 128, 8, 3, 2), 0, 0, 0, 0, 0),
            ("var WS (64,128,8,3,2)", (64, 128, 8, 3, 2), 0, 0, 1, 0, 0),
            ("var IL WS (64,128,8,3,2)", (64, 128, 8, 3, 2), 0, 1, 1, 0, 0),
            ("var WS (64,128,8,4,2)", (64, 128, 8, 4, 2), 0, 0, 1, 0, 0),
            ("sq only (floor)", _B, 1, 0, 0, 0, 0),
            ("sq only 6 stages", (64, 128, 4, 6, 2), 1, 0, 0, 0, 0),
            ("sq only IL", _B, 1, 1, 0, 0, 0), ("dots only", _B, 2, 0, 0, 0, 0),
            ("sq + w loads", _B, 3, 0, 0, 0, 0),
            ("var (128,128,8,4,1)", (128, 128, 8, 4, 1), 0, 0, 0, 0, 0),
            ("var (128,128,8,4,2)", (128, 128, 8, 4, 2), 0, 0, 0, 0, 0),
            ("var (128,128,8,3,1)", (128, 128, 8, 3, 1), 0, 0, 0, 0, 0),
            ("var WS (128,128,8,3,1)", (128, 128, 8, 3, 1), 0, 0, 1, 0, 0),
            ("var IL (128,128,8,4,1)", (128, 128, 8, 4, 1), 0, 1, 0, 0, 0)],
    "12b": [("var", _B, 0, 0, 0, 0, 0)]
    + [(f"var PF={pf}", _B, 0, 0, 0, pf, 0) for pf in (2, 3, 4, 6)]
    + [("var PF=4 IL", _B, 0, 1, 0, 4, 0),
       ("var PF=4 (64,128,4,2,2)", (64, 128, 4, 2, 2), 0, 0, 0, 4, 0),
       ("var PF=4 (64,128,4,2,3)", (64, 128, 4, 2, 3), 0, 0, 0, 4, 0),
       ("var PF=4 (128,128,8,3,1)", (128, 128, 8, 3, 1), 0, 0, 0, 4, 0),
       ("var PF=8 (128,128,8,3,1)", (128, 128, 8, 3, 1), 0, 0, 0, 8, 0),
       ("sq only (floor)", _B, 1, 0, 0, 0, 0), ("sq only PF=4", _B, 1, 0, 0, 4, 0),
       ("fixed W: dots + sq", _B, 4, 0, 0, 0, 0), ("fixed W: dots only", _B, 5, 0, 0, 0, 0),
       ("dots only", _B, 2, 0, 0, 0, 0)],
    "12c": [("var", _B, 0, 0, 0, 0, 0)]
    + [(f"var lines PF={pf}", _B, 0, 0, 0, pf, 1) for pf in (2, 4, 8)]
    + [(f"var lines PF={pf} (64,128,4,2,3)", (64, 128, 4, 2, 3), 0, 0, 0, pf, 1)
       for pf in (4, 6)]
    + [("var lines PF=4 (128,128,8,3,1)", (128, 128, 8, 3, 1), 0, 0, 0, 4, 1),
       ("sq only lines PF=4", _B, 1, 0, 0, 4, 1)],
}
# Gluon forms (run 12d): (BT, BD, NS, warps, programs per SM) / ws: (BT, NS, warps, per SM,
# maxnreg) / stream-K: (BT, BD, NS, warps, programs per SM)
GLUON = [(64, 128, 3, 4, 2), (64, 128, 2, 4, 3), (64, 128, 3, 4, 3), (128, 128, 4, 8, 1),
         (128, 128, 3, 8, 2), (128, 128, 2, 8, 2), (128, 64, 4, 8, 2), (128, 64, 8, 8, 1),
         (256, 128, 2, 8, 1)]
GLUON_WS = [(64, 3, 4, 2, 128), (64, 3, 4, 2, None), (64, 2, 4, 3, 80), (128, 4, 8, 1, 168),
            (128, 2, 8, 2, 80)]
GLUON_SK = [(128, 128, 4, 8, 1), (64, 128, 3, 4, 2), (128, 64, 8, 8, 1), (128, 64, 4, 8, 2),
            (128, 128, 3, 8, 1)]
# (BT, BD, NS, warps, per_sm, mode): mode 1 x as the wgmma A operand in registers, squares
# from them, 2 the same with the squares as the diagonal of x x^T on the tensor cores
# (``proj_gluon_lab._tile_areg``); mode 0 the same ring reading x back for the squares
GLUON_AREG = [(64, 128, 3, 4, 2, 0), (64, 128, 3, 4, 2, 1), (64, 128, 3, 4, 2, 2),
              (64, 128, 2, 4, 3, 1), (64, 128, 2, 4, 3, 2), (64, 128, 4, 4, 2, 1),
              (128, 128, 4, 8, 1, 0), (128, 128, 4, 8, 1, 1), (128, 128, 2, 8, 2, 1),
              (128, 128, 3, 8, 1, 1)]
# the A / B set for ``--interleave`` (run 13): the best areg rows of run 12's first call,
# their read-back twins and the shipped tile's neighbours
GLUON_AREG2 = [(128, 128, 3, 8, 1, 1), (128, 128, 3, 8, 1, 0), (128, 128, 4, 8, 1, 1),
               (128, 128, 2, 8, 1, 1), (64, 128, 3, 4, 2, 1), (64, 128, 2, 4, 3, 2),
               (128, 64, 5, 8, 1, 1), (256, 128, 2, 8, 1, 1)]
# run 13b: the shipped Gluon tile against warp-specialized areg forms (BT, NS, warps, per_sm,
# maxnreg) and larger tiles (BT, BD, NS, warps, per_sm, mode)
# (13e ran them on the lab's copy of the ws kernel, maxnreg 168 / None / 168 / 168; it is
# now gluon_proj's, which takes no maxnreg)
AREG_WS = [(128, 3, 8, 1, None), (128, 4, 8, 1, None), (128, 2, 8, 1, None)]
AREG_TILES = [(128, 256, 2, 8, 1, 1), (128, 128, 3, 8, 1, 1)]
GROUPS = (*PROJ_GROUPS, "gluon", "areg", "areg2", "areg3", "ws", "sk", "epi", "split")


def _variants(only, x, W, b, al, conv):
    """{label: a whole coefficient forward} for the groups in ``only`` (the shipped form
    first)."""
    def epilogue(part):
        return triton_coef.coef_epilogue(part, b, al, N, D, ITERS, conv, EPS)[:3]

    def pair():
        return triton_proj.split_weight(W, KP)

    def parts(S):
        return torch.empty((S, T, KP), dtype=torch.float32, device=x.device)

    variants = {"shipped": lambda: shipped(x, W, b, al)}
    if only & {"areg2", "areg3"}:  # the Triton TMA kernel, shipped before gluon_proj
        variants["shipped, proj_fwd_gluon False"] = lambda: shipped(x, W, b, al,
                                                                    proj_fwd_gluon=False)
    for group in only & set(PROJ_GROUPS):
        for name, tile, mode, il, ws, pf, lines in PROJ_GROUPS[group]:
            variants[f"{group} proj {name}"] = (
                lambda tile=tile, mode=mode, il=il, ws=ws, pf=pf, lines=lines: epilogue(
                    proj_var(x, W, tile, mode, bool(il), bool(ws), pf=pf,
                             pf_lines=bool(lines))))
    if only & {"gluon", "areg", "areg2", "areg3", "ws", "sk"}:
        from bench import proj_gluon_lab as G
    rows = [(*c, 0) for c in GLUON] if "gluon" in only else []
    rows += GLUON_AREG if "areg" in only else []
    rows += AREG_TILES if "areg3" in only else []
    for BT, BD, NS, warps, per_sm, mode in rows + (GLUON_AREG2 if "areg2" in only else []):
        def run(BT=BT, BD=BD, NS=NS, warps=warps, per_sm=per_sm, mode=mode):
            S, dps = proj_split(T, D, BT, BD, per_sm, x.device)
            return epilogue(G.launch(x, pair(), parts(S), S, dps, K, KP, BT=BT, BD=BD,
                                     NS=NS, warps=warps, squares=mode))
        tag = ("", " areg (shipped gluon_proj)", " areg sq_mma")[mode]
        name = f"gluon{tag} BT={BT} BD={BD} NS={NS} w={warps} per_sm={per_sm}"
        variants[name + " again" * (name in variants)] = run
    if "areg3" in only:
        for BT, NS, warps, per_sm, mr in AREG_WS:
            def run(BT=BT, NS=NS, warps=warps, per_sm=per_sm, mr=mr):
                S, dps = proj_split(T, D, BT, 128, per_sm, x.device)
                return epilogue(G.launch_ws(x, pair(), parts(S), S, dps, K, KP, BT=BT, NS=NS,
                                            warps=warps, maxnreg=mr, squares=1))
            variants[f"gluon ws areg (gluon_proj ws) BT={BT} NS={NS} w={warps} "
                     f"per_sm={per_sm}"] = run
        for BT, NS in ((128, 3), (128, 2)):
            def run(BT=BT, NS=NS):  # the weight split in the kernel (no split launch)
                S, dps = proj_split(T, D, BT, 128, 1, x.device)
                return epilogue(G.launch_w32(x, W, parts(S), S, dps, K, KP, BT=BT, NS=NS))
            variants[f"gluon w32 BT={BT} BD=128 NS={NS} w=8 per_sm=1"] = run
        variants["shipped (again, last)"] = lambda: shipped(x, W, b, al)
    if "ws" in only:
        for BT, NS, warps, per_sm, mr in GLUON_WS:
            def run(BT=BT, NS=NS, warps=warps, per_sm=per_sm, mr=mr):
                S, dps = proj_split(T, D, BT, 128, per_sm, x.device)
                return epilogue(G.launch_ws(x, pair(), parts(S), S, dps, K, KP, BT=BT, NS=NS,
                                            warps=warps, maxnreg=mr))
            variants[f"gluon ws BT={BT} NS={NS} w={warps} per_sm={per_sm} maxnreg={mr}"] = run
    if "sk" in only:
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count
        for BT, BD, NS, warps, per_sm in GLUON_SK:
            def run(BT=BT, BD=BD, NS=NS, warps=warps, P=per_sm * sms):
                part = parts(G.sk_slots(T, D, BT, BD, P))
                return epilogue(G.launch_sk(x, pair(), part, K, KP, P, BT=BT, BD=BD, NS=NS,
                                            warps=warps))
            variants[f"gluon sk BT={BT} BD={BD} NS={NS} w={warps} P={per_sm}x{sms}"] = run
    if "epi" in only:
        for BT, warps, sp in [(16, 1, True), (16, 1, False), (32, 1, True), (8, 1, True),
                              (16, 2, True)]:
            variants[f"epi unrolled BT={BT} w={warps} proj={int(sp)}"] = (
                lambda BT=BT, warps=warps, sp=sp: epi_var(
                    triton_proj.proj_forward(x, W, K, KP, True), b, al, BT, warps, sp))
    if "split" in only:
        for bd, warps in itertools.product((64, 128, 256), (1, 2, 4)):
            def run(bd=bd, warps=warps):
                out = torch.empty((2, KP, D), dtype=torch.bfloat16, device=x.device)
                triton_proj._split_w_kernel[(triton.cdiv(D, bd),)](
                    W, out, D, K=K, KP=KP, BD=bd, num_warps=warps)
                return out
            variants[f"split BD={bd} w={warps}"] = run
    return variants


def _gpu_kernels(prof):
    """The profile's GPU kernel events in launch order: (name, µs)."""
    ev = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    ev.sort(key=lambda e: e.time_range.start)
    return [(e.name, e.time_range.elapsed_us()) for e in ev]


def interleaved_us(fns, rounds):
    """{name: (median kernel-sum µs of one call, [per-call µs], {kernel: median µs})}: every
    fn called once a round, ``rounds`` rounds under one profile, so slow drifts of the GPU
    (clocks, temperature) fall on every variant alike; each call's kernels are found by
    their launch order (a dry run counts them)."""
    from statistics import median

    from torch.profiler import ProfilerActivity, profile

    counts = {}
    for name, fn in fns.items():
        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        counts[name] = len(_gpu_kernels(prof))
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(rounds):
            for fn in fns.values():
                fn()
        torch.cuda.synchronize()
    ks = _gpu_kernels(prof)
    if len(ks) != rounds * sum(counts.values()):
        raise RuntimeError(f"{len(ks)} kernels, expected {rounds} x {sum(counts.values())}")
    calls = {name: [] for name in fns}
    i = 0
    for _ in range(rounds):
        for name in fns:
            calls[name].append(ks[i:i + counts[name]])
            i += counts[name]
    out = {}
    for name, cs in calls.items():
        sums = [sum(us for _, us in c) for c in cs]
        per = {k: median(c[j][1] for c in cs) for j, (k, _) in enumerate(cs[0])}
        out[name] = (median(sums), sums, per)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", default="12a,epi,split",
                    help=f"comma-separated groups of {', '.join(GROUPS)}")
    ap.add_argument("--interleave", type=int, default=0, metavar="R",
                    help="instead of --rounds: R rounds of one call per variant under one "
                         "profile, medians (interleaved_us)")
    args = ap.parse_args()
    only = set(args.only.split(","))
    if only - set(GROUPS):
        raise SystemExit(f"unknown groups {sorted(only - set(GROUPS))}; known: {GROUPS}")
    x, W, b, al = _setup()
    conv = convention("deepseek")
    f = conv.kernel_flags()
    assert not f["RMS_INV_NORM"] and f["SINKHORN_SOFTMAX"] and f["PRE_EPS"], f
    ref = shipped(x, W, b, al)
    wpair = triton_proj.split_weight(W, KP)
    variants = _variants(only, x, W, b, al, conv)
    results = {k: [] for k in variants}
    errs = {}
    for name, fn in variants.items():
        try:
            out = fn()
            torch.cuda.synchronize()
            if name.startswith("split"):
                errs[name] = float((out.float() - wpair.float()).abs().max())
            elif "only" in name or "w loads" in name or "fixed W" in name:
                errs[name] = float("nan")  # timing references: not the shipped outputs
            else:
                errs[name] = _diff(out, ref)
        except Exception as e:  # a variant that does not compile is reported, not fatal
            errs[name] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
    if args.interleave:
        ok = {k: v for k, v in variants.items() if not isinstance(errs[k], str)}
        res = interleaved_us(ok, args.interleave)
        print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton "
              f"{triton.__version__}; T {T}, C {C}, n {N}; {args.interleave} rounds, one "
              "call per variant a round, one profile; medians")
        print("| variant | kernel sum µs (median) | quartiles | vs shipped | per kernel µs "
              "(medians) |")
        print("|---|---|---|---|---|")
        for name, (med, sums, per) in res.items():
            q = sorted(sums)
            print(f"| {name} | {med:.1f} | {q[len(q) // 4]:.1f}-{q[(3 * len(q)) // 4]:.1f} | "
                  f"{errs[name]:.2e} | " + ", ".join(f"{k}={v:.1f}" for k, v in per.items())
                  + " |")
        for name in variants:
            if isinstance(errs[name], str):
                print(f"| {name} | | | {errs[name]} | |")
        return
    for _ in range(args.rounds):
        for name, fn in variants.items():
            if isinstance(errs[name], str):
                continue
            tot, per = kernel_us(fn)
            span = do_bench_cudagraph(fn, rep=50) * 1e3
            results[name].append((tot, span, per))
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton "
          f"{triton.__version__}; T {T}, C {C}, n {N}; {args.rounds} rounds interleaved")
    print("| variant | kernel sum µs (min-max) | span µs (min) | vs shipped | per kernel µs |")
    print("|---|---|---|---|---|")
    for name, rs in results.items():
        if not rs:
            print(f"| {name} | | | {errs[name]} | |")
            continue
        tots = [r[0] for r in rs]
        per = min(rs, key=lambda r: r[0])[2]
        e = errs[name]
        print(f"| {name} | {min(tots):.1f}-{max(tots):.1f} | {min(r[1] for r in rs):.1f} | "
              f"{e:.2e} | " + ", ".join(f"{k}={v:.1f}" for k, v in per.items()) + " |")


if __name__ == "__main__":
    main()
