"""mhc_model.checkpoint under torchrun with a gloo process group (2 ranks): the checkpoint is
written once, loads back exactly in a single process, and toggles on in-process on every rank."""

import os
import subprocess
import sys

import torch

from mhc_model import HybridModel
from mhc_model import checkpoint as C
from tests.model.helpers import tiny_config
from tests.paths import ROOT

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]  # torchrun, wherever torch is


def test_save_and_load_under_torchrun_gloo(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([*TORCHRUN, "--standalone", "--nproc-per-node", "2",
                          str(ROOT / "tests" / "model" / "dist_worker.py"), str(out)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (out / "iter_0000007" / "metadata.json").exists()
    assert (out / "latest_checkpointed_iteration.txt").read_text() == "7"
    reference = torch.load(out / "reference.pt", weights_only=True)
    again = HybridModel(tiny_config("M*-E"))
    C.load_dist(out, again)
    for k, v in reference.items():
        assert torch.equal(again.state_dict()[k], v), k
