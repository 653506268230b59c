"""Property tests of the pure planner ``make_plan`` (DESIGN.md §3, §5).

Source key sets are the mHC-off model's keys and shapes (``expected_model_shapes``), optionally
with Megatron's factory splits, ``_extra_state/shard_*`` byte objects, the Megatron byte objects
beside the model, and ``optimizer.state.<name>.`` copies. The expected enable output is derived
here independently of ``mhc_model.toggle.codec`` (the wrapper rule and the parameter shapes of §3).
"""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mhc_convert.errors import AlreadyInLayoutError
from mhc_model.toggle.plan import make_plan
from mhc_model.toggle.shapes import expected_model_shapes
from tests.model.helpers import tiny_config

SYMBOLS = "MG*D+-E"
OPT_STATES = ("fp32_param", "exp_avg", "exp_avg_sq")
LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
PROPS = settings(max_examples=25, deadline=None, derandomize=True,
                 suppress_health_check=[HealthCheck.too_slow])


def mamba_splits(cfg) -> dict[str, tuple[tuple[str, int], ...]]:
    """Megatron-Core's Mamba2 factory splits, from the mamba mixer's own arithmetic."""
    m, C = cfg.mamba, cfg.hidden_size
    d_inner = m.expand * C
    gn = m.num_groups * m.d_state
    heads = d_inner // m.head_dim
    conv = (("x", d_inner), ("B", gn), ("C", gn))
    return {"mixer.in_proj.weight": (("z", d_inner), ("x", d_inner), ("B", gn), ("C", gn),
                                     ("dt", heads)),
            "mixer.conv1d.weight": conv, "mixer.conv1d.bias": conv}


def source_keys(cfg, *, split: bool, extra_state: bool, opt_states: tuple[str, ...],
                megatron_objects: bool) -> dict[str, tuple[int, ...] | None]:
    model: dict[str, tuple[int, ...] | None] = {}
    modules: dict[int, str] = {}
    for key, shape in expected_model_shapes(cfg).items():
        m = LAYER.match(key)
        if m:
            i, rel = int(m.group(1)), m.group(2)
            modules.setdefault(i, rel.rsplit(".", 1)[0])
            splits = mamba_splits(cfg).get(rel) if cfg.layer_symbols[i] == "M" else None
            if split and splits:
                assert sum(rows for _, rows in splits) == shape[0], key
                for part, rows in splits:
                    model[f"{key}.{part}"] = (rows, *shape[1:])
                continue
        model[key] = tuple(shape)
    keys = dict(model)
    for state in opt_states:
        keys.update({f"optimizer.state.{state}.{k}": s for k, s in model.items()})
    if extra_state:
        for i, module in modules.items():
            keys[f"decoder.layers.{i}.{module}._extra_state/shard_0_1"] = None
    if megatron_objects:
        keys["rng_state/shard_0.0_1.1"] = None
        keys["common_state/shard_0_1"] = None
    return keys


def wrapped(key: str) -> str:
    """The wrapper rule, stated independently: only decoder layer keys move, optimizer prefix
    kept."""
    prefix = ""
    m = re.match(r"^(optimizer\.state\.[A-Za-z0-9_]+\.)(.+)$", key)
    if m:
        prefix, key = m.group(1), m.group(2)
    lm = LAYER.match(key)
    return prefix + (f"decoder.layers.{lm.group(1)}.inner_layer.{lm.group(2)}" if lm else key)


def expected_adds(cfg, n: int, contract: str, opt_states) -> dict[str, tuple[int, ...]]:
    C, rows = cfg.hidden_size, n * n + 2 * n
    model = {}
    for i in range(cfg.num_layers):
        p = f"decoder.layers.{i}.hyper_connection."
        model.update({p + "mapping_proj.weight": (rows, n * C), p + "bias": (rows,),
                      p + "alpha_pre": (1,), p + "alpha_post": (1,), p + "alpha_res": (1,)})
    if contract == "learned":
        model.update({"decoder.hc_head_fn": (n, n * C), "decoder.hc_head_base": (n,),
                      "decoder.hc_head_scale": (1,)})
    out = dict(model)
    for state in opt_states:
        out.update({f"optimizer.state.{state}.{k}": s for k, s in model.items()})
    return out


