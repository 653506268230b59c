"""Targets (``mhc_model.targets``): the branch a Megatron run's args prove, what each target
writes (convention, contract, head eps, mHC parameter dtype), and what it refuses."""

from __future__ import annotations

from argparse import Namespace
from pathlib import Path

import pytest
import torch

from fixtures.legacy_writer import write_single_rank_run
from mhc_convert import engine
from mhc_convert.errors import InvalidInputError, UsageError
from mhc_convert.formats.torch_legacy import safe_load_rank
from mhc_convert.parity import compare_checkpoints
from mhc_model.model import HybridModel
from mhc_model.targets import TARGETS, target_of_args
from tests.convert.test_legacy_engine import _args
from tests.model.helpers import perturb_norms_, tiny_config

RANK = "iter_0000100/mp_rank_00/model_optim_rng.pt"
DEV = {"dsa_indexer_rope_interleaved": False}  # a field only dev's args carry
DSV4 = {"csa_compress_ratio_for_c": 4}  # a field only dsv4's args carry


def test_target_of_args():
    assert target_of_args(Namespace(**DEV)).name == "megatron-dev"
    assert target_of_args(Namespace(**DSV4)).name == "megatron-dsv4"
    assert target_of_args(Namespace(hidden_size=8)).name == "native"
    with pytest.raises(ValueError, match="several branches"):
        target_of_args(Namespace(**DEV, **DSV4))
    assert {t.name: t.convention for t in TARGETS.values()} == {
        "native": "deepseek", "megatron-dev": "megatron_dev", "megatron-dsv4": "megatron_dsv4"}


def _run(root: Path, markers: dict, dtype: str = "float32") -> Path:
    cfg = tiny_config("M-M*-", dtype=dtype)
    torch.manual_seed(0)
    model = HybridModel(cfg)
    perturb_norms_(model, 0)
    args = {**_args(cfg), **markers, "params_dtype": getattr(torch, dtype),
            "bf16": dtype == "bfloat16", "layernorm_epsilon": 1e-5}
    return write_single_rank_run(root, model.state_dict(), args)


def test_dev_args_give_the_dev_target_learned_head_with_layernorm_eps(tmp_path):
    run = _run(tmp_path, DEV)
    report = engine.enable(run, tmp_path / "on")
    assert report.config["mhc_convention"] == "megatron_dev"
    assert report.config["mhc_output_contract"] == "learned"
    assert any("target megatron-dev" in n for n in report.notes)
    out = safe_load_rank(tmp_path / "on" / RANK)
    assert out["mhc"] == {"mhc_convention": "megatron_dev", "mhc_output_contract": "learned"}
    assert not hasattr(out["args"], "mhc_convention")
    n = 4
    base = out["model"]["decoder.hc_head_base"]  # logit(1/n - eps) with Megatron's eps 1e-5
    assert torch.allclose(torch.sigmoid(base.double()) + 1e-5, torch.full((n,), 1 / n,
                          dtype=torch.float64), atol=1e-7, rtol=0)  # fp32 logit rounding
    assert out["model"]["decoder.layers.0.hyper_connection.bias"].dtype == torch.float32
    parity = compare_checkpoints(run, tmp_path / "on", dtype="fp32")
    assert parity["max_abs"] <= 1e-5, parity


def test_dsv4_keeps_mhc_parameters_in_the_params_dtype(tmp_path):
    run = _run(tmp_path, DSV4, dtype="bfloat16")
    report = engine.enable(run, tmp_path / "on")
    assert report.config["mhc_convention"] == "megatron_dsv4"
    assert any("stored in bfloat16" in n for n in report.notes), report.notes
    model = safe_load_rank(tmp_path / "on" / RANK)["model"]
    hc = [k for k in model if ".hyper_connection." in k or k.startswith("decoder.hc_head_")]
    assert hc and all(model[k].dtype == torch.bfloat16 for k in hc)
    parity = compare_checkpoints(run, tmp_path / "on", dtype="bf16")
    assert parity["top1_agreement"] >= 0.99, parity  # bf16: measured, reported in the note


@pytest.mark.parametrize("extra,match", [
    ({"contract": "mean"}, "always builds decoder.hc_head_"),
    ({"convention": "deepseek"}, "computes the megatron_dev convention"),
    ({"target": "megatron-xl"}, "--target must be one of"),
])
def test_megatron_target_refusals(tmp_path, extra, match):
    run = _run(tmp_path, DEV)
    with pytest.raises(UsageError, match=match) as e:
        engine.enable(run, tmp_path / "on", **extra)
    assert e.value.exit_code == 2 and not (tmp_path / "on").exists()


def test_explicit_target_native_allows_any_convention(tmp_path):
    run = _run(tmp_path, DEV)
    report = engine.enable(run, tmp_path / "on", target="native", convention="megatron_dsv4",
                           contract="mean")
    assert report.config["mhc_convention"] == "megatron_dsv4"
    assert not any(n.startswith("target ") for n in report.notes)
    back = engine.disable(tmp_path / "on", tmp_path / "back")
    assert "mhc" not in safe_load_rank(tmp_path / "back" / RANK)
    assert back.plan["dropped"] > 0


def test_args_of_two_branches_are_invalid_input(tmp_path):
    run = _run(tmp_path, {**DEV, **DSV4})
    with pytest.raises(InvalidInputError, match="several branches"):
        engine.enable(run, tmp_path / "on")
