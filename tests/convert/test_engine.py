"""End-to-end engine tests: ``disable(enable(x))`` is bitwise the identity, the enabled checkpoint
computes what the source computes, and optimizer state follows its parameters (DESIGN.md §4-§5;
the refusals are in ``test_engine_refusals.py``).

Native checkpoints are built from tiny models; the Megatron ``torch_dist`` checkpoint is the real
megatron-core 0.19.2 fixture, always copied into ``tmp_path`` first.
"""

from __future__ import annotations

import json

import pytest
import torch

import mhc_convert
from mhc_convert.formats.torch_dist import read_torch_dist
from mhc_convert.parity import load_model
from tests.convert.engine_helpers import (
    HC_NAMES,
    ITER,
    MHC_ARG_FLAGS,
    PARITY_TOL,
    assert_dist_views_equal,
    bits_equal,
    copy_fixture,
    leftovers,
    logits_diff,
    make_native,
    native_state,
    tree_sha,
    wrap,
)
from tests.model.helpers import tiny_config


@pytest.mark.parametrize("shard_bytes", [None, 20_000], ids=["single", "sharded"])
@pytest.mark.parametrize("pattern,n,contract", [("M-M*-M-", 4, "mean"),
                                                ("MEMEM*EME", 3, "learned")])
def test_native_roundtrip_bitwise(tmp_path, shard_bytes, pattern, n, contract):
    src = make_native(tmp_path / "src", pattern, shard_bytes=shard_bytes)
    if shard_bytes is not None:
        assert (src / "model.safetensors.index.json").exists()
        assert len(list(src.glob("model-*-of-*.safetensors"))) > 2
    before = tree_sha(src)
    on, back = tmp_path / "on", tmp_path / "back"
    rep = mhc_convert.enable(src, on, streams=n, contract=contract)
    assert rep.plan["added"] == 5 * tiny_config(pattern).num_layers + 3 * (contract == "learned")
    mhc_convert.disable(on, back)
    assert tree_sha(src) == before
    orig, mid, final = native_state(src), native_state(on), native_state(back)
    assert set(mid) >= {wrap(k) for k in orig}
    assert set(final) == set(orig)
    for k, v in orig.items():
        assert bits_equal(v, final[k]), k
        assert bits_equal(v, mid[wrap(k)]), k
    # same sharding: the output keeps every key in the shard it came from
    if shard_bytes is not None:
        wm = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
        wm2 = json.loads((back / "model.safetensors.index.json").read_text())["weight_map"]
        assert wm == wm2
    cfg_a = json.loads((src / "config.json").read_text())
    cfg_c = json.loads((back / "config.json").read_text())
    assert cfg_c["mhc"]["enable_hyper_connections"] is False
    if n == 4 and contract == "mean":  # the defaults: the config comes back exactly
        assert cfg_c == cfg_a
    else:
        assert {k: v for k, v in cfg_c.items() if k != "mhc"} == \
            {k: v for k, v in cfg_a.items() if k != "mhc"}
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("form", ["run", "iter"])
def test_torch_dist_roundtrip_bitwise(tmp_path, form):
    run = copy_fixture(tmp_path)
    src = run if form == "run" else run / ITER
    before = tree_sha(run)
    on, back = tmp_path / "on", tmp_path / "back"
    mhc_convert.enable(src, on)  # defaults: n = 4, the fixture's num_residual_streams
    mhc_convert.disable(on, back)
    assert tree_sha(run) == before
    assert_dist_views_equal(src, back)
    # the flags: flipped by enable, flipped back by disable, everything else untouched
    orig = vars(read_torch_dist(src).meta["common_state"]["args"])
    mid = vars(read_torch_dist(on).meta["common_state"]["args"])
    assert orig["enable_hyper_connections"] is False
    assert mid["enable_hyper_connections"] is True and mid["num_residual_streams"] == 4
    for k, v in orig.items():
        if k not in MHC_ARG_FLAGS:
            assert mid[k] == v, k
    if form == "run":  # the tracker sits beside iter_*/ and is reproduced byte for byte
        for d in (on, back):
            assert (d / "latest_checkpointed_iteration.txt").read_bytes() == \
                (run / "latest_checkpointed_iteration.txt").read_bytes()
            assert (d / ITER / ".metadata").is_file() and (d / ITER / "metadata.json").is_file()
    else:
        for d in (on, back):
            assert (d / ".metadata").is_file() and (d / "metadata.json").is_file()
            assert not (d / "latest_checkpointed_iteration.txt").exists()
    assert leftovers(tmp_path) == []


