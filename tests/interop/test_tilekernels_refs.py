"""Our ``deepseek`` convention against DeepSeek TileKernels' own torch references.

The fixture (fixtures/tilekernels/make.py, deepseek-ai/TileKernels 36d9e45d) holds one mHC
site computed by ``tile_kernels/torch/mhc.py``: pre_norm_fn -> pre_split_mixes ->
sinkhorn_normalize -> pre_apply_mix, then post, with the DeepSeek-V4 constants.  Our reference
(``mhc_model.mhc_ref``) must give the same H_pre / H_post / H_res (TileKernels' pre / post /
comb), the same aggregate u and the same stream update, from the same parameters: fn is our
``mapping_proj.weight`` (rows pre | post | res), scale our three alphas, base our bias; and the
learned output contract must equal TileKernels' ``mhc_head``.

The fixture's values were computed on the machine that wrote it. The projection is a GEMM,
whose summation order MKL picks by CPU: the fixture's first version, written on another
machine, differed in the last bits of 2 of its 6 tokens on an AVX-512 Sapphire Rapids box. So
the projection is compared within the error bound of two summation orders, and everything
after it is fed TileKernels' own intermediates and compared bitwise: those steps are
elementwise, the same on any machine.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from mhc_model import mhc_ref
from mhc_model.conventions import convention
from tests.paths import TILEKERNELS_SITE as SITE


@pytest.fixture(scope="module")
def tk():
    with safe_open(str(SITE), "pt") as f:
        meta = json.loads(f.metadata()["fixture"])
        names = f.keys()  # a safe_open handle is not iterable
        return meta, {k: f.get_tensor(k) for k in names}


def _ours(meta, t, iters=None, conv="deepseek"):
    N = meta["N"]
    x_TNC = t["x"].reshape(-1, N, meta["C"])
    a_pre, a_post, a_res = t["scale"].reshape(3, 1)
    H_pre, H_post, H_res = mhc_ref.coefficients(
        x_TNC, t["fn"], t["base"], a_pre, a_post, a_res, iters=iters or meta["iters"],
        convention=conv, eps=meta["eps"])
    return x_TNC, H_pre, H_post, H_res


def test_fixture_names_its_upstream_commit(tk):
    meta, _ = tk
    assert meta["tilekernels_commit"] == "36d9e45d38e204ebb87e6f6e833821eee0482fe5"
    assert (meta["post_mult"], meta["iters"]) == (2.0, 20)


def _theirs(meta, t):
    N = meta["N"]
    return t["pre"].reshape(-1, N), t["post"].reshape(-1, N), t["comb"].reshape(-1, N, N)


def test_projection_matches_tilekernels_within_the_gemm_bound(tk):
    # TileKernels' pre_norm_fn (mixes = rsqrt(mean x^2 + eps) * x @ fn^T) against our
    # r * proj: two fp32 dot products of D terms in different orders differ by at most
    # 2 D u sum|x w| (u = 2^-24), times r; plus a few ulps of r and of the product
    meta, t = tk
    N, C = meta["N"], meta["C"]
    x_TD = t["x"].reshape(-1, N * C).float()
    r_T1 = mhc_ref.rms_factor(x_TD, convention("deepseek"), meta["eps"])
    ours = r_T1 * (x_TD @ t["fn"].t())
    theirs = t["mixes"].reshape(ours.shape)
    u = 2.0**-24
    bound = 2 * N * C * u * r_T1 * (x_TD.abs() @ t["fn"].abs().t()) + 8 * u * theirs.abs()
    assert ((ours - theirs).abs() <= bound).all(), (ours - theirs).abs().max().item()
    # the bound is not vacuous: the weight rounded to bf16 (a projection off the fp32 path)
    # breaks it
    bf16 = r_T1 * (x_TD @ t["fn"].bfloat16().float().t())
    assert not ((bf16 - theirs).abs() <= bound).all()


def test_rms_factor_matches_tilekernels_bitwise(tk):
    # pre_norm_fn with a one-hot fn (norm_probe): the RMS factor times single entries of x,
    # no summation order involved, so equal on any machine; Megatron's inv_norm factor
    # (1 / (rms + eps)) or a missing eps differ
    meta, t = tk
    N, C = meta["N"], meta["C"]
    K = 2 * N + N * N
    x_TD = t["x"].reshape(-1, N * C).float()
    cols = t["norm_probe_cols"]
    theirs = t["norm_probe"].reshape(-1, K)
    for conv, eps, same in (("deepseek", meta["eps"], True), ("megatron_dev", meta["eps"], False),
                            ("deepseek", 0.0, False)):
        r_T1 = mhc_ref.rms_factor(x_TD, convention(conv), eps)
        assert torch.equal(r_T1 * x_TD[:, cols], theirs) is same, (conv, eps)


def test_coefficients_match_tilekernels_bitwise(tk):
    # from TileKernels' own projection (mixes): the same fp32 elementwise operations in the
    # same order (alpha / bias, gates, Sinkhorn): equal, not merely close
    meta, t = tk
    N = meta["N"]
    h_TK = t["mixes"].reshape(-1, 2 * N + N * N) * mhc_ref.alpha_lanes(*t["scale"], N) + t["base"]
    ours = mhc_ref.mappings(h_TK, N, iters=meta["iters"], convention="deepseek", eps=meta["eps"])
    for name, a, b in zip(("H_pre", "H_post", "H_res"), ours, _theirs(meta, t)):
        assert torch.equal(a, b), f"{name}: max |diff| {(a - b).abs().max().item():.3e}"


@pytest.mark.parametrize("conv,iters", [("megatron_dev", 20), ("megatron_dsv4", 20),
                                        ("deepseek", 10)])
def test_other_conventions_and_iteration_counts_differ(tk, conv, iters):
    # the bitwise check can fail: Megatron dev's norm-based RMS factor (1 / (rms + eps)),
    # dsv4's Sinkhorn, or TileKernels' default of 10 iterations each give another result
    meta, t = tk
    _, *ours = _ours(meta, t, iters=iters, conv=conv)
    assert any(not torch.equal(a, b) for a, b in zip(ours, _theirs(meta, t)))


def test_aggregate_and_stream_update_match_tilekernels(tk):
    # TileKernels' own mappings in (their projection is machine-dependent: see the docstring)
    meta, t = tk
    N, C = meta["N"], meta["C"]
    x_TNC = t["x"].reshape(-1, N, C)
    H_pre, H_post, H_res = _theirs(meta, t)
    u = mhc_ref.aggregate(x_TNC, H_pre)
    torch.testing.assert_close(u, t["u"].reshape(-1, C), rtol=0, atol=0)
    out = mhc_ref.mix_post(x_TNC, H_res, H_post, t["y"].reshape(-1, C), "deepseek")
    ref = t["out"].reshape(out.shape)
    # both round an fp32 result to bf16 once; products summed in another order may land
    # on the other side of a rounding boundary: at most one bf16 ulp apart
    ulp = torch.finfo(torch.bfloat16).eps * ref.float().abs().clamp_min(1e-30)
    assert ((out.float() - ref.float()).abs() <= ulp).all()
    assert (out != ref).float().mean() < 0.05


def test_learned_head_matches_tilekernels(tk):
    # TileKernels' mhc_head (the learned output contract, DeepSeek-V4 "hc_head") against ours
    meta, t = tk
    N, C = meta["N"], meta["C"]
    x_TNC = t["x"].reshape(-1, N, C)
    y = mhc_ref.contract_learned(x_TNC, t["head_fn"], t["head_base"], t["head_scale"],
                                 meta["eps"])
    ref = t["head_out"].reshape(y.shape)
    assert torch.equal(y, ref)  # one fp32 sum over the N streams, rounded once: equal
    # the check can fail: without the eps terms (RMS and mix) the head gives another result
    y0 = mhc_ref.contract_learned(x_TNC, t["head_fn"], t["head_base"], t["head_scale"], 0.0)
    assert not torch.equal(y0, ref)
