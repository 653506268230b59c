"""Convert a ~1B-parameter random hybrid checkpoint and run `mhc-convert verify` on it.

    python bench/verify_1b.py WORKDIR [--device cuda] [--out results.md]

Writes WORKDIR/off (native, bf16), converts it with `mhc-convert enable` (exact init, n = 4,
learned contract), then verifies on the device in bf16 and fp32 through the real CLI.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from mhc_model import HybridConfig, HybridModel
from mhc_model.config import AttentionConfig, MambaConfig, MLPConfig


def config() -> HybridConfig:
    return HybridConfig(
        hybrid_layer_pattern="M-M-M-M*-M-M-M-M*-M-M-M-M-", hidden_size=2048, vocab_size=65536,
        params_dtype="bfloat16",
        attention=AttentionConfig(num_attention_heads=16, num_query_groups=4),
        mlp=MLPConfig(ffn_hidden_size=8192, activation="squared_relu"),
        mamba=MambaConfig(d_state=128, head_dim=64, num_groups=8, expand=2, chunk_size=128),
    )


def cli(*args: str) -> dict:
    res = subprocess.run([sys.executable, "-m", "mhc_convert", *args, "--json"],
                         capture_output=True, text=True)
    print(res.stdout.strip()[:2000], res.stderr.strip()[-2000:], sep="\n", flush=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


@torch.no_grad()
def bf16_floor(path: Path, device: str) -> dict:
    from mhc_convert.parity import load_model

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config().vocab_size, (2, 512), generator=g).to(device)
    out = {}
    for dtype in ("fp32", "bf16"):
        model = load_model(path, device=device, dtype=dtype)
        out[dtype] = model(ids).float()
        del model
    diff = (out["fp32"] - out["bf16"]).abs()
    top1 = (out["fp32"].argmax(-1) == out["bf16"].argmax(-1)).float().mean().item()
    return {"max_abs": diff.max().item(), "mean_abs": diff.mean().item(), "top1": top1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workdir", type=Path)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    off, on = args.workdir / "off", args.workdir / "on"
    torch.manual_seed(0)
    with torch.device(args.device):
        model = HybridModel(config())
    params = sum(p.numel() for p in model.parameters())
    model.cpu().save_pretrained(off)
    del model
    t0 = time.perf_counter()
    rep = cli("enable", str(off), str(on), "--contract", "learned")
    convert_s = time.perf_counter() - t0
    rows = []
    for dtype in ("bf16", "fp32"):
        r = cli("verify", str(off), str(on), "--device", args.device, "--dtype", dtype,
                "--batch", "2", "--seq", "512")
        rows.append((dtype, r))
    lines = [f"# verify on a {params / 1e9:.2f}B-parameter converted hybrid checkpoint", "",
             f"device: {torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}; "
             f"pattern {config().hybrid_layer_pattern}, hidden 2048, bf16 weights (random); "
             f"enable (exact, n=4, learned contract): {rep['bytes_total'] / 1e9:.2f} GB in "
             f"{convert_s:.1f}s; verify batch 2 x 512 tokens.", "",
             "| dtype | max-abs | mean-abs | KL(A‖B) | top-1 agreement | verdict |",
             "|---|---|---|---|---|---|"]
    for dtype, r in rows:
        lines.append(f"| {dtype} | {r['max_abs']:.3e} | {r['mean_abs']:.3e} | {r['kl']:.3e} | "
                     f"{r['top1_agreement'] * 100:.3f}% | {'PASS' if r['ok'] else 'FAIL'} |")
    # Control: the source model against itself, bf16 vs fp32. Random weights give nearly flat
    # logits, so bf16 rounding alone flips top-1 on a share of tokens; that share is the floor
    # any bf16 comparison on this checkpoint can reach.
    ctrl = bf16_floor(off, args.device)
    lines.append(f"| control: source bf16 vs source fp32 | {ctrl['max_abs']:.3e} | "
                 f"{ctrl['mean_abs']:.3e} | — | {ctrl['top1'] * 100:.3f}% | (floor) |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
