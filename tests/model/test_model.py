"""Whole-model properties: shapes and finiteness for every symbol and pattern, the exact enable
init (mHC-on == mHC-off to float rounding), recompute gradients, fp32 residual dtypes,
native checkpoints."""

import pytest
import torch

from mhc_model import HybridModel, exact_enable_
from mhc_model.conventions import CONVENTIONS as TABLE
from tests.model.helpers import (
    ALL_PATTERNS,
    off_to_on,
    perturb_norms_,
    saved_stream_storages,
    tiny_config,
    tokens,
)

CONVENTIONS = list(TABLE)
CONTRACTS = ["mean", "learned"]


def _fwd_bwd(model, ids):
    logits = model(ids)
    assert logits.shape == (*ids.shape, model.config.vocab_size)
    assert torch.isfinite(logits).all()
    logits.float().square().mean().backward()
    for name, p in model.named_parameters():
        if ".indexer." in name:
            continue  # DSA's top-k selection is not differentiable; the indexer has its own loss
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), name
    return logits


@pytest.mark.parametrize("pattern", ALL_PATTERNS)
def test_forward_backward_mhc_off(pattern):
    torch.manual_seed(0)
    _fwd_bwd(HybridModel(tiny_config(pattern)), tokens())


@pytest.mark.parametrize("pattern", ALL_PATTERNS)
@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("contract", CONTRACTS)
def test_forward_backward_mhc_on(pattern, n, convention, contract):
    torch.manual_seed(0)
    cfg = tiny_config(pattern, mhc=True, n=n, convention=convention, contract=contract)
    model = HybridModel(cfg)
    _fwd_bwd(model, tokens())
    hc = model.decoder.layers[0].hyper_connection
    assert hc.mapping_proj.weight.shape == (n * n + 2 * n, n * cfg.hidden_size)
    assert hc.alpha_pre.grad.abs().sum() > 0  # Megatron init: mappings are trainable


@pytest.mark.parametrize("pattern", ALL_PATTERNS)
@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("contract", CONTRACTS)
def test_exact_enable_matches_mhc_off(pattern, n, convention, contract):
    torch.manual_seed(0)
    off = HybridModel(tiny_config(pattern))
    perturb_norms_(off)
    on = HybridModel(tiny_config(pattern, mhc=True, n=n, convention=convention,
                                 contract=contract))
    missing, unexpected = on.load_state_dict(off_to_on(off.state_dict()), strict=False)
    assert not unexpected
    assert all("hyper_connection" in k or "hc_head" in k for k in missing)
    exact_enable_(on)
    ids = tokens()
    with torch.no_grad():
        diff = (on(ids) - off(ids)).abs().max().item()
    assert diff <= 1e-5, diff


def test_exact_enable_is_a_trainable_point():
    """alpha = 0 but W random: the loss has a non-zero gradient w.r.t. every alpha."""
    torch.manual_seed(0)
    on = exact_enable_(HybridModel(tiny_config("M-*", mhc=True)))
    on(tokens()).square().mean().backward()
    for layer in on.decoder.layers:
        hc = layer.hyper_connection
        assert hc.alpha_res.grad.abs().item() > 0 or hc.alpha_pre.grad.abs().item() > 0


def test_megatron_init_is_only_approximate():
    torch.manual_seed(0)
    off = HybridModel(tiny_config("M-M*-"))
    on = HybridModel(tiny_config("M-M*-", mhc=True))
    on.load_state_dict(off_to_on(off.state_dict()), strict=False)
    exact_enable_(on, init="megatron")
    with torch.no_grad():
        diff = (on(tokens()) - off(tokens())).abs().max().item()
    assert diff > 1e-5


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_recompute_gradients_equal(convention):
    grads = []
    for block in (None, 2):
        torch.manual_seed(0)
        cfg = tiny_config("M-*E-", mhc=True, convention=convention, contract="learned",
                          mhc_recompute_layer_num=block)
        model = HybridModel(cfg)
        model(tokens()).square().mean().backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for k in grads[0]:
        assert (grads[0][k] - grads[1][k]).abs().max().item() <= 1e-6, k


def test_recompute_block_plan():
    from mhc_model.stack import block_end_plan

    assert block_end_plan(5, 2) == (False, True, False, True, True)
    assert block_end_plan(3, None) == (True, True, True)


def test_fp32_residual_streams_stay_in_params_dtype():
    torch.manual_seed(0)
    cfg = tiny_config("M-*", mhc=True, dtype="bfloat16").replace(fp32_residual_connection=True)
    model = HybridModel(cfg)
    seen = []
    for layer in model.decoder.layers:
        layer.register_forward_pre_hook(lambda mod, args: seen.append(args[0].dtype))
    logits = model(tokens())
    assert seen == [torch.bfloat16] * 3
    assert torch.isfinite(logits.float()).all()


def test_fp32_residual_mhc_off_accumulates_in_fp32():
    torch.manual_seed(0)
    cfg = tiny_config("M-*", dtype="bfloat16").replace(fp32_residual_connection=True)
    model = HybridModel(cfg)
    seen = []
    for layer in model.decoder.layers:
        layer.register_forward_pre_hook(lambda mod, args: seen.append(args[0].dtype))
    model(tokens())
    assert seen == [torch.bfloat16] * 3  # the branch sees params dtype; the sum is fp32


@pytest.mark.parametrize("shard_bytes", [None, 20_000])
def test_save_and_load_pretrained(tmp_path, shard_bytes):
    torch.manual_seed(0)
    model = HybridModel(tiny_config("M-*E", mhc=True, contract="learned"))
    kwargs = {} if shard_bytes is None else {"max_shard_bytes": shard_bytes}
    model.save_pretrained(tmp_path, **kwargs)
    assert (tmp_path / "model.safetensors.index.json").exists() == (shard_bytes is not None)
    again = HybridModel.from_pretrained(tmp_path)
    assert again.config == model.config
    for k, v in model.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k


@pytest.mark.parametrize("contract", CONTRACTS)
def test_recompute_keeps_no_stream_per_layer(contract):
    """Without recompute autograd keeps one n-stream tensor per layer; with block recompute it
    keeps none (the block inputs live in the block caches, one per block)."""
    counts = {}
    for block in (None, 2):
        torch.manual_seed(0)
        model = HybridModel(tiny_config("M-*E-", mhc=True, contract=contract,
                                        mhc_recompute_layer_num=block))
        counts[block] = saved_stream_storages(model, tokens(), 4, dim=3)
    assert counts[None] >= 5
    assert counts[2] <= (1 if contract == "learned" else 0)
