"""Benchmark the fused mHC kernels against the eager reference on one GPU.

Shape: C=4096, T=8192, N=4, bf16 streams (an 8B-like layer, DESIGN.md section 7).  Each op is
timed forward and backward (triton.testing.do_bench, median, L2 flushed between reps).
Bandwidth = bytes the op must move (stream tensors only, in units of C bf16 elements per
token) / time, reported as a fraction of the device-to-device copy bandwidth (x.clone() of a
1 GiB tensor, read + write) measured in the same run.

    PYTHONPATH=. python bench/kernels.py [--out FILE] [--sweep]
"""

from __future__ import annotations

import argparse
import os

import torch
from triton.testing import do_bench

from bench.timing import kernel_us
from mhc_model import mhc_ref as R
from mhc_model.kernels import (
    gluon_proj,
    triton_coef,
    triton_mhc,
    triton_proj,
    triton_proj_bwd,
    triton_stream,
)
from mhc_model.kernels import triton_head as _head

T, N, C = 8192, 4, 4096
ITERS = 20


def _t(fn) -> float:
    return do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e-3


def _copy_bw() -> float:
    big = torch.empty(2**29, dtype=torch.bfloat16, device="cuda")
    return 2 * big.nbytes / _t(lambda: big.clone())


def _setup(gen):
    D, K = N * C, N * N + 2 * N
    x = torch.randn(T, N, C, generator=gen, device="cuda").bfloat16().requires_grad_()
    W = (torch.randn(K, D, generator=gen, device="cuda") / D**0.5).requires_grad_()
    b = torch.randn(K, generator=gen, device="cuda").requires_grad_()
    al = [torch.tensor([0.5], device="cuda").requires_grad_() for _ in range(3)]
    # the learned head (hc_head_fn [N, D], base [N], scale [1]) off its enable point
    head = [(torch.randn(N, D, generator=gen, device="cuda") / D**0.5).requires_grad_(),
            torch.randn(N, generator=gen, device="cuda").requires_grad_(),
            torch.tensor([0.7], device="cuda").requires_grad_()]
    return x, W, b, al, head


def _fwd_bwd(fn, inputs):
    """do_bench seconds and kernel-sum microseconds (+ breakdowns) for forward and backward."""
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    g = [torch.randn_like(o) for o in outs]

    def fwd():
        return fn(*inputs)

    def bwd():
        return torch.autograd.grad(outs, inputs, g, retain_graph=True)

    kf, pf = kernel_us(fwd)
    kb, pb = kernel_us(bwd)
    return _t(fwd), _t(bwd), kf, kb, pf, pb


def _direction_us(fn, inputs, which: int) -> float:
    """Kernel-sum µs of the forward (which=0) or backward (which=1) alone."""
    if which == 0:
        return kernel_us(lambda: fn(*inputs))[0]
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    g = [torch.randn_like(o) for o in outs]
    return kernel_us(lambda: torch.autograd.grad(outs, inputs, g, retain_graph=True))[0]


