"""Megatron torch_dist checkpoints written and read by the model (mhc_model.checkpoint), checked
against the real megatron-core 0.19.2 checkpoint in shared/fixtures-external."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import mhc_convert
from mhc_convert.formats.torch_dist import read_torch_dist
from mhc_model import HybridModel
from mhc_model import checkpoint as C
from mhc_model.shim import ToggleError
from mhc_model.toggle.codec import split_table
from tests.model.helpers import tiny_config, tokens
from tests.paths import MEGATRON_FIXTURE

FIXTURE = MEGATRON_FIXTURE  # shipped in the repository: never skipped


def _stored(iter_dir: Path) -> dict[str, object]:
    """key -> global shape, or "bytes". (dtypes differ in one place: megatron-core keeps Mamba's
    A_log/D/dt_bias in fp32 in a bf16 model, ours follows params_dtype.)"""
    md = C.SafeFileSystemReader(str(iter_dir)).read_metadata()
    return {k: list(v.size) if hasattr(v, "size") else "bytes"
            for k, v in md.state_dict_metadata.items()}


def _merged_by_hand(cfg) -> dict[str, torch.Tensor]:
    """The fixture's model tensors with the factory splits concatenated in Megatron's order."""
    view = read_torch_dist(FIXTURE)
    out: dict[str, torch.Tensor] = {}
    for i, sym in enumerate(cfg.layer_symbols):
        for base, parts in split_table(cfg, sym).items():
            key = f"decoder.layers.{i}.{base}"
            if f"{key}.{parts[0][0]}" in view.entries:
                out[key] = torch.cat([view.load(f"{key}.{p}") for p, _ in parts])
    for k, e in view.entries.items():
        if e.kind == "tensor" and not k.startswith("optimizer.") and not any(
                k.startswith(b + ".") for b in out):
            out[k] = view.load(k)
    return out


def test_written_keys_equal_the_fixture(tmp_path):
    cfg = C.dist_config(FIXTURE)
    model = HybridModel(cfg)
    opt = torch.optim.AdamW(model.parameters())
    model(tokens(vocab=cfg.vocab_size)).float().mean().backward()
    opt.step()
    iter_dir = C.save_dist(tmp_path, model, opt, iteration=7)
    ours = _stored(iter_dir)
    theirs = _stored(FIXTURE / "iter_0001000")
    drop = ("_extra_state",)  # Transformer-Engine blobs: nothing of ours to put in them
    tensors = {k: v for k, v in theirs.items() if v != "bytes"}
    assert {k: v for k, v in ours.items() if v != "bytes"} == tensors  # keys and shapes
    assert {k for k, v in ours.items() if v == "bytes"} == {
        k for k, v in theirs.items() if v == "bytes" and not any(d in k for d in drop)}
    keys = json.loads((FIXTURE / "keys.json").read_text())["keys"]
    assert set(tensors) == {k for k, v in keys.items() if v != "bytes"}
    assert sorted(p.name for p in iter_dir.iterdir()) == [".metadata", "__0_0.distcp",
                                                          "metadata.json"]
    assert (tmp_path / C.TRACKER).read_text() == "7"
    common = C.read_common(tmp_path)
    assert common["iteration"] == 7 and common["args"].hybrid_layer_pattern == "M*-M-"
    assert C.config_from_common(common) == cfg
    # the converter's own reader accepts what we wrote
    assert read_torch_dist(tmp_path).meta["optimizer_sharding"] == "fully_reshardable"


def test_loader_reads_the_fixture_like_merging_by_hand():
    cfg = C.dist_config(FIXTURE)
    assert cfg.hybrid_layer_pattern == "M*-M-" and cfg.params_dtype == "bfloat16"
    model = HybridModel(cfg)
    opt = torch.optim.AdamW(model.parameters())
    common = C.load_dist(FIXTURE, model, opt)
    assert common["iteration"] == 1000
    ref = HybridModel(cfg)
    ref.load_state_dict(_merged_by_hand(cfg), strict=True)
    ids = tokens(vocab=cfg.vocab_size)
    with torch.no_grad():
        assert torch.equal(model(ids), ref(ids))
    view = read_torch_dist(FIXTURE)
    p = dict(model.named_parameters())["decoder.layers.0.mixer.in_proj.weight"]
    # torch AdamW keeps moments in the parameter dtype (bf16 here); Megatron's are fp32
    assert torch.equal(opt.state[p]["exp_avg"][:128], view.load(
        "optimizer.state.exp_avg.decoder.layers.0.mixer.in_proj.weight.z").to(p.dtype))
    assert opt.state[p]["step"].item() == 1000 and opt.param_groups[0]["lr"] == 3e-4


def test_fixture_toggles_on_in_process_and_back():
    cfg = C.dist_config(FIXTURE).replace(params_dtype="float32")
    off, on = HybridModel(cfg), HybridModel(cfg.with_mhc(enable_hyper_connections=True))
    C.load_dist(FIXTURE, off)
    opt = torch.optim.AdamW(on.parameters())
    C.load_dist(FIXTURE, on, opt)
    ids = tokens(vocab=cfg.vocab_size)
    with torch.no_grad():
        assert (on(ids) - off(ids)).abs().max().item() <= 1e-5
    hc = on.decoder.layers[0].hyper_connection.mapping_proj.weight
    assert not opt.state[hc]["exp_avg"].any() and opt.state[hc]["step"].item() == 1000


def test_roundtrip_and_toggle_off_refusal(tmp_path):
    cfg = tiny_config("MG*-", mhc=True, contract="learned")
    torch.manual_seed(0)
    model = HybridModel(cfg)
    opt = torch.optim.AdamW(model.parameters())
    model(tokens()).float().mean().backward()
    opt.step()
    C.save_dist(tmp_path, model, opt, iteration=1)
    keys = _stored(tmp_path / "iter_0000001")
    assert "decoder.layers.1.inner_layer.self_attention.in_proj.weight.beta" in keys
    assert "optimizer.state.exp_avg.decoder.hc_head_fn" in keys
    back = HybridModel(cfg)
    opt2 = torch.optim.AdamW(back.parameters())
    C.load_dist(tmp_path, back, opt2)
    for (n, a), b in zip(model.named_parameters(), back.parameters()):
        assert torch.equal(a, b), n
        assert torch.equal(opt.state[a]["exp_avg_sq"], opt2.state[b]["exp_avg_sq"]), n
    off = HybridModel(cfg.with_mhc(enable_hyper_connections=False))
    with pytest.raises(ToggleError, match="not exact"):  # trained away from the exact point
        C.load_dist(tmp_path, off)


def test_strict_keys_and_offline_route(tmp_path):
    cfg = tiny_config("M-")
    model = HybridModel(cfg)
    C.save_dist(tmp_path / "run", model, iteration=2)
    other = HybridModel(tiny_config("M-E"))
    with pytest.raises(KeyError, match="no stored value"):
        C.load_dist(tmp_path / "run", other)
    mhc_convert.enable(tmp_path / "run", tmp_path / "on")  # our files through the converter
    on = HybridModel(C.dist_config(tmp_path / "on"))
    assert on.config.mhc_on
    C.load_dist(tmp_path / "on", on)
    ids = tokens()
    with torch.no_grad():
        assert (on(ids) - model(ids)).abs().max().item() <= 1e-5
