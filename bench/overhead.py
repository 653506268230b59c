"""Forward+backward step time and peak memory of mHC on vs off, ours and peers, in one run.

Stacks (bf16, 8192 tokens, n = 4, deepseek convention for ours):
  * nemotron: Nemotron-H-8B-like, hidden 4096, the first 8 layers of the preset pattern
    (``M-M-M-M*``: Mamba2 d_state 128 / head dim 64 / 8 groups, squared-ReLU MLP 21504,
    GQA attention 32 heads / 8 groups); the Mamba2 scan of every row is named in the table
    (mamba-ssm's Triton SSD kernel when importable, else our PyTorch SSD);
  * swiglu: 4 SwiGLU MLP layers, hidden 4096, F 14336 (DESIGN.md section 7).
Rows: mHC off (first and last: the ratios use their mean, the drift is printed); ours fused
(Triton), fused with block recompute at the paper's optimum, our eager reference, the
reference under torch.compile; Megatron dev's ``HyperConnectionModule`` fused and native
(when ``MHC_MEGATRON_SRC`` names a tree; ``bench/peers.py``); DeepSeek's TileKernels when
tilelang and tile_kernels import (``bench/tilekernels_env.sh`` builds them for the H200 box).
Memory: peak allocated above the weights (activations + gradients) and its floor
(``bench/memfloor.py``: the plain stack's peak plus the bytes mHC must keep, counted).
Then mHC off, ours fused and fused + recompute again, interleaved (``interleaved``): time
ratios that clock drift between rows does not move.

    python bench/overhead.py [--out results.md] [--iters 30] [--stacks swiglu,nemotron]
                             [--skip 'torch.compile,eager'] [--rounds 5] [--round-steps 10]
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import memcensus  # noqa: E402
import memfloor  # noqa: E402
import peers  # noqa: E402

from mhc_model import HybridConfig, HybridModel  # noqa: E402
from mhc_model.config import AttentionConfig, MambaConfig, MHCConfig, MLPConfig  # noqa: E402
from mhc_model.layers import mamba2  # noqa: E402

N_STREAMS = 4


def stacks() -> dict[str, HybridConfig]:
    common = dict(hidden_size=4096, vocab_size=1024, params_dtype="bfloat16")
    return {
        "swiglu": HybridConfig(hybrid_layer_pattern="----", **common,
                               mlp=MLPConfig(ffn_hidden_size=14336, activation="swiglu")),
        "nemotron": HybridConfig(
            hybrid_layer_pattern="M-M-M-M*", **common,
            attention=AttentionConfig(num_attention_heads=32, num_query_groups=8),
            mlp=MLPConfig(ffn_hidden_size=21504, activation="squared_relu"),
            mamba=MambaConfig(d_state=128, head_dim=64, num_groups=8, expand=2, chunk_size=128),
        ),
    }


def paper_block(num_layers: int, n: int) -> tuple[int, float]:
    """Integer minimiser of the paper's recompute memory n*L/L_r + (n+2)*L_r (Eq. 20 gives the
    real optimum sqrt(nL/(n+2))); Megatron's compute_optimal_block_size truncates the real one,
    which for 4 layers is 1, a block size that keeps every stream and saves nothing."""
    real = math.sqrt(n * num_layers / (n + 2))
    cands = {max(1, math.floor(real)), math.ceil(real)}
    return min(cands, key=lambda b: (n * num_layers / b + (n + 2) * b, b)), real


def warm_gpu(seconds: float) -> None:
    """Load the GPU for ``seconds`` before the first row, so the first mHC-off row does not run
    at cold-GPU clocks the later rows never see (an H200 run drifted +5.4% first to last)."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(20):
            a @ a
        torch.cuda.synchronize()


def train_steps(model, ids: torch.Tensor, steps: int) -> None:
    for _ in range(steps):
        model(ids).float().mean().backward()
        model.zero_grad(set_to_none=True)


def timed_steps(model, ids: torch.Tensor, steps: int) -> float:
    """ms per forward+backward step over ``steps`` steps (CUDA events, synchronised)."""
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    train_steps(model, ids, steps)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / steps


def measure(build, ids: torch.Tensor, iters: int) -> tuple[float, float]:
    torch.manual_seed(0)
    model = build()
    torch.cuda.synchronize()
    base_mem = torch.cuda.memory_allocated()
    train_steps(model, ids, 2)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    ms = timed_steps(model, ids, iters)
    peak = (torch.cuda.max_memory_allocated() - base_mem) / 2**30
    del model
    torch.cuda.empty_cache()
    return ms, peak