def _ops(impl, x, W, b, al, head, H_pre, H_post, H_res, y, conv="deepseek"):
    def coef(x_, W_, b_, a0, a1, a2):
        return impl.coefficients(x_, W_, b_, a0, a1, a2, iters=ITERS, convention=conv)

    def site(x_, W_, b_, a0, a1, a2, y_):
        # one whole site with y a leaf: (u, x') = (H_pre x, mix(H_res, x) + H_post y)
        if impl is triton_mhc:
            u, hp, hr, link = impl.site_pre(x_, W_, b_, a0, a1, a2, iters=ITERS, convention=conv)
            return u, impl.site_post(x_, hr, hp, y_, conv, link)
        hpre, hp, hr = impl.coefficients(x_, W_, b_, a0, a1, a2, iters=ITERS, convention=conv)
        return impl.aggregate(x_, hpre), impl.mix_post(x_, hr, hp, y_, conv)

    return {
        # bytes as implemented (C-units): fwd coef 4 + aggregate 5 + mix 9; bwd mix 14 +
        # dH_pre pass 5 + projection backward with the aggregate and mix dx folded in 13
        # ("group_mixg" tiles: the mix writes no dx, 10 + 5 + 13; the unfused chain moves
        # 8 + 9 + 14 and autograd's two nC sums 24)
        "site": (site, [x, W, b, *al, y], 2 * (4 * N + 2),
                 2 * (6 * N + 4 if triton_proj.site_tiles(N, C) == "group_mixg"
                      else 7 * N + 4)),
        "coefficients": (coef, [x, W, b, *al], 2 * N, 2 * 2 * N),
        "aggregate": (impl.aggregate, [x, H_pre], 2 * (N + 1), 2 * (2 * N + 1)),
        "mix_post": (lambda a, c, d, e: impl.mix_post(a, c, d, e, conv), [x, H_res, H_post, y],
                     2 * (2 * N + 1), 2 * (3 * N + 2)),
        # bytes the op must move: fwd reads nC, writes C; bwd reads nC + C, writes nC (the
        # fused forward reads x twice: projection, then aggregate)
        "learned_head": (lambda *a: impl.contract_learned(*a, 1e-6), [x, *head],
                         2 * (N + 1), 2 * (2 * N + 1)),
    }


def _epilogue_time(x, W, b, al) -> float:
    """Coefficient epilogue alone: RMS, alpha/bias, gates and 20 Sinkhorn iterations."""
    K = N * N + 2 * N
    KP = max(16, triton_proj._pow2(K))
    part = triton_proj.proj_forward(x.detach().reshape(T, N * C), W.detach(), K, KP, True)
    a3 = [a.detach() for a in al]

    def epi():
        return triton_coef.coef_epilogue(part, b.detach(), a3, N, N * C, ITERS, "deepseek",
                                         1e-6)

    return _t(epi), kernel_us(epi)[0]


# (name, (op, direction), config dict, overrides): every candidate is timed as the kernel
# sum of its op direction; the first entry of each group is the shipped default.
# proj_bwd = (BT, BD, warps, stages, DW_T, waves).  The full sweeps of 2026-12-01 (wave
# quantisation over 132 SMs, tiles, TMA, one-launch forms) are in
# bench/results/kernels_sweeps_h200.md; these lists re-check the defaults' neighbours.
# the site's projection backward (AGG + EXTRA operands): per-stream tiles (the shipped mode)
# with plain loads, then TMA descriptors for every [T, *] operand, then GROUP tiles (BT, C block,
# warps, stages, DW_T, waves) with the mix's dx as EXTRA, then two forming it from g (MIXG:
# 900-1600 us at the nine tiles of the tenth session's sweep, kernels_sweeps_h200.md run 14)
_PBS = ([{"proj_bwd_site": c} for c in
         [(64, 64, 4, 3, True, 4), (32, 64, 4, 3, True, 4)]]
        + [{"proj_bwd_site_tma": True, "proj_bwd_site": c} for c in
           [(64, 64, 4, 3, True, 8)]]
        + [{"proj_bwd_site_tiles": "group", "proj_bwd_group": c} for c in
           [(32, 16, 4, 3, True, 4), (64, 16, 4, 3, True, 4), (64, 16, 8, 3, True, 4),
            (32, 32, 8, 3, True, 4), (16, 64, 8, 3, True, 4), (32, 16, 4, 3, True, 8)]]
        + [{"proj_bwd_site_tiles": "group_mixg", "proj_bwd_group": c} for c in
           [(64, 16, 4, 3, True, 4), (32, 16, 4, 3, True, 8)]])
