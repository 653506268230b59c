"""The toggle core (``mhc_model.toggle``): shapes derived per LayerSpec equal the built model's,
one layout detector, factory-split merging, and the in-process plan."""

from __future__ import annotations

import pytest
import torch

from mhc_model.errors import InvalidInputError, MixedLayoutError, ToggleError
from mhc_model.model import HybridModel, meta_model
from mhc_model.specs import LAYER_SPECS
from mhc_model.toggle import codec as K
from mhc_model.toggle.plan import plan_for_model
from mhc_model.toggle.shapes import expected_model_shapes, mhc_param_shapes
from tests.model.helpers import ALL_PATTERNS, DSV4_PATTERNS, tiny_config


@pytest.mark.parametrize("pattern", ALL_PATTERNS + DSV4_PATTERNS)
@pytest.mark.parametrize("tied", [False, True])
def test_shapes_from_specs_equal_the_built_model(pattern, tied):
    cfg = tiny_config(pattern).replace(tie_word_embeddings=tied)
    built = {k: tuple(v.shape) for k, v in meta_model(cfg).state_dict().items()}
    assert expected_model_shapes(cfg) == built
    on = cfg.with_mhc(enable_hyper_connections=True, mhc_output_contract="learned")
    built_on = {K.unwrap(k): tuple(v.shape) for k, v in meta_model(on).state_dict().items()}
    assert {**expected_model_shapes(on), **mhc_param_shapes(on)} == built_on


def test_every_symbol_has_a_spec_and_a_layer_class():
    for sym, spec in LAYER_SPECS.items():
        assert spec.symbol == sym and spec.layer_class().__name__ == spec.cls
        assert spec.output_projections  # a constant H_post must fold somewhere


def test_layout_of_and_mixed_is_both_invalid_input_and_toggle_error():
    assert K.layout_of(["embedding.word_embeddings.weight"]) is None
    assert K.layout_of(["decoder.layers.0.mixer.D"]) is False
    assert K.layout_of(["decoder.layers.0.inner_layer.mixer.D"]) is True
    assert K.layout_of(["decoder.hc_head_fn"]) is True
    assert K.layout_of(["optimizer.state.exp_avg.decoder.layers.3.inner_layer.x"]) is True
    with pytest.raises(MixedLayoutError, match="mixes") as e:
        K.layout_of(["decoder.layers.0.mixer.D", "decoder.layers.1.hyper_connection.bias"])
    assert isinstance(e.value, InvalidInputError) and isinstance(e.value, ToggleError)
    assert e.value.exit_code == 3 and e.value.key == "decoder.layers.0.mixer.D"


def test_merge_splits_only_merges_complete_splits():
    cfg = tiny_config("M-")
    base = "decoder.layers.0.mixer.in_proj.weight"
    parts = [f"{base}.{p}" for p, _ in K.split_table(cfg, "M")["mixer.in_proj.weight"]]
    assert K.merge_splits([*parts, "decoder.final_norm.weight"], cfg) == {
        base: parts, "decoder.final_norm.weight": ["decoder.final_norm.weight"]}
    assert K.merge_splits(parts[:-1], cfg) == {p: [p] for p in parts[:-1]}
    wrapped = [K.wrap(p) for p in parts]
    assert K.merge_splits(wrapped, cfg) == {K.wrap(base): wrapped}


def test_disk_views_are_views_in_split_order():
    cfg = tiny_config("M-")
    model = HybridModel(cfg)
    w = model.decoder.layers[0].mixer.in_proj.weight
    views = K.disk_views(cfg, "decoder.layers.0.mixer.in_proj.weight", w.detach())
    assert torch.equal(torch.cat(list(views.values())), w.detach())
    assert all(v.untyped_storage().data_ptr() == w.untyped_storage().data_ptr()
               for v in views.values())
    assert [k.rsplit(".", 1)[1] for k in views] == ["z", "x", "B", "C", "dt"]


def test_plan_for_model_identity_and_toggle():
    off = tiny_config("M*-E")
    on = off.with_mhc(enable_hyper_connections=True, mhc_output_contract="learned")
    keys = dict.fromkeys(expected_model_shapes(off))
    assert plan_for_model(keys, off) is None
    plan = plan_for_model(keys, on)
    assert plan.direction == "enable" and not plan.drops
    assert {a.dst for a in plan.adds} == set(mhc_param_shapes(on))
    assert {r.dst for r in plan.renames} == {K.wrap(k) for k in keys}
