"""Megatron's key families as data (``LayerSpec.aliases`` / ``stacks`` / ``tp_parts``, read by
the codec, the planner and the loaders): accepted where they belong, kept as spelled, and any
key that is not one of them, missing, duplicated or mis-shaped raises (never skipped)."""

from __future__ import annotations

import pytest

from mhc_model.errors import InvalidInputError
from mhc_model.toggle import codec as K
from mhc_model.toggle.plan import make_plan
from mhc_model.toggle.shapes import expected_model_shapes, stored_shape
from tests.model.helpers import tiny_config

CFG = tiny_config("M*-E")
E = CFG.moe.num_experts


def megatron_keys(cfg=CFG, *, local_norms=True, stacked=True) -> dict[str, tuple[int, ...]]:
    """Our expected keys respelled as Megatron's local spec / torch_dist experts write them."""
    out = {}
    for key, shape in expected_model_shapes(cfg).items():
        rel = key.split(".", 3)[3] if key.startswith("decoder.layers.") else None
        layer = int(key.split(".")[2]) if rel else None
        if local_norms and rel == "mixer.in_proj.layer_norm_weight":
            key = f"decoder.layers.{layer}.norm.weight"
        elif local_norms and rel == "self_attention.linear_qkv.layer_norm_weight":
            key = f"decoder.layers.{layer}.input_layernorm.weight"
        elif local_norms and rel == "mlp.linear_fc1.layer_norm_weight":
            key = f"decoder.layers.{layer}.pre_mlp_layernorm.weight"
        elif stacked and rel and rel.startswith("mlp.experts.linear_fc"):
            fc = rel[len("mlp.experts."):].split(".")[0]
            if rel.endswith("weight0"):
                out[f"decoder.layers.{layer}.mlp.experts.experts.{fc}.weight"] = (E, *shape)
            continue
        out[key] = shape
    return out


def plan(keys, direction="enable"):
    return make_plan(keys, CFG, direction, CFG.with_mhc(enable_hyper_connections=True),
                     path="ckpt")


def test_megatron_spellings_plan_and_keep_their_names():
    keys = megatron_keys()
    keys["output_layer._extra_state/shard_0_1"] = None
    keys["decoder.layers.3.mlp.experts.experts.linear_fc1._extra_state/shard_2_4"] = None
    keys["rerun_state_machine_state/shard_0_1"] = None
    keys["rng_state/shard_0.0_1.2"] = None
    p = plan(keys)
    renames = {r.src: r.dst for r in p.renames}
    assert set(renames) == set(keys)
    assert renames["decoder.layers.0.norm.weight"] == "decoder.layers.0.inner_layer.norm.weight"
    assert renames["output_layer._extra_state/shard_0_1"] == "output_layer._extra_state/shard_0_1"
    assert renames["rerun_state_machine_state/shard_0_1"] == "rerun_state_machine_state/shard_0_1"
    stack = "decoder.layers.3.mlp.experts.experts.linear_fc2.weight"
    assert renames[stack] == K.wrap(stack)


def test_model_sources_unstack_and_resolve_aliases():
    src = K.model_sources(megatron_keys(), CFG)
    assert set(src) == set(expected_model_shapes(CFG))
    assert src["decoder.layers.0.mixer.in_proj.layer_norm_weight"] == K.Source(
        ("decoder.layers.0.norm.weight",))
    assert src["decoder.layers.3.mlp.experts.linear_fc1.weight2"] == K.Source(
        ("decoder.layers.3.mlp.experts.experts.linear_fc1.weight",), 2)
    wrapped = K.model_sources([K.wrap(k) for k in megatron_keys()], CFG)
    assert wrapped["decoder.layers.3.inner_layer.mlp.experts.linear_fc2.weight3"].index == 3


def test_sequential_mlp_experts_are_our_grouped_weights():
    keys = {k: s for k, s in megatron_keys(stacked=False).items()}
    for e in range(E):
        for fc in (1, 2):
            shape = keys.pop(f"decoder.layers.3.mlp.experts.linear_fc{fc}.weight{e}")
            keys[f"decoder.layers.3.mlp.experts.local_experts.{e}.linear_fc{fc}.weight"] = shape
            keys[f"decoder.layers.3.mlp.experts.local_experts.{e}.linear_fc{fc}._extra_state"] \
                = None
    plan(keys)
    del keys["decoder.layers.3.mlp.experts.local_experts.1.linear_fc2.weight"]
    with pytest.raises(InvalidInputError, match="missing") as e:
        plan(keys)
    assert e.value.key == "decoder.layers.3.mlp.experts.linear_fc2.weight1"


@pytest.mark.parametrize(("key", "match"), [
    ("decoder.layers.0.mixer.bogus._extra_state", "unknown _extra_state"),
    ("embedding.bogus._extra_state/shard_0_1", "unknown key"),
    ("decoder.layers.3.norm.weight", "not a key of a 'E' layer"),  # Mamba's alias, not MoE's
    ("decoder.layers.1.norm.weight", "not a key of a '\\*' layer"),
    ("decoder.layers.0.mixer.in_proj.weight.q", "not a key of a 'M' layer"),
])
def test_keys_outside_the_families_raise(key, match):
    keys = megatron_keys()
    keys[key] = None if "_extra_state" in key else (32,)
    with pytest.raises(InvalidInputError, match=match) as e:
        plan(keys)
    assert e.value.key == key and e.value.path == "ckpt"


def test_both_spellings_of_one_key_raise():
    keys = megatron_keys()
    keys["decoder.layers.0.mixer.in_proj.layer_norm_weight"] = (32,)
    with pytest.raises(InvalidInputError, match="stored twice"):
        plan(keys)


@pytest.mark.parametrize("shape", [(E - 1, 24, 32), (E, 32, 24), (24, 32)])
def test_stack_shape_must_be_count_times_expert_shape(shape):
    keys = megatron_keys()
    keys["decoder.layers.3.mlp.experts.experts.linear_fc1.weight"] = shape
    with pytest.raises(InvalidInputError, match="contradicts the config"):
        plan(keys)


def test_stored_shape_reads_every_spelling():
    assert stored_shape(CFG, "decoder.layers.3.inner_layer.mlp.experts.experts.linear_fc2.weight"
                        ) == (E, 32, 24)
    assert stored_shape(CFG, "decoder.layers.0.norm.weight") == (32,)
    assert stored_shape(CFG, "decoder.layers.0.mixer.conv1d_weight") == \
        expected_model_shapes(CFG)["decoder.layers.0.mixer.conv1d.weight"]
    assert stored_shape(CFG, "decoder.layers.0.mixer.in_proj.weight.dt") == (
        CFG.mamba.num_heads(32), 32)
    assert stored_shape(CFG, "decoder.layers.3.norm.weight") is None
    assert stored_shape(CFG, "decoder.layers.0.hyper_connection.bias") is None  # mHC off
    on = CFG.with_mhc(enable_hyper_connections=True)
    assert stored_shape(on, "decoder.layers.0.hyper_connection.bias") == (24,)
