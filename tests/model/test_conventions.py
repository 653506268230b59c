"""The convention table (mhc_model.conventions): records, lookup, and the helpers that read
their fields."""

import dataclasses

import pytest
import torch

from mhc_model import mhc_ref
from mhc_model.config import MHCConfig
from mhc_model.conventions import (
    CONVENTIONS,
    Convention,
    convention,
    head_eps_value,
    mhc_params_dtype,
    stream_gain,
)


def test_table_keys_are_names():
    assert all(name == c.name for name, c in CONVENTIONS.items())
    assert {"deepseek", "megatron_dsv4"} <= set(CONVENTIONS)


def test_lookup_accepts_name_or_record_and_names_the_choices():
    rec = CONVENTIONS["deepseek"]
    assert convention("deepseek") is rec and convention(rec) is rec
    with pytest.raises(ValueError) as e:
        convention("nope")
    for name in CONVENTIONS:
        assert name in str(e.value)


def test_record_rejects_unknown_field_values():
    with pytest.raises(ValueError, match="rms_factor"):
        dataclasses.replace(CONVENTIONS["deepseek"], name="x", rms_factor="l2")


def test_record_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        CONVENTIONS["deepseek"].mix_transposed = False  # type: ignore[misc]


@pytest.mark.parametrize("name", list(CONVENTIONS))
def test_config_accepts_every_table_row(name):
    MHCConfig(mhc_convention=name).validate()


@pytest.mark.parametrize("name", list(CONVENTIONS))
def test_stream_gain_is_what_the_mix_applies(name):
    """All streams equal to v: every output stream of the mix is gain[i] * v."""
    H = torch.rand(5, 3, 3, generator=torch.Generator().manual_seed(0))
    v = torch.randn(5, 1, 7)
    x = v.expand(5, 3, 7)
    zero = torch.zeros(5, 3)
    out = mhc_ref.mix_post(x, H, zero, torch.zeros(5, 7), name)
    torch.testing.assert_close(out, stream_gain(name, H).unsqueeze(-1) * v)


def test_kernel_flags_follow_fields():
    for c in CONVENTIONS.values():
        f = c.kernel_flags()
        assert f == {"SINKHORN_SOFTMAX": c.sinkhorn == "softmax_first",
                     "MIX_T": c.mix_transposed, "PRE_EPS": c.h_pre_eps,
                     "RMS_INV_NORM": c.rms_factor == "inv_norm"}


def test_head_eps_and_params_dtype_rules():
    ds, dsv4 = CONVENTIONS["deepseek"], CONVENTIONS["megatron_dsv4"]
    assert head_eps_value(ds, mhc_eps=1e-6, layernorm_epsilon=1e-5) == 1e-6
    assert head_eps_value(dsv4, mhc_eps=1e-6, layernorm_epsilon=1e-5) == 1e-5
    assert mhc_params_dtype(ds, "bfloat16") == "float32"
    assert mhc_params_dtype(dsv4, "bfloat16") == "bfloat16"


def test_reference_branches_on_fields_not_names():
    """A record under a new name with deepseek's fields computes exactly what deepseek does."""
    clone = dataclasses.replace(CONVENTIONS["deepseek"], name="clone")
    assert isinstance(clone, Convention)
    g = torch.Generator().manual_seed(3)
    T, n, C = 6, 3, 4
    x = torch.randn(T, n, C, generator=g)
    W = torch.randn(n * n + 2 * n, n * C, generator=g)
    b = torch.randn(n * n + 2 * n, generator=g)
    a = torch.full((1,), 0.7)
    ref = mhc_ref.coefficients(x, W, b, a, a, a, iters=5, convention="deepseek")
    got = mhc_ref.coefficients(x, W, b, a, a, a, iters=5, convention=clone)
    for r, o in zip(ref, got):
        assert torch.equal(r, o)
