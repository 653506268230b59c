"""Reference mHC math: Sinkhorn is doubly stochastic, gates lie in their ranges, the two
conventions differ exactly where DESIGN.md §1 says they do."""

import pytest
import torch

from mhc_model import mhc_ref

CONVENTIONS = ["deepseek", "megatron_dsv4"]


@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("n", [2, 3, 4, 6])
def test_sinkhorn_doubly_stochastic(convention, n):
    # Logits of the size the model produces (alpha ~ 0.01 times an O(1) projection plus a bias
    # of O(0.5)); strongly peaked logits converge more slowly, see the next test.
    g = torch.Generator().manual_seed(n)
    logits = torch.randn(64, n, n, generator=g) * 0.5
    M = mhc_ref.sinkhorn(logits, 20, convention)
    assert M.dtype == torch.float32
    assert (M > 0).all()
    torch.testing.assert_close(M.sum(-1), torch.ones(64, n), atol=1e-5, rtol=0)
    torch.testing.assert_close(M.sum(-2), torch.ones(64, n), atol=1e-5, rtol=0)


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_sinkhorn_peaked_logits_converge_with_more_iterations(convention):
    """Both variants end on a column normalisation: columns are exact at any count, rows
    converge geometrically (paper §5.4: the gain "deviates slightly from 1")."""
    logits = torch.randn(256, 4, 4, generator=torch.Generator().manual_seed(7)) * 3
    row_err = []
    for iters in (5, 20, 200):
        M = mhc_ref.sinkhorn(logits, iters, convention)
        torch.testing.assert_close(M.sum(-2), torch.ones(256, 4), atol=1e-5, rtol=0)
        row_err.append((M.sum(-1) - 1).abs().max().item())
    assert row_err[0] > row_err[1] > row_err[2]
    assert row_err[2] < 0.1 * row_err[0]


def test_sinkhorn_conventions_differ():
    logits = torch.randn(8, 4, 4, generator=torch.Generator().manual_seed(0)) * 3
    a = mhc_ref.sinkhorn(logits, 3, "deepseek")
    b = mhc_ref.sinkhorn(logits, 3, "megatron_dsv4")
    assert (a - b).abs().max() > 1e-4


def _coeffs(convention, n=4, C=8, T=16, alpha=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, n, C, generator=g)
    W = torch.randn(n * n + 2 * n, n * C, generator=g)
    b = torch.randn(n * n + 2 * n, generator=g)
    a = torch.full((1,), alpha)
    return x, mhc_ref.coefficients(x, W, b, a, a, a, iters=20, convention=convention)


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_gate_ranges(convention):
    _, (H_pre, H_post, H_res) = _coeffs(convention, alpha=0.3)
    # columns are normalised last, so they are exact whatever the logits
    assert ((H_pre > 0) & (H_pre < 1 + 1e-5)).all()
    assert ((H_post > 0) & (H_post < 2)).all()
    torch.testing.assert_close(H_res.sum(-2), torch.ones_like(H_res.sum(-2)), atol=1e-5, rtol=0)


def test_mix_transpose_convention():
    """deepseek applies H^T, megatron_dsv4 applies H: check against explicit loops."""
    g = torch.Generator().manual_seed(1)
    T, n, C = 3, 3, 5
    x = torch.randn(T, n, C, generator=g)
    H = torch.rand(T, n, n, generator=g)
    post = torch.rand(T, n, generator=g)
    y = torch.randn(T, C, generator=g)
    ds = mhc_ref.mix_post(x, H, post, y, "deepseek")
    mg = mhc_ref.mix_post(x, H, post, y, "megatron_dsv4")
    for t in range(T):
        for i in range(n):
            exp_ds = sum(H[t, j, i] * x[t, j] for j in range(n)) + post[t, i] * y[t]
            exp_mg = sum(H[t, i, j] * x[t, j] for j in range(n)) + post[t, i] * y[t]
            torch.testing.assert_close(ds[t, i], exp_ds)
            torch.testing.assert_close(mg[t, i], exp_mg)


def test_rms_factor_conventions():
    x = torch.randn(4, 32)
    ds = mhc_ref.rms_factor(x, "deepseek")
    mg = mhc_ref.rms_factor(x, "megatron_dsv4")
    torch.testing.assert_close(ds, torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-6))
    torch.testing.assert_close(mg, 1 / (x.norm(dim=-1, keepdim=True) / 32**0.5 + 1e-6))


def test_contract_learned_at_exact_point_is_mean():
    n, C = 4, 8
    x = torch.randn(10, n, C)
    eps = 1e-6
    base = torch.full((n,), float(torch.logit(torch.tensor(1 / n - eps, dtype=torch.float64))))
    out = mhc_ref.contract_learned(x, torch.randn(n, n * C), base, torch.zeros(1), eps)
    torch.testing.assert_close(out, x.mean(1), atol=1e-6, rtol=1e-6)
