"""mhc-convert on Megatron dev's own DeepSeek-V4-like MTP saves (``dsv4_mtp_{off,on}_bf16``:
pattern ``C-W-/C-``, one MTP depth; fixtures/megatron/make.py). What the generic fixture tests
(test_megatron_fixtures.py: keys/shapes/dtypes against Megatron's own mHC-on save, round trip
bitwise, verify) do not say about MTP: the plain enable is refused (the final norm Megatron's
mHC-on MTP skips is not uniform), the converted MTP part is there in Megatron's own spelling
(``e_proj``/``h_proj`` and their ``_extra_state``, per-depth ``hc_head_*``), inspect names the
MTP depths and the dialect, the main logits stay exact and the MTP logits move (measured, not
hidden). These fixtures carry no optimizer state (make.py saves with ``optimizer=None``):
optimizer carrying through an MTP reshape is covered on native checkpoints only.
"""

from __future__ import annotations

import json

import torch
from typer.testing import CliRunner

import mhc_convert
from mhc_convert import engine
from mhc_convert.adapters import detect
from mhc_convert.cli import app
from mhc_convert.parity import load_model
from mhc_model.toggle import codec as K
from tests.convert.test_megatron_fixtures import DEV, EXTERNAL, _info, _stored

OFF, ON = EXTERNAL / DEV / "dsv4_mtp_off_bf16", EXTERNAL / DEV / "dsv4_mtp_on_bf16"
runner = CliRunner()


def test_plain_enable_refused_exit_6_one_line(tmp_path):
    out = tmp_path / "on"
    result = runner.invoke(app, ["enable", str(OFF), str(out)])
    assert result.exit_code == 6, (result.stdout, result.stderr)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and str(OFF) in lines[0], lines
    assert "MTP logits change" in lines[0] and "--allow-lossy" in lines[0], lines
    assert "decoder.final_norm.weight" in lines[0] and not out.exists()


def test_enabled_mtp_part_is_megatrons(tmp_path):
    out = tmp_path / "on"
    report = mhc_convert.enable(OFF, out, allow_lossy=True)
    assert report.plan["reshaped"] == 2  # eh_proj.weight and its _extra_state, one depth
    want = {k: v for k, v in _stored(ON, _info(DEV, "dsv4_mtp_on_bf16")).items()
            if k.startswith("mtp.")}
    got = {k: v for k, v in _stored(out).items() if k.startswith("mtp.")}
    assert got == want
    for name in ("e_proj.weight", "h_proj.weight", "e_proj._extra_state/shard_0_1",
                 "h_proj._extra_state/shard_0_1", "hc_head_fn", "hc_head_base",
                 "hc_head_scale"):
        assert f"mtp.layers.0.{name}" in got, name
    assert not any(k.startswith("mtp.layers.1.") for k in got)
    assert any(k.startswith("mtp.layers.0.mtp_model_layer.layers.0.hyper_connection.")
               for k in got)


def test_inspect_names_mtp_depths_and_dialect():
    for path, layout in ((OFF, "mhc-off"), (ON, "mhc-on")):
        rep = engine.inspect(path)
        assert (rep.layout, rep.pattern, rep.mtp_depths, rep.dialect) == (
            layout, "C-W-/C-", 1, "dev")
        result = runner.invoke(app, ["inspect", str(path), "--json"])
        doc = json.loads(result.stdout)
        assert result.exit_code == 0 and doc["mtp_depths"] == 1 and doc["dialect"] == "dev"


def test_main_logits_exact_mtp_logits_measured(tmp_path):
    """fp32 on CPU: the main logits of the converted model equal the source's (within the
    project's 1e-5, here bf16 mHC parameters measured like the generic verify test); its MTP
    logits differ by what the non-uniform final norm does (reported as LOSSY), not zero."""
    out = tmp_path / "on"
    mhc_convert.enable(OFF, out, allow_lossy=True)
    ids = torch.randint(0, 63, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        (m_a, t_a), (m_b, t_b) = (load_model(p, dtype="fp32").forward_mtp(ids)
                                  for p in (OFF, out))
    assert len(t_a) == len(t_b) == 1
    assert (m_a - m_b).abs().max().item() <= 1e-5
    assert (t_a[0] - t_b[0]).abs().max().item() > 1e-3  # the documented loss, visible


def test_lone_mtp_extra_state_half_refused(tmp_path):
    """e_proj._extra_state without h_proj's: a disable could not build eh_proj's; refused by
    name (the plan's all-or-nothing rule for the MTP projection, bytes included)."""
    from mhc_model.errors import InvalidInputError
    from mhc_model.toggle.plan import make_plan

    adapter = detect(ON)
    view = adapter.read(ON)
    cfg = adapter.config(view)
    keys = {k: e.shape for k, e in view.entries.items()
            if k != "mtp.layers.0.h_proj._extra_state/shard_0_1"}
    try:
        make_plan(keys, cfg, "disable", cfg)
    except InvalidInputError as e:
        assert e.key == "mtp.layers.0.e_proj._extra_state/shard_0_1"
        assert "input projection" in e.message
    else:
        raise AssertionError("a lone e_proj._extra_state was accepted")
    assert K.mtp_proj_part("e_proj._extra_state/shard_0_1") == (
        "e_proj.weight", "._extra_state/shard_0_1")


def test_projection_block_in_module_order_per_depth():
    """Two depths: each depth's projection keys become one block where its first key stood,
    a linear's weight before its _extra_state; other keys keep their order."""
    order = ["mtp.layers.0.hnorm.weight", "mtp.layers.0.e_proj._extra_state",
             "mtp.layers.0.h_proj._extra_state", "mtp.layers.0.e_proj.weight",
             "mtp.layers.0.h_proj.weight", "mtp.layers.0.final_layernorm.weight",
             "mtp.layers.1.eh_proj._extra_state", "mtp.layers.1.eh_proj.weight"]
    assert K.mtp_proj_in_module_order(order) == [
        "mtp.layers.0.hnorm.weight", "mtp.layers.0.e_proj.weight",
        "mtp.layers.0.e_proj._extra_state", "mtp.layers.0.h_proj.weight",
        "mtp.layers.0.h_proj._extra_state", "mtp.layers.0.final_layernorm.weight",
        "mtp.layers.1.eh_proj.weight", "mtp.layers.1.eh_proj._extra_state"]
