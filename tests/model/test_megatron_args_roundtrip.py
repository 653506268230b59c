"""``megatron_args(cfg)`` (with our mHC metadata beside it: the convention and contract Megatron's
args cannot hold) and ``config_from_megatron_args`` are inverse on every mHC field, for every
convention and contract, mHC on and off (the args are what the converter and Megatron read
back; a flag written wrong would silently change the model that gets resumed)."""

from __future__ import annotations

import dataclasses

import pytest

from mhc_model.config import HybridConfig
from mhc_model.conventions import CONVENTIONS
from mhc_model.megatron_args import MHC_META_FIELDS, config_from_megatron_args, megatron_args
from mhc_model.toggle.shapes import expected_model_shapes


@pytest.mark.parametrize("pattern", ["M-M*-M-", "G*E-"])
@pytest.mark.parametrize("on", [False, True])
@pytest.mark.parametrize("contract", ["mean", "learned"])
@pytest.mark.parametrize("convention", sorted(CONVENTIONS))
def test_args_round_trip(convention, contract, on, pattern):
    cfg = HybridConfig(hybrid_layer_pattern=pattern, params_dtype="bfloat16").with_mhc(
        enable_hyper_connections=on, mhc_convention=convention, mhc_output_contract=contract,
        num_residual_streams=3, mhc_sinkhorn_iterations=7, mhc_init_gating_factor=0.02,
        mhc_recompute_layer_num=2)
    meta = {name: getattr(cfg.mhc, name) for name in MHC_META_FIELDS}
    back = config_from_megatron_args(megatron_args(cfg), meta)
    assert back.mhc == cfg.mhc
    # kv_channels comes back as the head dim it stood for (None = hidden / heads)
    assert back.attention == dataclasses.replace(cfg.attention,
                                                 kv_channels=cfg.attention.head_dim(64))
    assert back.replace(attention=cfg.attention) == cfg
    assert expected_model_shapes(back) == expected_model_shapes(cfg)


@pytest.mark.parametrize(("marker", "want_on"), [("linear_attention_type", "learned"),
                                                 ("csa_compress_ratio_for_c", "learned"),
                                                 (None, "mean")])
def test_contract_from_args_of_a_branch(marker, want_on):
    """Args that prove Megatron dev/dsv4 (a marker field) with mHC on and no metadata of ours:
    the learned contract, the only head those branches build (hybrid_block.py dev ~742-756,
    dsv4 ~382-392); mHC off or args proving no branch: the default (mean); our metadata wins."""
    for on in (False, True):
        args = megatron_args(HybridConfig(hybrid_layer_pattern="M*-").with_mhc(
            enable_hyper_connections=on))
        if marker is not None:
            setattr(args, marker, None)
        cfg = config_from_megatron_args(args)
        assert cfg.mhc.mhc_output_contract == (want_on if on else "mean"), (marker, on)
    if marker is not None:
        meta = {"mhc_output_contract": "mean"}
        assert config_from_megatron_args(args, meta).mhc.mhc_output_contract == "mean"
