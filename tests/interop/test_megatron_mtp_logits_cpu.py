"""The MTP part of tests/interop/test_megatron_logits_gpu.py on CPU (not marked gpu): Megatron
dev's own HybridModel with MTP, run by fixtures/megatron/logits.py in its CPU debugging mode,
against ours on the same weights: main and per-depth MTP logits, fp32, max-abs <= 1e-5, on the
mHC-off source ``dsv4_mtp_off_bf16``, Megatron's own mHC-on save ``dsv4_mtp_on_bf16`` and our
enabled output of the source (``allow_lossy``: its MTP logits are not the source's, but must
be Megatron's on the same weights); Megatron's mHC-on main logits on our enabled output equal
its mHC-off ones on the source. This runs the GPU test's argument building, Megatron's loading
of our output and the MTP logit extraction before a GPU sees them. Needs
``MHC_MEGATRON_SRC_DEV`` (``tests/megatron_env.py``; skipped without) and Megatron's CPU deps in
``MHC_MEGATRON_PYTHON`` (default this interpreter). Measured (CPU, torch 2.13): 9e-8 on all.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import mhc_convert
from mhc_convert.parity import load_model
from tests.interop.test_megatron_logits_gpu import (
    BRANCH_DIRS,
    TOL,
    WORKER,
    _free_port,
    _max_abs,
    _tokens,
)
from tests.megatron_env import megatron_tree

D = BRANCH_DIRS["dev"]
OFF, ON = D / "dsv4_mtp_off_bf16", D / "dsv4_mtp_on_bf16"


@pytest.fixture(scope="module")
def megatron(tmp_path_factory):
    tree = megatron_tree("dev")
    work = tmp_path_factory.mktemp("mtp-logits-cpu")
    enabled = work / "enabled"
    mhc_convert.enable(OFF, enabled, allow_lossy=True)
    cases = [dict(id="on", fixture=str(ON), load=str(ON), dtype="fp32", mhc=True),
             dict(id="off", fixture=str(OFF), load=str(OFF), dtype="fp32", mhc=False),
             dict(id="enabled", fixture=str(OFF), load=str(enabled), dtype="fp32", mhc=True)]
    job, out = work / "job.json", work / "out.pt"
    job.write_text(json.dumps(dict(branch="dev", device="cpu", compile=False,
                                   tokens=_tokens().tolist(), cases=cases)))
    env = dict(os.environ, WORLD_SIZE="1", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(_free_port()), CUDA_VISIBLE_DEVICES="", PYTHONWARNINGS="ignore",
               PYTHONPATH=str(tree))
    python = os.environ.get("MHC_MEGATRON_PYTHON", sys.executable)
    r = subprocess.run([python, str(WORKER), str(job), str(out)], env=env, cwd=work,
                       capture_output=True, text=True, timeout=900)
    if r.returncode or not out.exists():
        pytest.fail(f"Megatron worker failed (rc {r.returncode}):\n{r.stdout[-3000:]}"
                    f"{r.stderr[-3000:]}", pytrace=False)
    res = torch.load(out, weights_only=False)
    for c in cases:
        if res[c["id"]]["error"]:
            pytest.fail(f"Megatron failed on {c['id']}: {res[c['id']]['error']}\n"
                        f"{res[c['id']].get('traceback', '')[-3000:]}", pytrace=False)
    return res, {"on": ON, "off": OFF, "enabled": enabled}


@pytest.mark.parametrize("case", ["off", "on", "enabled"])
def test_main_and_mtp_logits_equal_megatrons(megatron, case):
    res, paths = megatron
    ours = load_model(paths[case], dtype="fp32")
    with torch.no_grad():
        main, mtp = ours.forward_mtp(_tokens())
    want = res[case]
    assert len(mtp) == len(want["mtp_logits"]) == 1
    assert _max_abs(main, want["logits"]) <= TOL
    assert _max_abs(mtp[0], want["mtp_logits"][0]) <= TOL


def test_megatron_mhc_on_main_logits_on_enabled_equal_its_off(megatron):
    res, _ = megatron
    assert _max_abs(res["enabled"]["logits"], res["off"]["logits"]) <= TOL
    # the documented MTP loss of the lossy enable: visible in Megatron's own numbers too
    assert _max_abs(res["enabled"]["mtp_logits"][0], res["off"]["mtp_logits"][0]) > 1e-3
