"""Where one training step's time goes, mHC off vs on (issue 16): a torch.profiler trace of one
forward+backward step of a ``bench/overhead.py`` stack, GPU kernel time summed by kernel name,
for the plain residual and for our fused mHC, and the difference; with ``--recompute L`` the
two runs are our fused mHC without and with block recompute. Not a test.

    python bench/profile_step.py [--stack swiglu] [--tokens 8192] [--recompute 2] [--top 25]
                                 [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import overhead  # noqa: E402

from mhc_model import HybridModel  # noqa: E402
from mhc_model.config import MHCConfig  # noqa: E402


def _kernel_us(model, ids, steps: int = 2
               ) -> tuple[dict[str, float], float, dict[str, float]]:
    """Per-kernel-name GPU µs per step, the step's wall ms (CUDA events), after warm-up, and
    the GPU µs per step of each aten op (with its input shapes) that launched kernels."""
    from torch.profiler import ProfilerActivity, profile

    overhead.train_steps(model, ids, 2)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
                 record_shapes=True) as prof:
        step_ms = overhead.timed_steps(model, ids, steps)
    per: dict[str, float] = defaultdict(float)
    ops: dict[str, float] = defaultdict(float)
    for e in prof.key_averages(group_by_input_shape=True):
        dt = getattr(e, "self_device_time_total", None)
        if dt is None:
            dt = e.self_cuda_time_total
        if dt <= 0:
            continue
        if getattr(e, "device_type", None) is not None and "CPU" in str(e.device_type):
            ops[f"{e.key} {e.input_shapes}"[:110]] += dt / steps
        else:
            per[e.key[:70]] += dt / steps
    return dict(per), step_ms, dict(ops)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stack", default="swiglu")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--recompute", type=int, default=None,
                    help="compare mHC on without / with mhc_recompute_layer_num L")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    base = overhead.stacks()[args.stack]
    on = base.replace(mhc=MHCConfig(enable_hyper_connections=True,
                                    num_residual_streams=overhead.N_STREAMS))
    if args.recompute is None:
        pair, labels = (base, on), ("off", "on")
    else:
        pair = (on, on.with_mhc(mhc_recompute_layer_num=args.recompute))
        labels = ("on", f"recompute {args.recompute}")
    ids = torch.randint(0, 1024, (1, args.tokens), device="cuda",
                        generator=torch.Generator(device="cuda").manual_seed(0))
    runs = {}
    for label, cfg in zip(("off", "on"), pair):
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = HybridModel(cfg)
        runs[label] = _kernel_us(model, ids)
        del model
        torch.cuda.empty_cache()
    (off, off_ms, off_ops), (on, on_ms, on_ops) = runs["off"], runs["on"]
    lines = [f"# One step of the {args.stack} stack, {args.tokens} tokens, on "
             f"{torch.cuda.get_device_name()} (torch {torch.__version__})", "",
             f"Step wall (CUDA events, profiler on): {labels[0]} {off_ms:.2f} ms, {labels[1]} "
             f"{on_ms:.2f} ms; GPU kernel sums: {labels[0]} {sum(off.values()) / 1e3:.2f} ms, "
             f"{labels[1]} {sum(on.values()) / 1e3:.2f} ms.", "",
             f"| kernel | {labels[0]} µs | {labels[1]} µs | difference µs |", "|---|---|---|---|"]
    names = sorted(set(off) | set(on), key=lambda k: -abs(on.get(k, 0) - off.get(k, 0)))
    for k in names[:args.top]:
        lines.append(f"| `{k}` | {off.get(k, 0):.1f} | {on.get(k, 0):.1f} | "
                     f"{on.get(k, 0) - off.get(k, 0):+.1f} |")
    lines += ["", "By launching op (CPU op and input shapes; GPU µs of the kernels it launched):",
              "", f"| op | {labels[0]} µs | {labels[1]} µs | difference µs |", "|---|---|---|---|"]
    names = sorted(set(off_ops) | set(on_ops),
                   key=lambda k: -abs(on_ops.get(k, 0) - off_ops.get(k, 0)))
    for k in names[:args.top]:
        lines.append(f"| `{k}` | {off_ops.get(k, 0):.1f} | {on_ops.get(k, 0):.1f} | "
                     f"{on_ops.get(k, 0) - off_ops.get(k, 0):+.1f} |")
    text = "\n".join(lines)
    print(text, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
