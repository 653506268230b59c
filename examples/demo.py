"""`make demo`: the main job on the shipped example, end to end, through the real CLI.

1. inspect the shipped mHC-off Nemotron-H-like checkpoint (fixtures/nemotron_h_tiny)
2. enable mHC (n = 4, learned output contract) at the exact point
3. verify forward parity between the two checkpoints (fp32, CPU)
4. disable again and check the round trip is bitwise
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "fixtures" / "nemotron_h_tiny"
OUT = ROOT / "demo-out"


def cli(*args: str) -> None:
    cmd = [sys.executable, "-m", "mhc_convert", *args]
    print("\n$ mhc-convert " + " ".join(args), flush=True)
    subprocess.run(cmd, check=True)


def main() -> None:
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir()
    on, back = OUT / "nemotron_h_tiny-mhc", OUT / "nemotron_h_tiny-back"
    cli("inspect", str(SRC))
    cli("enable", str(SRC), str(on), "--streams", "4", "--contract", "learned")
    cli("inspect", str(on), "--verify")
    cli("verify", str(SRC), str(on), "--dtype", "fp32", "--seq", "128")
    cli("disable", str(on), str(back))

    from mhc_convert.formats.native import read_native
    from mhc_convert.parity import model_state_from_view
    from mhc_model import HybridConfig

    a, b = read_native(SRC), read_native(back)
    cfg = HybridConfig.from_dict(a.meta["config_json"])
    sa, sb = model_state_from_view(a, cfg), model_state_from_view(b, cfg)
    def bits(t: torch.Tensor) -> bytes:  # torch.equal would call -0 == +0 and NaN != NaN
        return str(t.dtype).encode() + t.contiguous().view(torch.uint8).numpy().tobytes()

    same_config = (SRC / "config.json").read_bytes() == (back / "config.json").read_bytes()
    same = sa.keys() == sb.keys() and all(bits(sa[k]) == bits(sb[k]) for k in sa) and same_config
    print(f"\nround trip disable(enable(x)) bitwise identical: {same} ({len(sa)} tensors, "
          f"config.json bytes {'equal' if same_config else 'DIFFER'})")
    if not same:
        raise SystemExit(1)
    print(f"outputs in {OUT}")


if __name__ == "__main__":
    main()
