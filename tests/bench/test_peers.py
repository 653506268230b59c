"""bench/peers.py: the TileKernels peer wraps each site with the layer's own parameters and
the deepseek constants; through our reference it gives our model bitwise (the GPU bench run
compares it with ours on the real kernels too)."""

from __future__ import annotations

import copy
import sys
import types

import pytest
import torch

from mhc_model import HybridConfig, HybridModel, mhc_ref
from mhc_model.config import MHCConfig, MLPConfig
from tests.paths import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import peers  # noqa: E402


def _fake_functional(calls: list) -> types.SimpleNamespace:
    """TileKernels' ``mhc_pre`` / ``mhc_post`` API (tile_kernels/modeling/mhc/functional.py),
    computed with our reference, which tests/interop/test_tilekernels_refs.py shows equal to
    TileKernels' own torch references; every keyword it is given takes effect."""

    def mhc_pre(residual, fn, scale, base, *, norm_eps, mhc_mult, post_mult_value, pre_eps,
                sinkhorn_eps, sinkhorn_repeat):
        calls.append(dict(norm_eps=norm_eps, mhc_mult=mhc_mult, post_mult_value=post_mult_value,
                          pre_eps=pre_eps, sinkhorn_eps=sinkhorn_eps, iters=sinkhorn_repeat))
        assert norm_eps == pre_eps == sinkhorn_eps  # our reference has one eps
        a, b, N, C = residual.shape
        x = residual.reshape(a * b, N, C)
        pre, post, comb = mhc_ref.coefficients(x, fn, base, *scale.reshape(3, 1),
                                               iters=sinkhorn_repeat, convention="deepseek",
                                               eps=norm_eps)
        post = post / 2.0 * post_mult_value  # ours is 2 sigmoid: TileKernels' multiplier
        u = mhc_ref.aggregate(x, pre).reshape(a, b, C)
        return u, (post.reshape(a, b, N, 1), comb.reshape(a, b, N, N))

    def mhc_post(y, residual, post, comb):
        a, b, N, C = residual.shape
        out = mhc_ref.mix_post(residual.reshape(a * b, N, C), comb.reshape(a * b, N, N),
                               post.reshape(a * b, N), y.reshape(a * b, C), "deepseek")
        return out.reshape(a, b, N, C)

    return types.SimpleNamespace(mhc_pre=mhc_pre, mhc_post=mhc_post)


def _model(**mhc):
    cfg = HybridConfig(hybrid_layer_pattern="--", hidden_size=32, vocab_size=64,
                       mlp=MLPConfig(ffn_hidden_size=64, activation="swiglu"),
                       mhc=MHCConfig(enable_hyper_connections=True, **mhc))
    torch.manual_seed(0)
    m = HybridModel(cfg)
    with torch.no_grad():  # off the exact-init point, so every gate and H_res matters
        for name, p in m.named_parameters():
            if "hyper_connection" in name:
                p.add_(0.3 * torch.randn_like(p))
    return m


def test_tilekernels_sites_compute_our_model_with_the_layers_own_parameters():
    ours = _model(mhc_sinkhorn_iterations=7)
    calls: list = []
    theirs = peers.tilekernels_sites(copy.deepcopy(ours), fx=_fake_functional(calls))
    assert all(isinstance(layer, peers._TileKernelsSite) for layer in theirs.decoder.layers)
    assert calls[0] == dict(norm_eps=1e-6, mhc_mult=4, post_mult_value=2.0, pre_eps=1e-6,
                            sinkhorn_eps=1e-6, iters=7)
    assert theirs.tilekernels_parity == 0.0  # the same reference math: bitwise
    ids = torch.randint(0, 64, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = ours(ids), theirs(ids)
    assert torch.equal(b, a), (b - a).abs().max()
    # the peer's parameters are its own copies, trained by its own backward
    theirs(ids).float().sum().backward()
    site = theirs.decoder.layers[0]
    assert site.fn.grad is not None and site.scale.grad is not None and site.base.grad is not None


def test_tilekernels_sites_refuse_other_conventions():
    with pytest.raises(ValueError, match="deepseek convention"):
        peers.tilekernels_sites(_model(mhc_convention="megatron_dev"), fx=_fake_functional([]))
