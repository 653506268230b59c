"""GPU timing by kernel durations (torch.profiler / CUPTI), shared by ``bench/kernels.py`` and
the coefficient-forward lab (``bench/coef_fwd_variants.py``): host-side launch overhead does
not count."""

from __future__ import annotations

from statistics import median

import torch
from torch.profiler import ProfilerActivity, profile


def kernel_us(fn, reps: int = 5) -> tuple[float, dict[str, float]]:
    """GPU time of one call as the sum of its kernels' durations (torch.profiler / CUPTI),
    so host-side launch overhead does not count; also returns the per-kernel breakdown."""
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
