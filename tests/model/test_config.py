"""HybridConfig: pattern grammar, validation messages, JSON round trip, Megatron args (both
spellings of the mHC flags), and key parity with the real megatron-core checkpoint."""

import argparse
import copy

import pytest
import torch

from mhc_model import HybridConfig, HybridModel
from mhc_model.config import AttentionConfig, MambaConfig, MHCConfig, parse_pattern
from mhc_model.megatron_args import config_from_megatron_args
from mhc_model.toggle.codec import split_table
from tests.model.helpers import tiny_config
from tests.paths import MEGATRON_FIXTURE


def test_pattern_grammar():
    assert parse_pattern("M-M*|-E") == ("M", "-", "M", "*", "-", "E")
    assert parse_pattern("M*M*/MM/MM") == ("M", "*", "M", "*")
    cfg = HybridConfig(hybrid_layer_pattern="M*|-E/*-/*-")
    assert (cfg.layer_symbols, cfg.mtp_symbols, cfg.mtp_num_depths) == (
        ("M", "*", "-", "E"), ("*", "-"), 2)
    assert cfg.site_symbols == ("M", "*", "-", "E", "*", "-", "*", "-")
    with pytest.raises(ValueError, match="every MTP part must be the same"):
        parse_pattern("M*/M/-")
    with pytest.raises(ValueError, match=r"symbol\(s\) \['\|'\] are not valid"):
        parse_pattern("M*/M|-")
    with pytest.raises(ValueError, match=r"symbol\(s\) \['X'\] are not valid"):
        parse_pattern("M*X")
    with pytest.raises(ValueError, match="no layers"):
        parse_pattern("||")


@pytest.mark.parametrize("make, message", [
    (lambda: HybridConfig(hidden_size=0), r"config.hidden_size must be > 0, got 0"),
    (lambda: HybridConfig(hybrid_layer_pattern="*", attention=AttentionConfig(
        num_attention_heads=6, num_query_groups=4)),
     r"num_attention_heads=6 is not a multiple of attention.num_query_groups=4"),
    (lambda: HybridConfig(hybrid_layer_pattern="M", mamba=MambaConfig(head_dim=48)),
     r"d_inner = expand\*hidden_size = 128 is not divisible by mamba.head_dim=48"),
    (lambda: HybridConfig(mhc=MHCConfig(num_residual_streams=1)),
     r"mhc.num_residual_streams must be >= 2, got 1"),
    (lambda: HybridConfig(mhc=MHCConfig(mhc_convention="x")), r"mhc.mhc_convention must be one of"),
    (lambda: HybridConfig(params_dtype="int8"), r"config.params_dtype must be one of"),
])
def test_validation_names_field_and_numbers(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_json_round_trip_and_unknown_fields():
    cfg = tiny_config("MEMEM*EME", mhc=True, n=3, convention="megatron_dsv4", contract="learned")
    assert HybridConfig.from_json(cfg.to_json()) == cfg
    data = cfg.to_dict()
    data["bogus"] = 1
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['bogus'\]"):
        HybridConfig.from_dict(data)
    data = cfg.to_dict()
    data["mamba"]["bogus"] = 1
    with pytest.raises(ValueError, match=r"HybridConfig.mamba: unknown field"):
        HybridConfig.from_dict(data)


def _fixture_args() -> argparse.Namespace:
    from mhc_convert.formats.torch_dist import read_torch_dist

    return read_torch_dist(MEGATRON_FIXTURE).meta["common_state"]["args"]


def test_from_megatron_args_reads_the_real_fixture():
    cfg = config_from_megatron_args(_fixture_args())
    assert cfg.hybrid_layer_pattern == "M*-M-"
    assert (cfg.hidden_size, cfg.vocab_size, cfg.params_dtype) == (64, 256, "bfloat16")
    assert cfg.attention.num_attention_heads == 4 and cfg.attention.groups == 2
    assert cfg.attention.position_embedding_type == "none"
    assert cfg.mamba.num_heads(64) == 8 and cfg.mamba.num_groups == 2
    assert cfg.mlp.activation == "squared_relu" and not cfg.tie_word_embeddings
    assert not cfg.mhc_on and cfg.mhc.num_residual_streams == 4


@pytest.mark.parametrize("spelling", ["dsv4", "main"])
def test_both_spellings_of_the_mhc_flags(spelling):
    args = copy.copy(_fixture_args())
    del args.enable_hyper_connections, args.num_residual_streams
    if spelling == "dsv4":
        args.enable_hyper_connections, args.num_residual_streams = True, 3
    else:
        args.enable_mhc_connections, args.mhc_num_residual_streams = True, 3
    cfg = config_from_megatron_args(args)
    assert cfg.mhc_on and cfg.mhc.num_residual_streams == 3


def test_contradictory_spellings_are_refused():
    args = copy.copy(_fixture_args())
    args.enable_mhc_connections = True  # the dsv4 spelling says False
    with pytest.raises(ValueError, match="contradictory mHC flags"):
        config_from_megatron_args(args)


def test_key_parity_with_megatron_core():
    """mHC-off state_dict keys and shapes == the fixture's model keys with the factory splits
    merged and _extra_state / optimizer / common entries dropped."""
    from mhc_convert.formats.torch_dist import read_torch_dist

    cfg = config_from_megatron_args(_fixture_args())
    view = read_torch_dist(MEGATRON_FIXTURE)
    theirs: dict[str, tuple] = {}
    for key, e in view.entries.items():
        if e.kind != "tensor" or key.startswith("optimizer.") or "_extra_state" in key:
            continue
        theirs[key] = e.shape
    for i, sym in enumerate(cfg.layer_symbols):
        for base, parts in split_table(cfg, sym).items():
            pieces = [theirs.pop(f"decoder.layers.{i}.{base}.{p}") for p, _ in parts]
            theirs[f"decoder.layers.{i}.{base}"] = (sum(s[0] for s in pieces), *pieces[0][1:])
    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in HybridModel(cfg).state_dict().items()}
    assert ours == theirs
    dtypes = {k: e.dtype for k, e in view.entries.items() if k in ours}
    with torch.device("meta"):
        model = HybridModel(cfg)
    assert {k: str(v.dtype).replace("torch.", "") for k, v in model.state_dict().items()
            if k in dtypes} == dtypes


def test_rotary_base_reaches_attention_and_mla():
    args = copy.copy(_fixture_args())
    args.rotary_base = 50000
    cfg = config_from_megatron_args(args)
    assert cfg.attention.rotary_base == 50000 and cfg.mla.rotary_base == 50000
