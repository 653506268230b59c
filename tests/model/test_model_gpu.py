"""Whole model on CUDA: the fused path equals the reference path, and block recompute gives the
same gradients as no recompute (fused kernels are deterministic)."""

import pytest
import torch

from mhc_model import HybridModel, exact_enable_
from mhc_model.conventions import CONVENTIONS
from tests.model.helpers import (
    off_to_on,
    perturb_norms_,
    saved_stream_storages,
    tiny_config,
    tokens,
)

pytestmark = pytest.mark.gpu


def _grads(cfg, monkeypatch, kernels: str):
    monkeypatch.setenv("MHC_KERNELS", kernels)
    torch.manual_seed(0)
    model = HybridModel(cfg).cuda()
    ids = tokens().cuda()
    logits = model(ids)
    logits.float().square().mean().backward()
    return logits.detach().float(), {k: p.grad.float() for k, p in model.named_parameters()
                                     if p.grad is not None}


@pytest.mark.parametrize("convention", list(CONVENTIONS))
def test_fused_equals_reference_fp32(monkeypatch, convention):
    cfg = tiny_config("M-*E-", mhc=True, convention=convention, contract="learned")
    la, ga = _grads(cfg, monkeypatch, "")
    lb, gb = _grads(cfg, monkeypatch, "reference")
    torch.testing.assert_close(la, lb, atol=1e-4, rtol=1e-4)
    # alpha gradients are sums of many cancelling terms and can be ~1e-10: measure every error
    # against max(own scale, 1e-3 x the model's largest gradient), not against ~0
    top = max(g.abs().max().item() for g in gb.values())
    for k in ga:
        scale = max(gb[k].abs().max().item(), 1e-3 * top)
        assert (ga[k] - gb[k]).abs().max().item() / scale < 1e-3, k


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_recompute_gradients_equal_fused(monkeypatch, dtype):
    """Block recompute runs the same fused site backward on bitwise-equal recomputed streams
    (``mhc_model.recompute``), so every gradient is bitwise the one without recompute."""
    base = tiny_config("M-*E-G", mhc=True, contract="learned", dtype=dtype)
    l0, g0 = _grads(base, monkeypatch, "")
    l1, g1 = _grads(base.with_mhc(mhc_recompute_layer_num=2), monkeypatch, "")
    assert torch.equal(l0, l1)
    assert g0.keys() == g1.keys()
    for k in g0:
        assert torch.equal(g0[k], g1[k]), k


def test_recompute_fused_saves_no_stream(monkeypatch):
    """With block recompute the fused sites save no n-stream tensor for backward (the block
    inputs live in the block caches); without it every site saves its input."""
    monkeypatch.setenv("MHC_KERNELS", "")
    counts = {}
    for block in (None, 2):
        torch.manual_seed(0)
        cfg = tiny_config("M-*E-", mhc=True, contract="mean", mhc_recompute_layer_num=block)
        model = HybridModel(cfg).cuda()
        # any rank: the fused site saves x as [T, n C]
        counts[block] = saved_stream_storages(model, tokens().cuda(),
                                              cfg.mhc.num_residual_streams)
    assert counts[None] >= 5
    assert counts[2] == 0


def test_exact_enable_on_cuda_fp32(monkeypatch):
    monkeypatch.setenv("MHC_KERNELS", "")
    torch.manual_seed(0)
    off = HybridModel(tiny_config("M-M*-E")).cuda()
    perturb_norms_(off)
    on = HybridModel(tiny_config("M-M*-E", mhc=True, contract="learned")).cuda()
    on.load_state_dict(off_to_on(off.state_dict()), strict=False)
    exact_enable_(on)
    ids = tokens().cuda()
    with torch.no_grad():
        assert (on(ids) - off(ids)).abs().max().item() <= 1e-5
