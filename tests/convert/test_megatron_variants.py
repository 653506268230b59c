"""Checkpoint variants real Megatron runs write that used to get wrong reasons or silent
defaults (research/megatron-interop.md §3): pre-0.16 pattern args, plain DCP (torch_dcp),
EP > 1 legacy directories."""

from __future__ import annotations

import shutil
from argparse import Namespace
from pathlib import Path

import pytest

from fixtures.legacy_writer import write_single_rank_run
from mhc_convert import engine
from mhc_convert.errors import InvalidInputError
from mhc_model.megatron_args import config_from_megatron_args, megatron_args
from mhc_model.model import HybridModel
from tests.convert.test_legacy_engine import _args
from tests.model.helpers import tiny_config
from tests.paths import MEGATRON_FIXTURE

CFG = tiny_config("M-M*-")


def test_pre_016_args_record_the_pattern_as_hybrid_override_pattern():
    args = megatron_args(CFG)
    old = Namespace(**{k: v for k, v in vars(args).items() if k != "hybrid_layer_pattern"},
                    hybrid_override_pattern=CFG.hybrid_layer_pattern)
    assert config_from_megatron_args(old).hybrid_layer_pattern == CFG.hybrid_layer_pattern
    both = Namespace(**vars(args), hybrid_override_pattern="M-")  # Megatron: the new one wins
    assert config_from_megatron_args(both) == config_from_megatron_args(args)


def test_args_without_any_pattern_are_refused_not_defaulted():
    args = megatron_args(CFG)
    del args.hybrid_layer_pattern
    with pytest.raises(ValueError, match="no hybrid_layer_pattern"):
        config_from_megatron_args(args)


def _legacy_run(root: Path, args: dict) -> Path:
    return write_single_rank_run(root, HybridModel(CFG).state_dict(), args)


def test_legacy_run_without_pattern_exits_3_naming_args(tmp_path):
    args = _args(CFG)
    del args["hybrid_layer_pattern"]
    run = _legacy_run(tmp_path, {**args, "hybrid_override_pattern": None})
    with pytest.raises(InvalidInputError, match="no hybrid_layer_pattern") as e:
        engine.enable(run, tmp_path / "out")
    assert e.value.exit_code == 3 and "model_optim_rng.pt" in str(e.value)
    assert not (tmp_path / "out").exists()


def test_expert_parallel_legacy_dirs_get_the_expert_reason(tmp_path):
    """mp_rank_TT_EEE with PP = 1: the second number is the expert rank, so the refusal must
    be about EP, not a pipeline-size mismatch."""
    run = _legacy_run(tmp_path, {**_args(CFG), "expert_model_parallel_size": 2})
    it = run / "iter_0000100"
    for ep in (0, 1):
        shutil.copytree(it / "mp_rank_00", it / f"mp_rank_00_{ep:03d}")
    shutil.rmtree(it / "mp_rank_00")
    with pytest.raises(InvalidInputError, match=r"expert-parallel legacy checkpoints \(EP > 1\)"):
        engine.enable(run, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_plain_dcp_without_marker_is_named_torch_dcp(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(MEGATRON_FIXTURE, run)
    (run / "iter_0001000" / "metadata.json").unlink()
    with pytest.raises(InvalidInputError, match="torch_dcp") as e:
        engine.enable(run, tmp_path / "out")
    assert "metadata.json" in str(e.value) and e.value.exit_code == 3


@pytest.mark.parametrize("command", ["enable", "verify"])
def test_unallocatable_config_exits_3_naming_the_field(tmp_path, command):
    """Sizes torch cannot even describe on the meta device: one line naming the field."""
    import json

    from typer.testing import CliRunner

    from mhc_convert.cli import app
    from tests.paths import NEMOTRON_H_TINY

    src = tmp_path / "src"
    shutil.copytree(NEMOTRON_H_TINY, src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["hidden_size"] = 2**31
    (src / "config.json").write_text(json.dumps(cfg))
    args = [command, str(src), str(tmp_path / "out")] if command == "enable" else \
        [command, str(src), str(src)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 3, res.output
    assert "hidden_size=2147483648" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("streams,contract", [(4, "learned"), (2, "mean")])
def test_native_disable_enable_restores_config_bytes(tmp_path, streams, contract):
    from tests.paths import NEMOTRON_H_TINY

    on, back = tmp_path / "on", tmp_path / "back"
    engine.enable(NEMOTRON_H_TINY, on, streams=streams, contract=contract)
    report = engine.disable(on, back)
    assert (back / "config.json").read_bytes() == (NEMOTRON_H_TINY / "config.json").read_bytes()
    assert any("back to their defaults" in n for n in report.notes)


def test_disable_clears_megatron_flags_that_need_mhc():
    from mhc_convert.adapters.megatron_args import flip_args

    on = CFG.with_mhc(enable_hyper_connections=True, mhc_recompute_layer_num=2)
    args = megatron_args(on, use_fused_mhc=True, recompute_modules=["core_attn", "mhc"])
    off = flip_args(args, CFG)
    assert off.enable_hyper_connections is False and off.use_fused_mhc is False
    assert off.recompute_modules == ["core_attn"] and off.mhc_recompute_layer_num is None
    assert args.recompute_modules == ["core_attn", "mhc"]  # the source's args are untouched
    plain = megatron_args(CFG, recompute_modules=["core_attn"])
    assert flip_args(plain, CFG).recompute_modules is plain.recompute_modules
