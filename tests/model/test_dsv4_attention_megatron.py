"""Our DeepSeek-V4 attention layers (`C`, `H`, `W`) against Megatron-LM dev's OWN modules.

Megatron is the oracle: ``fixtures/megatron/dsv4_layers.py`` (a subprocess; interpreter
``MHC_MEGATRON_PYTHON``, default this one; tree ``MHC_MEGATRON_SRC_DEV``, skipped when absent)
builds Megatron's real ``HybridModel`` with dev's ``DSv4HybridSelfAttention`` /
``CompressedSparseAttention`` / ``Compressor`` / ``CSAIndexer`` in a local spec, records its
state-dict keys, shapes and dtypes, and runs each C/H/W layer's branch on random inputs
(S = 270, B = 2: 67 compressed entries for C, 2 for H, a tail of S mod r tokens the compressors
skip; weights ~ N(0, 1/fan_in) so the outputs are O(1); a random attention sink).

- keys/shapes/dtypes: our mHC-off and mHC-on ``HybridModel`` for ``C-H-W-E`` and ``CEHE`` (fp32
  and a bf16 run) hold exactly Megatron's keys (its local-spec spellings resolved by our codec:
  ``pre_mlp_layernorm``, SequentialMLP experts), with the same shapes and dtypes (attn_sink and
  the compressors' ape stay fp32 in a bf16 run, as Megatron keeps them).
- forward: each layer with Megatron's weights on Megatron's input equals Megatron's output within
  1e-5 max-abs (fp32), on CPU here and on the GPU in the ``gpu`` test (the same worker on CUDA,
  TF32 off). The config comes from Megatron's parsed args through ``mhc_model.megatron_args``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest
import torch

from mhc_model.layers import build_layer
from mhc_model.megatron_args import config_from_megatron_args
from mhc_model.model import HybridModel
from mhc_model.toggle import codec as K
from tests.megatron_env import megatron_tree
from tests.paths import ROOT

WORKER = ROOT / "fixtures" / "megatron" / "dsv4_layers.py"
TOL = 1e-5
SEQ = 270
CASES = [
    {"id": "chwe_off", "pattern": "C-H-W-E", "mhc": False, "seq": SEQ},
    {"id": "chwe_on", "pattern": "C-H-W-E", "mhc": True},
    {"id": "cehe_off", "pattern": "CEHE", "mhc": False},
    {"id": "cehe_on", "pattern": "CEHE", "mhc": True},
    {"id": "chwe_on_bf16", "pattern": "C-H-W-E", "mhc": True, "dtype": "bf16"},
    # csa_dense_mode (C attends every causal compressed entry: no indexer) and no qk layernorm
    {"id": "chw_dense_noqkn_off", "pattern": "CHW", "mhc": False, "seq": SEQ,
     "extra": ["--csa-dense-mode"], "qk_layernorm": False},
]


def run_oracle(device: str, cases: list[dict], tmp) -> dict:
    tree = megatron_tree("dev")
    job, out = tmp / "job.json", tmp / "out.pt"
    job.write_text(json.dumps({"device": device, "cases": cases}))
    path = os.pathsep.join(p for p in (str(tree), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, PYTHONPATH=path, PYTHONWARNINGS="ignore")
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run([os.environ.get("MHC_MEGATRON_PYTHON", sys.executable), str(WORKER),
                           str(job), str(out)], env=env, capture_output=True, text=True,
                          timeout=600)
    if proc.returncode or not out.exists():  # a given tree that does not run is a failure
        pytest.fail(f"Megatron worker failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    results = torch.load(out, weights_only=False)
    errors = {k: v["error"] for k, v in results.items() if k != "_meta" and v["error"]}
    assert not errors, errors
    return results


def our_config(case: dict):
    args = dict(case["args"])
    args["params_dtype"] = args["params_dtype"].replace("torch.", "")
    return config_from_megatron_args(argparse.Namespace(**args))


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    return run_oracle("cpu", CASES, tmp_path_factory.mktemp("dsv4"))


def megatron_as_ours(case: dict, cfg) -> dict[str, list]:
    """Megatron's tensor keys resolved to our model keys (aliases, SequentialMLP experts)."""
    keys = {k: v for k, v in case["keys"].items() if v[0] is not None}
    sources = K.model_sources(keys, cfg)
    out = {}
    for ours, src in sources.items():
        assert len(src.parts) == 1 and src.index is None, (ours, src)
        out[ours] = keys[src.parts[0]]
    return out


