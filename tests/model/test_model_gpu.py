"""Whole model on CUDA: the fused path equals the reference path, and block recompute gives the
same gradients as no recompute (fused kernels are deterministic)."""

import pytest
import torch

from mhc_model import HybridModel, exact_enable_
from mhc_model.conventions import CONVENTIONS
from tests.model.helpers import off_to_on, perturb_norms_, tiny_config, tokens

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
    base = tiny_config("M-*E-G", mhc=True, contract="learned", dtype=dtype)
    _, g0 = _grads(base, monkeypatch, "")
    _, g1 = _grads(base.with_mhc(mhc_recompute_layer_num=2), monkeypatch, "")
    # Same forward kernels on bitwise-equal recomputed inputs; dx is summed differently (plain:
    # the fused site adds its three terms in fp32 inside one kernel; recompute: autograd sums
    # the unfused ops' terms), one rounding apart, hence the tolerances.
    # bf16: two bf16 ulps (2 x 2^-7) of the gradient scale: a missing or doubled gradient term
    # shows up as an O(1) relative error, far above this (measured worst case: ~2 ulps).
    tol = 1e-6 if dtype == "float32" else 1.6e-2
    top = max(g.abs().max().item() for g in g0.values())
    for k in g0:
        if dtype == "float32":
            scale = max(1.0, g0[k].abs().max().item())
        else:
            # dx of the bf16 streams is summed in a different association (plain: three autograd
            # edges; recompute: _Pre's two, then _Post's): one bf16 rounding of dx that then
            # propagates upstream, so cancellation-heavy sums (alpha grads) are measured
            # against the model's gradient scale.
            scale = max(g0[k].abs().max().item(), 1e-2 * top)
        assert (g0[k] - g1[k]).abs().max().item() <= tol * scale, k


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
