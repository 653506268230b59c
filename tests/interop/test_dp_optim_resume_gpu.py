"""Megatron resumes a dp_reshardable checkpoint that ``mhc_convert.enable`` turned mHC-on.

The source is Megatron's own ``optim_fp32_buckets_dp`` (``fixtures/megatron/make_optim.py``: its
DDP + distributed optimizer, fp32, three buckets, 3 Adam steps, mHC off, saved
``dp_reshardable``). ``enable`` carries the bucket-space state in model space
(``formats.dp_optim``) and writes ``fully_reshardable``. ``make_optim.py --resume`` then runs
Megatron's ``setup_model_and_optimizer`` with ``--enable-hyper-connections`` and ``--load`` of
the result (Megatron's own loader and optimizer), computes the loss of the next batch, dumps the
optimizer state it loaded and takes one training step. Must hold:

* the loss equals the mHC-off run's loss of the same batch (``optim_status.json``), fp32,
  within 1e-5;
* every carried tensor Megatron's optimizer holds (fp32 main copy, exp_avg, exp_avg_sq) is
  bitwise the source's bucket state (not compared through a Megatron ``fully_reshardable``
  re-save: with several buckets that save is shifted, an upstream bug, see
  ``tests/convert/test_dp_optim.py``); the new mHC parameters' moments are zero;
* the first step succeeds.

Needs a GPU (Megatron's optimizer allocates on CUDA) and a Megatron ``dev`` tree
(``tests/megatron_env.py``); ``MHC_OPTIM_FIXTURES`` may point at freshly made fixtures.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mhc_convert
from mhc_convert.adapters.torch_dist import TorchDistAdapter
from mhc_model.toggle import codec as K
from tests.megatron_env import megatron_tree
from tests.paths import ROOT

pytestmark = pytest.mark.gpu
FIXTURES = Path(os.environ.get("MHC_OPTIM_FIXTURES",
                               ROOT / "fixtures" / "external" / "megatron-dev-d48bd6be"))
MAKE = ROOT / "fixtures" / "megatron" / "make_optim.py"
CASE = "fp32_buckets"


def test_megatron_resumes_converted_dp_reshardable(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("Megatron's distributed optimizer needs CUDA")
    tree = megatron_tree("dev")
    src = FIXTURES / f"optim_{CASE}_dp"
    out = tmp_path / "on"
    report = mhc_convert.enable(src, out)
    assert "carried" in report.optimizer, report.optimizer
    result = tmp_path / "resume.json"
    env = dict(os.environ, TRITON_F32_DEFAULT="ieee", MAMBA_DETERMINISTIC="1",
               PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [
                   os.environ.get("PYTHONPATH")] if p]))
    p = subprocess.run([os.environ.get("MHC_MEGATRON_PYTHON", sys.executable), str(MAKE),
                        "--src", str(tree), "--resume", str(out), "--case", CASE,
                        "--json", str(result)], env=env, capture_output=True, text=True,
                       timeout=900)
    assert p.returncode == 0, (p.stdout[-3000:] + p.stderr[-3000:])
    res = json.loads(result.read_text())
    want = json.loads((FIXTURES / "optim_status.json").read_text())[CASE]
    line = {"test": "dp_optim_resume", "iteration": res["iteration"],
            "next_loss_off": want["next_loss"], "loss_on_resumed": res["next_loss"],
            "abs_diff": abs(res["next_loss"] - want["next_loss"]),
            "first_step_loss": res.get("first_step_loss"), "device": res.get("device")}
    if os.environ.get("MHC_DPOPT_REPORT"):
        with open(os.environ["MHC_DPOPT_REPORT"], "a") as f:
            f.write(json.dumps(line) + "\n")
    assert res["iteration"] == want["steps"]
    assert abs(res["next_loss"] - want["next_loss"]) <= 1e-5, line
    assert res["first_step_ok"]

    # what Megatron's optimizer holds after its load, per sharded model key (fp32 main copy,
    # exp_avg, exp_avg_sq) against our unpacking of the source's buckets
    loaded = torch.load(res["state"], weights_only=True)
    source = TorchDistAdapter().read(src)
    carried = 0
    for name, parts, _ in source.meta["dp_unpacked"].params:
        got = loaded.pop(K.wrap(name))
        for state, t in got.items():
            want = torch.cat([source.load(f"optimizer.state.{state}.{p}").reshape(-1)
                              for p in parts])
            assert torch.equal(t.reshape(-1), want), (name, state)
            carried += 1
    assert carried == 3 * len(source.meta["dp_unpacked"].params)
    assert loaded and all(K.is_mhc_param(k) for k in loaded), sorted(loaded)
    for k, got in loaded.items():  # the new mHC parameters: fresh moments
        assert not got["exp_avg"].any() and not got["exp_avg_sq"].any(), k