@pytest.mark.parametrize("cid", [c["id"] for c in CASES])
def test_keys_shapes_dtypes_equal_megatron(oracle, cid):
    case = oracle[cid]
    cfg = our_config(case)
    spec = next(c for c in CASES if c["id"] == cid)
    assert cfg.hybrid_layer_pattern == spec["pattern"] and cfg.mhc_on == spec["mhc"]
    if cfg.mhc_on:  # Megatron dev always builds the learned head (DESIGN.md §1)
        cfg = cfg.with_mhc(mhc_output_contract="learned", mhc_convention="megatron_dev")
    with torch.device("meta"):
        ours = {k: [list(v.shape), str(v.dtype).replace("torch.", "")]
                for k, v in HybridModel(cfg).state_dict().items()}
    theirs = megatron_as_ours(case, cfg)
    assert sorted(ours) == sorted(theirs)
    diff = {k: (ours[k], theirs[k]) for k in ours if ours[k] != theirs[k]}
    assert not diff, diff
    extra_state = [k for k, v in case["keys"].items() if v[0] is None]
    assert all(K.is_extra_state(k) for k in extra_state), extra_state
    # the DSv4 layers are all there: a sink per layer, an ape per compressor (C: its own and
    # its indexer's unless in dense mode; H: one), fp32 whatever the params dtype
    pattern, indexer = spec["pattern"], "--csa-dense-mode" not in spec.get("extra", ())
    fp32 = [k for k in ours if k.endswith(("attn_sink", "compressor.ape"))]
    n_sink = sum(pattern.count(s) for s in "CHW")
    assert len(fp32) == n_sink + pattern.count("C") * (1 + indexer) + pattern.count("H")
    assert any(".indexer." in k for k in ours) == (indexer and "C" in pattern)
    assert any("q_layernorm" in k for k in ours) == (spec.get("qk_layernorm") is not False)
    assert all(ours[k][1] == "float32" for k in fp32)


def check_layers(case: dict, device: str) -> dict[str, float]:
    cfg = our_config(case)
    errors = {}
    for i, layer in case["layers"].items():
        ours = build_layer(layer["symbol"], cfg)
        ours.load_state_dict(layer["state"], strict=True)
        ours = ours.to(device)
        with torch.no_grad():
            y = ours(layer["u"].to(device)).float().cpu()
        err = (y - layer["y"]).abs().max().item()
        errors[f"{i}{layer['symbol']}"] = err
        print(f"layer {i} ({layer['symbol']}): max-abs {err:.3e} (|y| max "
              f"{layer['y'].abs().max().item():.3f}, {device})")
        assert layer["y"].abs().max() > 0.1  # an O(1) output: the bound means something
    assert sorted(k[-1] for k in errors) == ["C", "H", "W"]
    return errors


@pytest.mark.parametrize("cid", ["chwe_off", "chw_dense_noqkn_off"])
def test_layer_forward_equals_megatron_cpu(oracle, cid):
    errors = check_layers(oracle[cid], "cpu")
    assert max(errors.values()) <= TOL, errors


@pytest.mark.gpu
def test_layer_forward_equals_megatron_gpu(tmp_path):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    results = run_oracle("cuda", [CASES[0]], tmp_path)
    errors = check_layers(results["chwe_off"], "cuda")
    report = os.environ.get("MHC_DSV4_PARITY_REPORT")
    if report:
        with open(report, "a") as f:
            f.write(json.dumps({"test": "dsv4_layer_forward", "device": results["_meta"],
                                "max_abs": errors, "tol": TOL}) + "\n")
    assert max(errors.values()) <= TOL, errors