_MIX = [{"mix_bwd": c} for c in [(16384, 4), (8192, 2)]]
# coefficient forward, split over D: tiles (with the programs per SM that set the split), TMA
# descriptors and plain loads; the epilogue's (token block, warps). Dropped on the H200
# (2026-12-01; kernels_sweeps_h200.md): two one-launch forms (the projection + epilogue per
# token block over the whole of D, 104-405 µs against 81-114; the epilogue run by each token
# block's last split, 164-193 against 99-101), the weight split per tile in registers
# (95.5 against 73.7 µs), the weight pair read unpadded (3-d TMA blocks: no gain).
# The Gluon forward (gluon_proj, shipped on Hopper) at its tile and neighbours, then the
# Triton TMA kernel (the shipped form before it) at its own tiles.
_CF = ([{"proj_fwd_gluon_tile": c} for c in
        [(128, 128, 8, 3, 1), (128, 128, 8, 4, 1), (64, 128, 4, 3, 2)]]
       + [{"proj_fwd_gluon": False, "proj_fwd_tma_tile": c} for c in
          [(64, 128, 4, 3, 2), (64, 128, 4, 4, 2)]]
       + [{"proj_fwd_tma": False}]
       + [{"coef_fwd": c} for c in [(8, 1), (32, 2)]]
       + [{"split_w_block": c} for c in [64, 256]])
_PBC = [{"proj_bwd": c} for c in
        [(64, 128, 4, 3, True, 2), (64, 128, 4, 3, True, 4), (64, 128, 4, 4, True, 2),
         (64, 128, 4, 3, True, 1), (64, 128, 4, 2, True, 2), (64, 64, 4, 3, True, 4)]]
SWEEP = [
    ("coef_fwd", ("coefficients", 0), triton_proj.CONFIG, _CF),
    ("proj_bwd", ("coefficients", 1), triton_proj.CONFIG, _PBC),
    ("proj_bwd_site", ("site", 1), triton_proj.CONFIG, _PBS),
    ("proj_bwd_head", ("learned_head", 1), triton_proj.CONFIG,
     [{"proj_bwd_head_group": c} for c in (True, False)]
     + [{"proj_bwd_group": c} for c in [(64, 16, 4, 3, True, 4), (32, 16, 4, 3, True, 8),
                                        (32, 32, 8, 3, True, 4)]]),
    ("mix_bwd", ("mix_post", 1), triton_stream.CONFIG, _MIX),
    ("coef_bwd", ("coefficients", 1), triton_proj.CONFIG,
     [{"coef_bwd": c} for c in [(8, 1, 4), (4, 1, 4), (16, 2, 4)]]
     + [{"coef_bwd_hist_regs": 0}]
     + [{"finalize": c} for c in [(1024, 1024, 4), (4096, 1024, 8)]]),
]


def _sweep(ops, lines):
    lines.append("\n| sweep | config | kernel µs |\n|---|---|---|")
    for name, (op, which), cfg, cands in SWEEP:
        default = dict(cfg)
        best = None
        n0 = len(lines)
        for cand in cands:
            cfg.update(cand)
            label = ", ".join(f"{k}={v}" for k, v in cand.items())
            fn, inputs, *_ = ops[op]
            try:
                t = _direction_us(fn, inputs, which)
            except Exception as e:  # a config that does not compile/fit is reported, not fatal
                lines.append(f"| {name} | {label} | failed: {type(e).__name__} |")
                print(lines[-1], str(e)[:300], flush=True)
                cfg.clear()
                cfg.update(default)
                continue
            lines.append(f"| {name} | {label} | {t:.1f} |")
            print(lines[-1], flush=True)
            best = min(best or (t, label), (t, label))
            cfg.clear()
            cfg.update(default)
        lines.append(f"| {name} | best: {best[1] if best else None} | |")
        print("\n".join(lines[n0:]), flush=True)


def _host_us(reps: int = 200) -> tuple[float, float]:
    """Host time per call of the fused coefficients forward / backward at T = 64, where the
    GPU work is negligible (so wall time per call = Python + launch overhead)."""
    import time

    gen = torch.Generator(device="cuda").manual_seed(1)
    D, K = N * C, N * N + 2 * N
    x = torch.randn(64, N, C, generator=gen, device="cuda").bfloat16().requires_grad_()
    W = (torch.randn(K, D, generator=gen, device="cuda") / D**0.5).requires_grad_()
    b = torch.randn(K, generator=gen, device="cuda").requires_grad_()
    al = [torch.tensor([0.5], device="cuda").requires_grad_() for _ in range(3)]
    inputs = [x, W, b, *al]

    def fwd():
        return triton_mhc.coefficients(*inputs, iters=ITERS, convention="deepseek")

    outs = fwd()
    g = [torch.randn_like(o) for o in outs]

    def bwd():
        return torch.autograd.grad(outs, inputs, g, retain_graph=True)

    res = []
    for f in (fwd, bwd):
        for _ in range(10):
            f()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            f()
        torch.cuda.synchronize()
        res.append((time.perf_counter() - t0) / reps * 1e6)
    res += _host_reference_us(reps)
    if os.environ.get("MHC_HOST_PROFILE"):
        import cProfile
        import pstats

        pr = cProfile.Profile()
        pr.enable()
        for _ in range(100):
            fwd()
            bwd()
        torch.cuda.synchronize()
        pr.disable()
        pstats.Stats(pr).sort_stats("tottime").print_stats(25)
    return tuple(res)


