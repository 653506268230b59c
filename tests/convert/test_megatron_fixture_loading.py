"""Our model loads every checkpoint Megatron-LM wrote (fixtures/external/megatron-*) strictly:
``mhc_convert.parity.load_model`` (any format, through the view) and, for torch_dist,
``mhc_model.checkpoint.load_dist`` (straight from DCP) map every stored key family onto our
keys, and both give the same bits.

The families are checked here against an independent table of Megatron's spellings (not the
project's ``LayerSpec`` rows): each stored tensor must land, unchanged, in the model tensor(s)
it stands for. Legacy TP slices are merged back as Megatron cut them (``legacy_tp``)."""

from __future__ import annotations

import re

import pytest
import torch

from mhc_convert.adapters import detect
from mhc_convert.adapters.legacy_tp import merge_tp
from mhc_convert.errors import InvalidInputError
from mhc_convert.parity import load_model
from mhc_model import checkpoint as C
from mhc_model.model import HybridModel
from mhc_model.toggle import codec as K
from mhc_model.toggle.shapes import expected_model_shapes
from tests.convert.engine_helpers import bits_equal
from tests.convert.test_megatron_fixtures import ALL, EXTERNAL, _id, _info
from tests.model.helpers import tiny_config

CFG = tiny_config("M*-E")

# Megatron spelling (layer-relative, after any inner_layer.) -> ours; "{e}": an expert index,
# "[e]": row e of a stacked tensor
FAMILIES = [
    (r"norm\.weight", "mixer.in_proj.layer_norm_weight", "M"),
    (r"input_layernorm\.weight", "self_attention.linear_qkv.layer_norm_weight", "*"),
    (r"pre_mlp_layernorm\.weight", "mlp.linear_fc1.layer_norm_weight", "-"),
    (r"mixer\.conv1d_(weight|bias)", r"mixer.conv1d.\1", "M"),
    (r"mlp\.experts\.local_experts\.(\d+)\.linear_fc([12])\.weight",
     r"mlp.experts.linear_fc\2.weight\1", "E"),
    (r"mlp\.experts\.experts\.linear_fc([12])\.weight", r"mlp.experts.linear_fc\1.weight[e]", "E"),
]
LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(inner_layer\.)?(.+)$")
TORCH_DIST = [p for p in ALL if _info(*p)["format"] == "torch_dist"]


def _cfg_view(path):
    adapter = detect(path)
    view = adapter.read(path)
    return adapter.config(view), view


@pytest.mark.parametrize(("branch", "name"), ALL, ids=[_id(p) for p in ALL])
def test_load_model_strict_maps_every_family(branch, name):
    path = EXTERNAL / branch / name
    cfg, view = _cfg_view(path)
    model = load_model(path)  # strict: every key of the model, nothing else
    assert model.config.mhc_on is _info(branch, name)["mhc"]
    own = model.state_dict()
    seen = set()
    for key, e in view.entries.items():
        m = LAYER.match(key)
        if not m or e.kind != "tensor" or key.startswith("optimizer."):
            continue
        layer, inner, rel = int(m.group(1)), m.group(2) or "", m.group(3)
        for rx, ours, symbol in FAMILIES:
            hit = re.fullmatch(rx, rel)
            if not hit or cfg.layer_symbols[layer] != symbol:
                continue
            stored = view.load(key)
            name_ = f"decoder.layers.{layer}.{inner}{hit.expand(ours)}"
            if name_.endswith("[e]"):
                for i in range(stored.shape[0]):
                    assert bits_equal(own[name_[:-3] + str(i)], stored[i]), (key, i)
            else:
                assert bits_equal(own[name_], stored), key
            seen.add(rx)
    wanted = {rx for rx, _, sym in FAMILIES  # every family the fixture holds was checked
              if any((m := LAYER.match(k)) and re.fullmatch(rx, m.group(3))
                     and cfg.layer_symbols[int(m.group(1))] == sym for k in view.entries)}
    assert seen == wanted


@pytest.mark.parametrize(("branch", "name"), TORCH_DIST, ids=[_id(p) for p in TORCH_DIST])
def test_load_dist_matches_load_model(branch, name):
    path = EXTERNAL / branch / name
    cfg = C.dist_config(path)
    assert cfg == _cfg_view(path)[0]
    torch.manual_seed(0)
    model = HybridModel(cfg)
    common = C.load_dist(path, model)
    assert common["iteration"] == _info(branch, name)["iteration"]
    want = load_model(path).state_dict()
    got = model.state_dict()
    assert list(got) == list(want)
    bad = [k for k in want if not bits_equal(got[k], want[k])]
    assert not bad, bad


@pytest.mark.parametrize("name", ["mstar_moe_tp1_off", "mstar_moe_pp2_off_bf16_localnames"])
def test_load_dist_toggle_on_matches_the_converter(tmp_path, name):
    """An mHC-off Megatron checkpoint loaded into an mHC-on model (the in-process enable)
    equals loading the converter's enabled output (fp32 model: dev keeps mHC params fp32)."""
    import mhc_convert

    branch = "megatron-dev-d48bd6be"
    path = EXTERNAL / branch / name
    out = tmp_path / "on"
    mhc_convert.enable(path, out)
    want = load_model(out).state_dict()
    on = HybridModel(C.dist_config(out))
    C.load_dist(path, on)
    bad = [k for k, v in on.state_dict().items() if not bits_equal(v, want[k])]
    assert not bad, bad


def _shard(full: torch.Tensor, parts, tp: int) -> list[torch.Tensor]:
    """Megatron's column-parallel shard of a tensor of row blocks: rank r holds its slice of
    every block, blocks in order."""
    out, blocks, start = [], [], 0
    for _, rows in parts:
        blocks.append(full[start:start + rows])
        start += rows
    for r in range(tp):
        out.append(torch.cat([b.chunk(tp)[r] for b in blocks]))
    return out


@pytest.mark.parametrize("tp", [2, 4])
def test_merge_tp_reassembles_row_blocks(tp):
    key = "decoder.layers.0.mixer.in_proj.weight"
    full = torch.randn(expected_model_shapes(CFG)[key])
    parts = K.split_table(CFG, "M")["mixer.in_proj.weight"]
    assert K.tp_parts(CFG, key) == parts
    assert torch.equal(merge_tp(CFG, key, _shard(full, parts, tp), path="x"), full)
    out_proj = "decoder.layers.0.mixer.out_proj.weight"
    w = torch.randn(expected_model_shapes(CFG)[out_proj])
    assert torch.equal(merge_tp(CFG, out_proj, list(w.chunk(tp, dim=1)), path="x"), w)
    gated = tiny_config("M*-E").replace(mlp=CFG.mlp.__class__(ffn_hidden_size=48,
                                                              activation="swiglu"))
    fc1 = "decoder.layers.2.mlp.linear_fc1.weight"
    w = torch.randn(expected_model_shapes(gated)[fc1])
    got = merge_tp(gated, fc1, _shard(w, (("gate", 48), ("up", 48)), tp), path="x")
    assert torch.equal(got, w)
    norm = "decoder.final_norm.weight"
    with pytest.raises(InvalidInputError, match="different values"):
        merge_tp(CFG, norm, [torch.ones(32), torch.zeros(32)], path="x")
