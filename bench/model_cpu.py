"""Not a test: forward+backward time of mHC on vs off for a small proxy on CPU, as a ratio in
one run. Small proxies overstate mHC's relative cost (DESIGN.md §7): do not quote these ratios
as model-scale ratios.

    python bench/model_cpu.py [--pattern M-M*-M-] [--hidden 256] [--seq 256] [--batch 2]
"""

from __future__ import annotations

import argparse
import time

import torch

from mhc_model import HybridConfig, HybridModel
from mhc_model.config import AttentionConfig, MambaConfig, MHCConfig, MLPConfig


def bench(cfg: HybridConfig, ids: torch.Tensor, iters: int) -> float:
    torch.manual_seed(0)
    model = HybridModel(cfg)
    for _ in range(2):  # warm-up
        model(ids).float().square().mean().backward()
    t0 = time.perf_counter()
    for _ in range(iters):
        model.zero_grad(set_to_none=True)
        model(ids).float().square().mean().backward()
    return (time.perf_counter() - t0) / iters


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pattern", default="M-M*-M-")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    args = ap.parse_args()
    base = HybridConfig(
        hybrid_layer_pattern=args.pattern, hidden_size=args.hidden, vocab_size=1024,
        attention=AttentionConfig(num_attention_heads=8, num_query_groups=4),
        mlp=MLPConfig(ffn_hidden_size=4 * args.hidden),
        mamba=MambaConfig(d_state=32, head_dim=32, num_groups=2, chunk_size=64),
    )
    ids = torch.randint(0, 1024, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    rows = [("mHC off", base)]
    for n in (2, 4):
        rows.append((f"mHC on n={n}", base.replace(mhc=MHCConfig(enable_hyper_connections=True,
                                                                 num_residual_streams=n))))
    rows.append(("mHC on n=4 recompute=2", base.replace(mhc=MHCConfig(
        enable_hyper_connections=True, num_residual_streams=4, mhc_recompute_layer_num=2))))
    times = [(name, bench(cfg, ids, args.iters)) for name, cfg in rows]
    off = times[0][1]
    print(f"CPU proxy: pattern {args.pattern}, hidden {args.hidden}, tokens "
          f"{args.batch * args.seq}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"| {'config':<24} | {'fwd+bwd ms':>10} | {'ratio to off':>12} |")
    print(f"|{'-' * 26}|{'-' * 12}|{'-' * 14}|")
    for name, t in times:
        print(f"| {name:<24} | {t * 1e3:>10.1f} | {t / off:>12.2f} |")


if __name__ == "__main__":
    main()
