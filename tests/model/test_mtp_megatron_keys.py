"""Keys, shapes and dtypes of our MTP models against Megatron-LM's OWN ``HybridModel`` with MTP,
mHC off and on, built on CPU by ``fixtures/megatron/keys.py`` (Megatron's args parsing and its
local hybrid spec, as ``make.py``; ``MHC_MEGATRON_PYTHON`` names the interpreter with Megatron's
deps, default this one) from the tree the environment names (``tests/megatron_env.py``; a branch
without a tree is skipped). Our model is built from Megatron's parsed args
(``config_from_megatron_args``); Megatron's module keys are read in our spelling
(``codec.canonical_key``: its local names such as ``input_layernorm.weight`` and SequentialMLP
experts); its ``_extra_state`` entries (local linears' empty extra state) are listed apart and
must each belong to a module we have.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys

import pytest

from mhc_model.megatron_args import config_from_megatron_args
from mhc_model.model import meta_model
from mhc_model.toggle import codec as K
from tests.megatron_env import megatron_tree
from tests.paths import ROOT

sys.path.insert(0, str(ROOT / "fixtures" / "megatron"))
import make  # noqa: E402  (the fixture script's command-line table)

# dsv4's local (non-TE) hybrid spec has no mtp_block_spec (its HybridModel asserts on it): not
# run until one is composed from dsv4's own MTP spec helpers, as mlm_runtime does for mHC on dev
CASES = [("dev", "M*-E/*-/*-"), ("dev", "*-/-")]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _megatron_keys(tmp_path, branch, pattern, mhc):
    tree = megatron_tree(branch)
    argv = make.BASE_ARGS + make.GQA_ARGS + ["--hybrid-layer-pattern", pattern]
    argv += make.MOE_ARGS if "E" in pattern else []
    argv += make.MHC_ARGS if mhc else []
    out = tmp_path / f"{branch}-{mhc}.json"
    env = dict(os.environ, PYTHONPATH=str(tree), WORLD_SIZE="1", RANK="0", LOCAL_RANK="0",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_port()), CUDA_VISIBLE_DEVICES="",
               PYTHONWARNINGS="ignore")
    python = os.environ.get("MHC_MEGATRON_PYTHON", sys.executable)
    r = subprocess.run([python, str(ROOT / "fixtures" / "megatron" / "keys.py"), branch, str(out),
                        "--", *argv], env=env, cwd=tmp_path, capture_output=True, text=True,
                       timeout=600)
    if r.returncode:
        pytest.fail(f"Megatron {branch} failed to build {pattern}:\n{r.stdout[-2000:]}"
                    f"{r.stderr[-2000:]}", pytrace=False)
    return json.loads(out.read_text())


@pytest.mark.parametrize("mhc", [False, True], ids=["off", "on"])
@pytest.mark.parametrize(("branch", "pattern"), CASES, ids=[f"{b}-{p}" for b, p in CASES])
def test_keys_shapes_dtypes_equal_megatron(tmp_path, branch, pattern, mhc):
    theirs = _megatron_keys(tmp_path, branch, pattern, mhc)
    args = argparse.Namespace(**theirs["args"])
    cfg = config_from_megatron_args(args)  # dev with mHC on: the learned heads, from args alone
    assert cfg.mhc.mhc_output_contract == ("learned" if mhc else "mean")
    assert cfg.mtp_num_depths == theirs["mtp_num_layers"] > 0 and cfg.mhc_on == mhc
    ours = {k: [list(v.shape), str(v.dtype).replace("torch.", "")]
            for k, v in meta_model(cfg).state_dict().items()}
    want = {K.canonical_key(cfg, k): v for k, v in theirs["keys"].items()}
    assert len(want) == len(theirs["keys"])
    assert sorted(set(ours) ^ set(want)) == []
    assert {k: v for k, v in ours.items() if v != want[k]} == {}
    assert any(k.startswith("mtp.layers.1." if "/" in pattern[pattern.index("/") + 1:]
                            else "mtp.layers.0.") for k in ours)
    modules = {K.canonical_key(cfg, K.extra_state_module(k) + ".weight").rsplit(".", 1)[0]
               for k in theirs["other"]}
    assert all(any(k.startswith(m + ".") for k in ours) for m in modules), modules