cases = st.fixed_dictionaries({
    "pattern": st.text(alphabet=SYMBOLS, min_size=1, max_size=6),
    "n": st.integers(2, 6),
    "contract": st.sampled_from(["mean", "learned"]),
    "convention": st.sampled_from(["deepseek", "megatron_dsv4"]),
    "opt_states": st.lists(st.sampled_from(OPT_STATES), unique=True, max_size=3).map(tuple),
    "split": st.booleans(),
    "extra_state": st.booleans(),
    "megatron_objects": st.booleans(),
})


def build(case):
    cfg = tiny_config(case["pattern"])
    target = tiny_config(case["pattern"], mhc=True, n=case["n"], contract=case["contract"],
                         convention=case["convention"])
    keys = source_keys(cfg, split=case["split"], extra_state=case["extra_state"],
                       opt_states=case["opt_states"], megatron_objects=case["megatron_objects"])
    return cfg, target, keys


@PROPS
@given(cases)
def test_enable_is_a_bijection_plus_exact_adds(case):
    cfg, target, keys = build(case)
    plan = make_plan(keys, cfg, "enable", target)
    srcs = [r.src for r in plan.renames]
    assert sorted(srcs) == sorted(keys)  # every source key consumed exactly once
    assert plan.drops == ()
    outs = plan.output_keys
    assert len(outs) == len(set(outs))  # no duplicate outputs
    assert {r.src: r.dst for r in plan.renames} == {k: wrapped(k) for k in keys}
    want = expected_adds(cfg, case["n"], case["contract"], case["opt_states"])
    assert {a.dst: tuple(a.shape) for a in plan.adds} == want
    assert len(plan.adds) == len(want)
    assert not set(want) & {r.dst for r in plan.renames}
    for a in plan.adds:
        assert a.opt_state == (a.dst.split(".")[2] if a.dst.startswith("optimizer.") else None)
    assert plan.summary()["added"] == len(want)
    assert set(plan.opt_states) == set(case["opt_states"])


@PROPS
@given(cases)
def test_disable_after_enable_is_identity_and_enable_again_refused(case):
    cfg, target, keys = build(case)
    on = make_plan(keys, cfg, "enable", target)
    on_keys = {r.dst: keys[r.src] for r in on.renames}
    on_keys.update({a.dst: tuple(a.shape) for a in on.adds})
    off = make_plan(on_keys, target, "disable", target)
    assert {r.src: r.dst for r in off.renames} == {wrapped(k): k for k in keys}
    assert sorted(r.dst for r in off.renames) == sorted(keys)
    assert sorted(d.src for d in off.drops) == sorted(a.dst for a in on.adds)
    assert off.adds == ()
    # the drops name exactly what enable added, so the exactness check can find every value
    assert {(d.what, d.opt_state) for d in off.drops} == {(a.what, a.opt_state) for a in on.adds}
    with pytest.raises(AlreadyInLayoutError):
        make_plan(on_keys, target, "enable", target)
    with pytest.raises(AlreadyInLayoutError):
        make_plan(keys, cfg, "disable", cfg)


@PROPS
@given(cases, st.data())
def test_losing_or_inventing_a_key_is_refused(case, data):
    """The other side of the bijection: any single missing model key or an unknown one fails."""
    from mhc_convert.errors import InvalidInputError

    cfg, target, keys = build(case)
    model_keys = sorted(k for k, s in keys.items() if s is not None and
                        not k.startswith("optimizer."))
    gone = data.draw(st.sampled_from(model_keys))
    with pytest.raises(InvalidInputError) as info:
        make_plan({k: s for k, s in keys.items() if k != gone}, cfg, "enable", target)
    # a missing factory-split part is reported under its whole (unsplit) model key
    assert info.value.key in (gone, gone.rsplit(".", 1)[0])
    bad = data.draw(st.sampled_from(["decoder.layers.0.bogus.weight", "decoder.extra.weight",
                                     f"decoder.layers.{cfg.num_layers}.mlp.linear_fc1.weight"]))
    with pytest.raises(InvalidInputError):
        make_plan({**keys, bad: (1,)}, cfg, "enable", target)
