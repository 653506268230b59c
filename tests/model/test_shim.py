"""HybridModel.load_state_dict accepts both layouts (mhc_model.shim)."""

from __future__ import annotations

import pytest
import torch

from mhc_model import HybridModel
from mhc_model.hyper_connection import exact_hc_tensors, exact_head_tensors
from mhc_model.shim import ToggleError, source_is_on
from tests.model.helpers import off_to_on, perturb_norms_, tiny_config, tokens

PATTERN = "M*-E"


def _pair(contract: str = "mean", pattern: str = PATTERN):
    torch.manual_seed(0)
    off = HybridModel(tiny_config(pattern))
    perturb_norms_(off)
    on = HybridModel(tiny_config(pattern, mhc=True, contract=contract))
    return off, on


@pytest.mark.parametrize("contract", ["mean", "learned"])
def test_off_state_into_on_model_is_exact_and_fills_exact_init(contract):
    off, on = _pair(contract)
    on.load_state_dict(off.state_dict(), strict=True)
    sd = on.state_dict()
    for k, v in off.state_dict().items():  # carried bit for bit under the wrapped name
        assert torch.equal(sd[off_to_on({k: v}).popitem()[0]], v)
    for i in range(on.config.num_layers):
        for name, v in exact_hc_tensors(on.config, i).items():
            assert torch.equal(sd[f"decoder.layers.{i}.hyper_connection.{name}"], v)
    if contract == "learned":
        for name, v in exact_head_tensors(on.config).items():
            assert torch.equal(sd[f"decoder.{name}"], v.reshape(sd[f"decoder.{name}"].shape))
    ids = tokens()
    with torch.no_grad():
        assert (on(ids) - off(ids)).abs().max().item() <= 1e-5


def test_caller_dict_untouched_and_same_layout_is_identity():
    off, on = _pair()
    state = off.state_dict()
    keys = list(state)
    on.load_state_dict(state)
    assert list(state) == keys  # the hook rewrote torch's copy, not ours
    on2 = HybridModel(on.config)
    on2.load_state_dict(on.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(on.state_dict().values(),
                                                  on2.state_dict().values()))


def test_on_state_into_off_model_at_exact_point_roundtrips_bitwise():
    off, on = _pair("learned")
    on.load_state_dict(off.state_dict())
    back = HybridModel(off.config)
    back.load_state_dict(on.state_dict(), strict=True)
    for k, v in off.state_dict().items():
        assert torch.equal(back.state_dict()[k], v)


@pytest.mark.parametrize("what", ["alpha", "post", "head_scale"])
def test_inexact_disable_is_refused(what):
    off, on = _pair("learned")
    on.load_state_dict(off.state_dict())
    n = on.config.mhc.num_residual_streams
    with torch.no_grad():
        if what == "alpha":
            on.decoder.layers[1].hyper_connection.alpha_res.fill_(1e-3)
        elif what == "post":
            on.decoder.layers[2].hyper_connection.bias[n:2 * n].add_(torch.arange(n) * 0.1)
        else:
            on.decoder.hc_head_scale.fill_(0.5)
    target = HybridModel(off.config)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ToggleError, match="not exact"):
        target.load_state_dict(on.state_dict())
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())  # untouched


def test_strict_keeps_its_meaning():
    off, on = _pair()
    state = off.state_dict()
    state.pop("decoder.layers.1.self_attention.linear_proj.weight")
    state["decoder.layers.0.mixer.bogus"] = torch.zeros(1)
    with pytest.raises(RuntimeError) as e:
        on.load_state_dict(state, strict=True)
    assert "inner_layer.self_attention.linear_proj.weight" in str(e.value)
    assert "inner_layer.mixer.bogus" in str(e.value)
    # an mHC-on dict missing a hyper-connection key is not refilled: that is a broken checkpoint
    full = HybridModel(on.config).state_dict()
    full.pop("decoder.layers.0.hyper_connection.bias")
    with pytest.raises(RuntimeError, match="hyper_connection.bias"):
        on.load_state_dict(full, strict=True)
    res = on.load_state_dict(state, strict=False)
    assert "decoder.layers.1.inner_layer.self_attention.linear_proj.weight" in res.missing_keys


def test_mixed_layout_rejected():
    off, on = _pair()
    state = off.state_dict()
    k = "decoder.layers.0.mixer.A_log"
    state["decoder.layers.0.inner_layer.mixer.A_log"] = state.pop(k)
    with pytest.raises(ToggleError, match="mixes"):
        on.load_state_dict(state)
    assert source_is_on(["embedding.word_embeddings.weight"]) is None


def test_nested_prefix():
    off, on = _pair()
    outer_on = torch.nn.ModuleDict({"lm": on})
    outer_off = torch.nn.ModuleDict({"lm": off})
    outer_on.load_state_dict(outer_off.state_dict())
    ids = tokens()
    with torch.no_grad():
        assert (on(ids) - off(ids)).abs().max().item() <= 1e-5