def _host_reference_us(reps: int) -> list[float]:
    """Reference host costs on this machine: one Triton launch (the 13-argument finalize
    kernel, one program), one torch.empty, and autograd.grad through a trivial Function."""
    import time

    dev = torch.device("cuda")
    f32 = torch.float32
    part = torch.zeros(64, device=dev)
    outs = [torch.empty(k, device=dev) for k in (16, 16, 4)]

    def launch():
        triton_proj_bwd._finalize_kernel[(1,)](part, outs[0], part, outs[1], part, outs[2], 1,
                                               16, 1, K=8, KP=16, BLOCK=16, BG=16,
                                               num_warps=4)

    def empty():
        return torch.empty((64, 4), dtype=f32, device=dev)

    class _Triv(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a):
            return a.detach()

        @staticmethod
        def backward(ctx, g):
            return g

    a = torch.zeros(16, device=dev, requires_grad=True)
    o = _Triv.apply(a)
    go = torch.ones_like(o)

    def grad():
        return torch.autograd.grad(o, a, go, retain_graph=True)

    res = []
    for f in (launch, empty, grad):
        for _ in range(10):
            f()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            f()
        torch.cuda.synchronize()
        res.append((time.perf_counter() - t0) / reps * 1e6)
    return res


def _compiled_stats() -> list[str]:
    """Registers / spills / shared memory / wgmma use of every compiled coefficient kernel."""
    out = []
    for mod, name in ((triton_proj_bwd, "_proj_bwd_kernel"),
                      (triton_proj_bwd, "_proj_bwd_tma_kernel"),
                      (triton_coef, "_coef_bwd_kernel"), (triton_proj, "_proj_fwd_kernel"),
                      (triton_proj, "_proj_fwd_tma_kernel"),
                      (gluon_proj, "_proj_fwd_gluon_kernel"),
                      (gluon_proj, "_proj_fwd_gluon_ws_kernel"),
                      (triton_proj_bwd, "_finalize_kernel"),
                      (triton_coef, "_coef_fwd_kernel"),
                      (_head, "_head_fwd_kernel"), (_head, "_head_bwd_kernel"),
                      (triton_stream, "_mix_bwd_kernel"), (triton_stream, "_mix_fwd_kernel"),
                      (triton_stream, "_agg_bwd_kernel"), (triton_stream, "_agg_fwd_kernel")):
        fn = getattr(mod, name, None)  # gluon_proj's kernel exists only where Gluon imports
        for caches in getattr(fn, "device_caches", {}).values():
            for k in caches[0].values():
                try:
                    ptx = k.asm.get("ptx", "")
                    cst = {fn.arg_names[i[0]]: v for i, v in k.src.constants.items()
                           if isinstance(v, (bool, int)) and not isinstance(v, type(None))}
                    out.append(f"{name} regs={k.n_regs} spills={k.n_spills} "
                               f"smem={k.metadata.shared} warps={k.metadata.num_warps} "
                               f"stages={k.metadata.num_stages} wgmma={'wgmma' in ptx} "
                               f"mma.sync={'mma.sync' in ptx} {cst}")
                except Exception as e:  # diagnostics only
                    out.append(f"{name}: {type(e).__name__}: {e}")
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--diag", action="store_true", help="print compiled-kernel statistics")
    ap.add_argument("--ops", default=None, help="comma-separated subset of the ops (and no "
                    "epilogue / host-time lines)")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    gen = torch.Generator(device="cuda").manual_seed(0)
    x, W, b, al, head = _setup(gen)
    with torch.no_grad():
        H_pre, H_post, H_res = triton_mhc.coefficients(x, W, b, *al, iters=ITERS,
                                                       convention="deepseek")
    H_pre, H_post, H_res = (h.requires_grad_() for h in (H_pre, H_post, H_res))
    y = torch.randn(T, C, generator=gen, device="cuda").bfloat16().requires_grad_()
    copy_bw = _copy_bw()
    name = torch.cuda.get_device_name()
    lines = [f"# mHC kernels on {name}", "",
             f"T={T}, N={N}, C={C}, bf16 streams, fp32 coefficients, {ITERS} Sinkhorn iters, "
             f"deepseek convention. Copy bandwidth (clone of 1 GiB, read+write): "
             f"{copy_bw / 1e9:.0f} GB/s. Bytes = stream bytes the op must move.", "",
             "Times: `bench` = do_bench median (host launch overhead included when the GPU "
             "outruns the host); `kern` = sum of the op's GPU kernel durations (profiler). "
             "Bandwidth fractions use `kern`.", "",
             "| op | impl | fwd µs bench | fwd µs kern | fwd bytes/tok (C) | fwd GB/s | "
             "fwd / copy | bwd µs bench | bwd µs kern | bwd bytes/tok (C) | bwd GB/s | "
             "bwd / copy |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    tri = _ops(triton_mhc, x, W, b, al, head, H_pre, H_post, H_res, y)
    ref = _ops(R, x, W, b, al, head, H_pre, H_post, H_res, y)
    breakdown = []
    for op in (args.ops.split(",") if args.ops else tri):
        for impl, ops in (("triton", tri), ("eager ref", ref)):
            fn, inputs, bf, bb = ops[op]
            tf, tb, kf, kb, pf, pb = _fwd_bwd(fn, inputs)
            gf = bf * T * C / (kf * 1e-6)
            gb = bb * T * C / (kb * 1e-6)
            lines.append(f"| {op} | {impl} | {tf * 1e6:.1f} | {kf:.1f} | {bf // 2} | "
                         f"{gf / 1e9:.0f} | {gf / copy_bw:.2f} | {tb * 1e6:.1f} | {kb:.1f} | "
                         f"{bb // 2} | {gb / 1e9:.0f} | {gb / copy_bw:.2f} |")
            print(lines[-1], flush=True)
            if impl == "triton":
                for d, per in (("fwd", pf), ("bwd", pb)):
                    for k, v in sorted(per.items(), key=lambda kv: -kv[1]):
                        breakdown.append(f"| {op} {d} | `{k[:60]}` | {v:.1f} |")
    lines += ["", "Triton path, GPU kernels per call:", "", "| op | kernel | µs |",
              "|---|---|---|", *breakdown]
    if args.ops:
        print("\n".join(lines), flush=True)
        if args.out:
            with open(args.out, "w") as f:
                f.write("\n".join(lines) + "\n")
        if args.diag:
            print("\n".join(_compiled_stats()), flush=True)
        return
    te, ke = _epilogue_time(x, W, b, al)
    lines += ["", f"Coefficient epilogue alone (RMS + alpha/bias + gates + {ITERS}-iter Sinkhorn, "
              f"from the projection partials): {te * 1e6:.1f} µs bench, {ke:.1f} µs kern "
              "(target ≤ 30 µs)."]
    hf, hb, hl, he, hg = _host_us()
    lines += ["", f"Host time per call (T = 64, GPU work negligible): coefficients forward "
              f"{hf:.1f} µs, backward {hb:.1f} µs (Python + launches; autograd engine included "
              f"for the backward). Reference costs on this host: one Triton launch {hl:.1f} µs, "
              f"one torch.empty {he:.1f} µs, autograd.grad through a trivial Function "
              f"{hg:.1f} µs."]
    print("\n".join(lines), flush=True)
    if args.sweep:
        _sweep(tri, lines)
    if args.diag:
        print("\n".join(_compiled_stats()), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
