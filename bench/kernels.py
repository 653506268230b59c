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

import torch
from triton.testing import do_bench

from mhc_model import mhc_ref as R
from mhc_model.kernels import triton_coef, triton_mhc, triton_stream

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
    return x, W, b, al


def _kernel_us(fn, reps: int = 5) -> tuple[float, dict[str, float]]:
    """GPU time of one call as the sum of its kernels' durations (torch.profiler / CUPTI),
    so host-side launch overhead does not count; also returns the per-kernel breakdown."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    per = {}
    for e in prof.key_averages():
        dt = getattr(e, "self_device_time_total", None)
        if dt is None:
            dt = e.self_cuda_time_total
        if dt > 0:
            per[e.key] = dt / reps
    return sum(per.values()), per


def _fwd_bwd(fn, inputs):
    """do_bench seconds and kernel-sum microseconds (+ breakdowns) for forward and backward."""
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    g = [torch.randn_like(o) for o in outs]

    def fwd():
        return fn(*inputs)

    def bwd():
        return torch.autograd.grad(outs, inputs, g, retain_graph=True)

    kf, pf = _kernel_us(fwd)
    kb, pb = _kernel_us(bwd)
    return _t(fwd), _t(bwd), kf, kb, pf, pb


def _direction_us(fn, inputs, which: int) -> float:
    """Kernel-sum µs of the forward (which=0) or backward (which=1) alone."""
    if which == 0:
        return _kernel_us(lambda: fn(*inputs))[0]
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    g = [torch.randn_like(o) for o in outs]
    return _kernel_us(lambda: torch.autograd.grad(outs, inputs, g, retain_graph=True))[0]


def _ops(impl, x, W, b, al, H_pre, H_post, H_res, y, conv="deepseek"):
    def coef(x_, W_, b_, a0, a1, a2):
        return impl.coefficients(x_, W_, b_, a0, a1, a2, iters=ITERS, convention=conv)

    return {
        "coefficients": (coef, [x, W, b, *al], 2 * N, 2 * 2 * N),
        "aggregate": (impl.aggregate, [x, H_pre], 2 * (N + 1), 2 * (2 * N + 1)),
        "mix_post": (lambda a, c, d, e: impl.mix_post(a, c, d, e, conv), [x, H_res, H_post, y],
                     2 * (2 * N + 1), 2 * (3 * N + 2)),
    }


def _epilogue_time(x, W, b, al) -> float:
    """Coefficient epilogue alone: RMS, alpha/bias, gates and 20 Sinkhorn iterations."""
    K = N * N + 2 * N
    KP = max(16, triton_coef._pow2(K))
    part, ss = triton_coef.proj_forward(x.detach().reshape(T, N * C), W.detach(), K, KP, True)
    a3 = torch.cat([a.detach() for a in al])
    def epi():
        return triton_coef.coef_epilogue(part, ss, b.detach(), a3, N, N * C, ITERS, True, 1e-6)

    return _t(epi), _kernel_us(epi)[0]


SWEEP = {
    ("coef", "proj_fwd"): [(128, 128, 8, 3), (128, 256, 8, 3), (128, 128, 8, 4)],
    ("coef", "proj_bwd"): [(64, 64, 4, 3), (64, 64, 4, 2), (128, 64, 8, 3), (64, 64, 8, 4),
                           (64, 32, 4, 3)],
}


def _sweep(ops, lines):
    mods = {"coef": triton_coef.CONFIG, "stream": triton_stream.CONFIG}
    target = {"proj_fwd": ("coefficients", 0), "waves": ("coefficients", 0),
              "proj_bwd": ("coefficients", 1), "coef_bt": ("coefficients", 1),
              "agg_fwd": ("aggregate", 0), "agg_bwd": ("aggregate", 1),
              "mix_fwd": ("mix_post", 0), "mix_bwd": ("mix_post", 1)}
    lines.append("\n| sweep key | config | kernel µs |\n|---|---|---|")
    for (mod, key), cands in SWEEP.items():
        cfg = mods[mod]
        default = cfg[key]
        best = None
        for cand in cands:
            cfg[key] = cand
            op, which = target[key]
            fn, inputs, *_ = ops[op]
            try:
                t = _direction_us(fn, inputs, which) * 1e-6
            except Exception as e:  # a config that does not compile/fit is reported, not fatal
                lines.append(f"| {key} | {cand} | failed: {type(e).__name__} |")
                continue
            lines.append(f"| {key} | {cand} | {t * 1e6:.1f} |")
            best = min(best or (t, cand), (t, cand))
        lines.append(f"| {key} | best {best[1] if best else None} (default {default}) | |")
        cfg[key] = default
        print("\n".join(lines[-len(cands) - 1:]), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--sweep", action="store_true")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    gen = torch.Generator(device="cuda").manual_seed(0)
    x, W, b, al = _setup(gen)
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
    tri = _ops(triton_mhc, x, W, b, al, H_pre, H_post, H_res, y)
    ref = _ops(R, x, W, b, al, H_pre, H_post, H_res, y)
    breakdown = []
    for op in tri:
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
    te, ke = _epilogue_time(x, W, b, al)
    lines += ["", f"Coefficient epilogue alone (RMS + alpha/bias + gates + {ITERS}-iter Sinkhorn, "
              f"from the projection partials): {te * 1e6:.1f} µs bench, {ke:.1f} µs kern "
              "(target ≤ 30 µs)."]
    print("\n".join(lines), flush=True)
    if args.sweep:
        _sweep(tri, lines)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
