"""Train a small hybrid model, checkpoint it, and resume with mHC toggled (README.md, "Toggling
mHC mid-training"). Run it from the repository root inside .venv (`source .venv/bin/activate`).

    # mHC-off run, checkpoints every 10 steps (native + Megatron torch_dist)
    python examples/toggle_mhc.py --out runs/off --steps 20 --save-every 10
    # in-process toggle: resume an mHC-off checkpoint into an mHC-on model
    python examples/toggle_mhc.py --resume runs/off/native/iter_0000020 --mhc on \
        --out runs/on-native --steps 20
    # offline toggle: convert, then resume as is
    mhc-convert enable runs/off/torch_dist runs/off-mhc
    python examples/toggle_mhc.py --resume runs/off-mhc --out runs/on --steps 20

Prints one line per step: ``iteration loss``. Refuses up front (exit 2) to save where a
checkpoint already is.
"""

from __future__ import annotations

import argparse
import sys

from mhc_model import HybridConfig, HybridModel
from mhc_model.config import (
    AttentionConfig,
    GDNConfig,
    MambaConfig,
    MHCConfig,
    MLAConfig,
    MLPConfig,
    MoEConfig,
)
from mhc_model.errors import ConvertError
from mhc_model.train import TrainConfig, Trainer


def small_config(pattern: str, mhc: bool, streams: int) -> HybridConfig:
    return HybridConfig(
        hybrid_layer_pattern=pattern, hidden_size=64, vocab_size=128,
        attention=AttentionConfig(num_attention_heads=4, num_query_groups=2),
        mlp=MLPConfig(ffn_hidden_size=128),
        moe=MoEConfig(num_experts=4, router_topk=2, moe_ffn_hidden_size=64),
        mamba=MambaConfig(d_state=16, head_dim=16, num_groups=2, expand=2, chunk_size=16),
        gdn=GDNConfig(num_key_heads=2, num_value_heads=4, key_head_dim=16, value_head_dim=16,
                      chunk_size=16),
        mla=MLAConfig(q_lora_rank=32, kv_lora_rank=32, qk_head_dim=16, qk_pos_emb_head_dim=8,
                      v_head_dim=16, index_n_heads=2, index_head_dim=16, index_topk=8),
        mhc=MHCConfig(enable_hyper_connections=mhc, num_residual_streams=streams),
    )


def main(argv: list[str] | None = None) -> int:
    try:
        return run(argv)
    except ConvertError as e:  # one line, the error's exit code (as mhc-convert does)
        print(f"toggle_mhc: error: {e.one_line()}", file=sys.stderr)
        return e.exit_code


def run(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 epilog="See README.md, 'Toggling mHC mid-training'.")
    ap.add_argument("--out", required=True, help="directory for checkpoints")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--save-every", type=int, default=0, help="0: save once, at the end")
    ap.add_argument("--format", choices=["native", "torch_dist", "both"], default="both")
    ap.add_argument("--resume", help="native checkpoint dir, or torch_dist run/iteration dir")
    ap.add_argument("--mhc", choices=["on", "off", "keep"], default="keep",
                    help="with --resume: toggle mHC in process (default: as checkpointed)")
    ap.add_argument("--pattern", default="M*-M-", help="fresh runs: hybrid_layer_pattern")
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    formats = ("native", "torch_dist") if a.format == "both" else (a.format,)

    if a.resume:
        config = None
        if a.mhc != "keep":
            from mhc_model.train import checkpoint_config

            saved = checkpoint_config(a.resume)
            config = saved.with_mhc(enable_hyper_connections=a.mhc == "on",
                                    num_residual_streams=a.streams if a.mhc == "on"
                                    else saved.mhc.num_residual_streams)
        trainer = Trainer.resume(a.resume, config=config)
        print(f"resumed {a.resume} at iteration {trainer.iteration}, mHC "
              f"{'on' if trainer.model.config.mhc_on else 'off'}", file=sys.stderr)
    else:
        cfg = small_config(a.pattern, a.mhc == "on", a.streams)
        trainer = Trainer(HybridModel(cfg), TrainConfig(lr=a.lr, seed=a.seed))
    every = a.save_every or a.steps
    start, end = trainer.iteration, trainer.iteration + a.steps
    trainer.check_save(a.out, formats, [i for i in range(start + 1, end + 1)
                                        if i % every == 0 or i == end])
    for _ in range(a.steps):
        loss = trainer.step()
        print(f"{trainer.iteration} {loss:.6f}", flush=True)
        if trainer.iteration % every == 0 or trainer.iteration == end:
            for fmt, path in trainer.save(a.out, formats).items():
                print(f"saved {fmt}: {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