def test_torch_dist_flags_follow_streams(tmp_path):
    run = copy_fixture(tmp_path)
    mhc_convert.enable(run, tmp_path / "on", streams=2, contract="learned")
    args = read_torch_dist(tmp_path / "on").meta["common_state"]["args"]
    assert args.enable_hyper_connections is True and args.num_residual_streams == 2
    mhc_convert.disable(tmp_path / "on", tmp_path / "back")
    back = read_torch_dist(tmp_path / "back").meta["common_state"]["args"]
    assert back.enable_hyper_connections is False
    assert_dist_views_equal(run, tmp_path / "back", flags_changed=True)


# ------------------------------------------------------------------------------ forward parity
@pytest.mark.parametrize("pattern,n,contract,convention", [
    ("M-M*-M-", 4, "mean", "deepseek"),
    ("MEMEM*EME", 2, "learned", "deepseek"),
    ("GGG*GGG*", 3, "mean", "megatron_dsv4"),
    ("DEDE", 4, "learned", "megatron_dsv4"),
    ("*E+E", 6, "mean", "deepseek"),
])
def test_native_enable_parity(tmp_path, pattern, n, contract, convention):
    src = make_native(tmp_path / "src", pattern, seed=1)
    on = tmp_path / "on"
    mhc_convert.enable(src, on, streams=n, contract=contract, convention=convention)
    model = load_model(on)  # strict load into an mHC-on model
    cfg = model.config
    assert cfg.mhc_on and cfg.mhc.num_residual_streams == n
    assert (cfg.mhc.mhc_output_contract, cfg.mhc.mhc_convention) == (contract, convention)
    assert logits_diff(src, on) <= PARITY_TOL


def test_native_megatron_init_is_not_exact(tmp_path):
    """The check above can fail: Megatron's init (alpha = 0.01) moves the logits."""
    src = make_native(tmp_path / "src", "M-M*-M-", seed=1)
    rep = mhc_convert.enable(src, tmp_path / "on", init="megatron")
    assert any("approximately" in note for note in rep.notes)
    assert logits_diff(src, tmp_path / "on") > PARITY_TOL


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("contract", ["mean", "learned"])
def test_torch_dist_enable_parity(tmp_path, n, contract):
    run = copy_fixture(tmp_path)
    on = tmp_path / "on"
    mhc_convert.enable(run, on, streams=n, contract=contract)
    model = load_model(on)
    assert model.config.mhc_on and model.config.mhc.num_residual_streams == n
    assert model.config.mhc.mhc_output_contract == contract
    assert logits_diff(run, on) <= PARITY_TOL


# ---------------------------------------------------------------------------- optimizer state
@pytest.mark.parametrize("contract", ["mean", "learned"])
def test_torch_dist_optimizer_state(tmp_path, contract):
    run = copy_fixture(tmp_path)
    on = tmp_path / "on"
    n = 4
    mhc_convert.enable(run, on, streams=n, contract=contract)
    vs, vo = read_torch_dist(run), read_torch_dist(on)
    states = ("fp32_param", "exp_avg", "exp_avg_sq")
    carried = 0
    for key in vs.entries:
        if key.startswith("optimizer.state."):
            _, _, state, model_key = key.split(".", 3)
            assert state in states
            out_key = f"optimizer.state.{state}.{wrap(model_key)}"
            assert bits_equal(vs.load(key), vo.load(out_key)), key
            carried += 1
    assert carried > 100
    cfg = tiny_config("M*-M-")
    new_model_keys = [f"decoder.layers.{i}.hyper_connection.{name}"
                      for i in range(cfg.num_layers) for name in HC_NAMES]
    if contract == "learned":
        new_model_keys += ["decoder.hc_head_fn", "decoder.hc_head_base", "decoder.hc_head_scale"]
    new_opt = {k for k in vo.entries if k.startswith("optimizer.state.")} - \
        {f"optimizer.state.{k.split('.')[2]}.{wrap(k.split('.', 3)[3])}"
         for k in vs.entries if k.startswith("optimizer.state.")}
    assert new_opt == {f"optimizer.state.{s}.{k}" for s in states for k in new_model_keys}
    for k in new_model_keys:
        value = vo.load(k)
        assert value.dtype == torch.float32
        assert bits_equal(vo.load(f"optimizer.state.fp32_param.{k}"), value), k
        for s in ("exp_avg", "exp_avg_sq"):
            moment = vo.load(f"optimizer.state.{s}.{k}")
            assert moment.shape == value.shape and moment.dtype == torch.float32
            assert not moment.any(), (s, k)
    # the new parameters join the existing param group: the groups are unchanged
    assert vo.meta["common_state"]["optimizer"] == vs.meta["common_state"]["optimizer"]