def interleaved(builds: dict, ids: torch.Tensor, rounds: int, steps: int) -> dict:
    """ms/step of every model, the models resident together and timed in turn, ``rounds``
    times ``steps`` steps each: clock drift over the run (the sequential rows' first / last
    mHC-off pair moved 0.3-1.8%) then hits every model of a round alike.  Returns, per label,
    the per-round ms and the per-round ratio to the first label; and, per label, the bytes
    one forward keeps for backward by autograd node (``memcensus``)."""
    models = {}
    for label, build in builds.items():
        torch.manual_seed(0)
        models[label] = build()
    census = {label: memcensus.model_census(model, ids) for label, model in models.items()}
    ms = {label: [] for label in models}
    for _ in range(rounds):
        for label, model in models.items():
            train_steps(model, ids, 2)  # refill the caches the other models' turns used
            ms[label].append(timed_steps(model, ids, steps))
    first = next(iter(ms))
    del models
    torch.cuda.empty_cache()
    return ({label: (v, [a / b for a, b in zip(v, ms[first])]) for label, v in ms.items()},
            census)


def _median(v: list[float]) -> float:
    v = sorted(v)
    return (v[(len(v) - 1) // 2] + v[len(v) // 2]) / 2


def rows(base: HybridConfig):
    """(label, config, context manager factory, model transform, floor kind)."""
    n = N_STREAMS
    on = MHCConfig(enable_hyper_connections=True, num_residual_streams=n)
    lr, real = paper_block(base.num_layers, n)
    rc = MHCConfig(enable_hyper_connections=True, num_residual_streams=n,
                   mhc_recompute_layer_num=lr)
    null = contextlib.nullcontext
    out = [("mHC off (first)", base, null, None, None),
           ("ours fused (Triton)", base.replace(mhc=on), null, None, ("fused", None)),
           (f"ours fused, recompute L_r={lr} (paper optimum, real {real:.2f})",
            base.replace(mhc=rc), null, None, ("fused", lr)),
           ("ours eager reference", base.replace(mhc=on), peers.mhc_reference, None, None),
           ("ours reference, torch.compile", base.replace(mhc=on),
            peers.mhc_reference_compiled, None, None)]
    if peers.megatron_tree():
        for fused in (True, False):
            out.append((f"Megatron dev HyperConnectionModule, {'fused' if fused else 'native'}",
                        base.replace(mhc=on), null,
                        lambda m, f=fused: peers.megatron_sites(m, f), None))
    if peers.tilelang_status() is None:
        out.append(("DeepSeek TileKernels (tilelang)", base.replace(mhc=on), null,
                    peers.tilekernels_sites, None))
    out.append(("mHC off (last)", base, null, None, None))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # 30 steps (about 2 s a row): with 10 the same row read 1.051-1.085x across H200 runs
    ap.add_argument("--iters", type=int, default=30, help="timed steps a row")
    ap.add_argument("--warmup-s", type=float, default=10.0,
                    help="seconds of GPU load before the first row")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--stacks", default="swiglu,nemotron")
    ap.add_argument("--out", default=None)
    ap.add_argument("--skip", default="", help="comma-separated substrings of row labels to "
                    "leave out (e.g. 'torch.compile' when its compile time does not fit)")
    ap.add_argument("--rounds", type=int, default=5,
                    help="rounds of the interleaved off / fused / recompute timing (0: none)")
    ap.add_argument("--round-steps", type=int, default=10,
                    help="timed steps of each model in a round of the interleaved timing")
    args = ap.parse_args()
    skip = [s for s in args.skip.split(",") if s]
    ids = torch.randint(0, 1024, (1, args.tokens), device="cuda",
                        generator=torch.Generator(device="cuda").manual_seed(0))
    probe = torch.empty(1, device="cuda")
    scan = ("mamba-ssm Triton SSD" if mamba2.fast_kernels_allowed(probe)
            and mamba2._mamba_chunk_scan_combined() is not None else "our PyTorch SSD")
    import triton

    tree = peers.megatron_tree()
    mlm = (f"Megatron tree {tree} ({peers.tree_commit(tree)})" if tree
           else "Megatron rows skipped (MHC_MEGATRON_SRC unset)")
    tl_why = peers.tilelang_status()
    tl_note = (f"TileKernels row: skipped, {tl_why}" if tl_why else
               f"TileKernels {peers.tilekernels_provenance()}")
    lines = [f"# mHC step-time and memory overhead on {torch.cuda.get_device_name()}", "",
             f"torch {torch.__version__}, CUDA {torch.version.cuda}, triton {triton.__version__}; "
             f"{args.tokens} tokens, bf16, n = {N_STREAMS}, forward+backward, mean of "
             f"{args.iters} steps after 2 warm-up steps, one process, after {args.warmup_s:.0f} s "
             f"of GPU load. {mlm}. "
             f"{tl_note}. Peak = allocated memory above the weights "
             "(activations + gradients). Ratios against the mean of the two mHC-off rows.", "",
             "| stack | Mamba2 scan | config | ms/step | time ratio | peak GiB | mem ratio | "
             "floor GiB | peak / floor |",
             "|---|---|---|---|---|---|---|---|---|"]
    notes = []
    warm_gpu(args.warmup_s)
    for name in args.stacks.split(","):
        base = stacks()[name]
        stack_scan = scan if "M" in base.hybrid_layer_pattern else "-"
        results, builds, parity = [], {}, {}
        for label, cfg, ctx, transform, floor_kind in rows(base):
            if any(s in label for s in skip):
                continue
            t0 = time.perf_counter()

            def build(cfg=cfg, transform=transform, parity=parity):
                try:  # initialise on the GPU: a CPU init of ~1e9 bf16 values takes ~15 s
                    with torch.device("cuda"):
                        m = HybridModel(cfg)
                except Exception as e:  # noqa: BLE001 (any build problem: the CPU way)
                    print(f"GPU-side build failed ({type(e).__name__}: {e}); building on CPU")
                    m = HybridModel(cfg).cuda()
                m = transform(m) if transform else m
                if hasattr(m, "tilekernels_parity"):  # peers.tilekernels_sites
                    parity["layer 0"] = m.tilekernels_parity
                return m

            if label == "mHC off (first)" or label.startswith("ours fused"):
                builds[label.replace(" (first)", "")] = build

            try:
                with ctx():
                    ms, peak = measure(build, ids, args.iters)
            except Exception as e:  # a peer that fails is reported, the run goes on
                print(f"| {name} | {label} | failed: {type(e).__name__}: {str(e)[:300]}",
                      flush=True)
                results.append((label, None, None, floor_kind))
                continue
            results.append((label, ms, peak, floor_kind))
            print(f"{name} | {label} | {ms:.1f} ms | {peak:.2f} GiB "
                  f"({time.perf_counter() - t0:.0f}s)", flush=True)
        offs = [r for r in results if r[0].startswith("mHC off") and r[1] is not None]
        off_t = sum(r[1] for r in offs) / len(offs)
        off_m = sum(r[2] for r in offs) / len(offs)
        for label, ms, peak, floor_kind in results:
            if ms is None:
                lines.append(f"| {name} | {stack_scan} | {label} | failed | | | | | |")
                continue
            fl = fs = ""
            if floor_kind is not None:
                f = memfloor.floor(base, N_STREAMS, args.tokens, off_m, recompute=floor_kind[1])
                fl, fs = f"{f.total_gib:.2f}", f"{peak / f.total_gib:.3f}"
                notes.append(f"- {name}, {label}: {f.describe()}")
            lines.append(f"| {name} | {stack_scan} | {label} | {ms:.1f} | {ms / off_t:.3f} | "
                         f"{peak:.2f} | {peak / off_m:.3f} | {fl} | {fs} |")
        if args.rounds:
            res, census = interleaved(builds, ids, args.rounds, args.round_steps)
            notes.append(f"- {name}, kept for backward (bench/memcensus.py, by autograd node, "
                         "difference from mHC off): " + memcensus.describe(census, args.tokens))
            notes.append(f"- {name}, interleaved ({len(builds)} models resident, {args.rounds} "
                         f"rounds of {args.round_steps} steps each, in turn): " + "; ".join(
                             f"{label} median {_median(v):.1f} ms, ratio to mHC off median "
                             f"{_median(r):.3f} (rounds {min(r):.3f}-{max(r):.3f})"
                             for label, (v, r) in res.items()))
        if parity:
            notes.append(f"- {name}, TileKernels site against ours (layer 0, the same "
                         "parameters, 512 tokens, bf16, no grad: TileKernels' mhc_pre then runs "
                         "its fused inference kernel): max |difference| / max |ours| "
                         f"{parity['layer 0']:.2e}")
        drift = offs[-1][1] / offs[0][1] - 1 if len(offs) == 2 else float("nan")
        notes.append(f"- {name}: mHC-off drift last vs first {100 * drift:+.1f}% time, "
                     f"{100 * (offs[-1][2] / offs[0][2] - 1):+.1f}% memory.")
        text = "\n".join(lines + ["", "Memory floor (the plain peak measured in this run plus "
                                         "what mHC must keep, bench/memfloor.py):", "", *notes])
        print(text + "\n", flush=True)
        if args.out:  # after every stack, so a cut run keeps the stacks it finished
            with open(args.out, "w") as f:
                f.write(text + "\n")


if __name__ == "__main__":
    main()
