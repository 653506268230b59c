"""Forward+backward step time and peak memory of mHC on vs off, in one run, on one GPU.

Stacks (bf16, 8192 tokens, n = 4, deepseek convention):
  * nemotron: Nemotron-H-8B-like, hidden 4096, the first 8 layers of the preset pattern
    (``M-M-M-M*``: Mamba2 d_state 128 / head dim 64 / 8 groups, squared-ReLU MLP 21504,
    GQA attention 32 heads / 8 groups);
  * swiglu: 4 SwiGLU MLP layers, hidden 4096, F 14336 (the configuration DESIGN.md §7 quotes
    for eager PyTorch 2.08x, torch.compile 1.40x, lucidrains 3.63x).
Rows: mHC off; mHC on with the fused Triton kernels; the same with MHC_KERNELS=reference
(eager paper-exact PyTorch); fused with ``mhc_recompute_layer_num``.

    python bench/overhead.py [--out results.md] [--iters 5]
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from mhc_model import HybridConfig, HybridModel
from mhc_model.config import AttentionConfig, MambaConfig, MHCConfig, MLPConfig


def stacks() -> dict[str, HybridConfig]:
    common = dict(hidden_size=4096, vocab_size=1024, params_dtype="bfloat16")
    return {
        "nemotron": HybridConfig(
            hybrid_layer_pattern="M-M-M-M*", **common,
            attention=AttentionConfig(num_attention_heads=32, num_query_groups=8),
            mlp=MLPConfig(ffn_hidden_size=21504, activation="squared_relu"),
            mamba=MambaConfig(d_state=128, head_dim=64, num_groups=8, expand=2, chunk_size=128),
        ),
        "swiglu": HybridConfig(hybrid_layer_pattern="----", **common,
                               mlp=MLPConfig(ffn_hidden_size=14336, activation="swiglu")),
    }


def measure(cfg: HybridConfig, ids: torch.Tensor, iters: int, kernels: str) -> tuple[float, float]:
    os.environ["MHC_KERNELS"] = kernels
    torch.manual_seed(0)
    model = HybridModel(cfg).cuda()
    torch.cuda.synchronize()
    base_mem = torch.cuda.memory_allocated()
    for _ in range(2):
        model(ids).float().mean().backward()
        model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        model(ids).float().mean().backward()
        model.zero_grad(set_to_none=True)
    end.record()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base_mem) / 2**30
    del model
    torch.cuda.empty_cache()
    return start.elapsed_time(end) / iters, peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    ids = torch.randint(0, 1024, (1, args.tokens), device="cuda",
                        generator=torch.Generator(device="cuda").manual_seed(0))
    try:
        import mamba_ssm  # noqa: F401
        mamba_path = "mamba-ssm"
    except ImportError:
        mamba_path = "our PyTorch SSD reference (mamba-ssm not installed)"
    lines = [f"# mHC step-time overhead on {torch.cuda.get_device_name()}", "",
             f"torch {torch.__version__}, {args.tokens} tokens, bf16, n = 4, deepseek convention, "
             f"forward+backward, mean of {args.iters} steps after 2 warm-up steps; "
             f"Mamba2 scan: {mamba_path}. Peak = activation memory above the weights.", "",
             "| stack | config | ms/step | ratio | peak GiB | mem ratio |",
             "|---|---|---|---|---|---|"]
    for name, base in stacks().items():
        rows = [("mHC off", base, "")]
        on = MHCConfig(enable_hyper_connections=True, num_residual_streams=4)
        rows.append(("mHC on, fused", base.replace(mhc=on), ""))
        rows.append(("mHC on, eager reference", base.replace(mhc=on), "reference"))
        for lr in (2,):
            rc = MHCConfig(enable_hyper_connections=True, num_residual_streams=4,
                           mhc_recompute_layer_num=lr)
            rows.append((f"mHC on, fused, recompute L_r={lr}", base.replace(mhc=rc), ""))
        off_t = off_m = None
        for label, cfg, kern in rows:
            t0 = time.perf_counter()
            ms, peak = measure(cfg, ids, args.iters, kern)
            off_t = off_t or ms
            off_m = off_m or peak
            lines.append(f"| {name} | {label} | {ms:.1f} | {ms / off_t:.3f} | {peak:.2f} | "
                         f"{peak / off_m:.3f} |")
            print(lines[-1], f"({time.perf_counter() - t0:.0f}s)", flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
