"""Each convention of the reference mHC math (DESIGN.md §1 table) against an independent naive
computation written here: Python loops over scalars in float64, from the same fp32 inputs.

Away from the exact-init point on purpose (non-trivial alpha, bias and W), and with few
Sinkhorn iterations, where each iteration still moves the matrix: an off-by-one in the count,
a changed H_pre eps, a transposed mix or a different RMS factor all show up here, while the
exact point (alpha = 0) hides most of them.
"""

from __future__ import annotations

import math

import pytest
import torch

from mhc_model import mhc_ref

EPS = 1e-6
# DESIGN.md §1, restated here on purpose (not read from mhc_model.conventions): per convention
# (Sinkhorn form, mix applies H^T, H_pre gets + eps, RMS factor form).
TABLE = {
    "deepseek": ("softmax_first", True, True, "rsqrt_mean"),
    "megatron_dev": ("softmax_first", True, True, "inv_norm"),
    "megatron_dsv4": ("exp_rowmax", False, False, "inv_norm"),
}
CONVENTIONS = sorted(TABLE)


def naive_sinkhorn(L: list[list[float]], iters: int, form: str) -> list[list[float]]:
    n = len(L)

    def rows(M):
        return [[v / (sum(r) + EPS) for v in r] for r in M]

    def cols(M):
        s = [sum(M[i][j] for i in range(n)) for j in range(n)]
        return [[M[i][j] / (s[j] + EPS) for j in range(n)] for i in range(n)]

    if form == "softmax_first":  # softmax per row + eps, a column step, (iters-1) x {row, col}
        M = []
        for r in L:
            e = [math.exp(v - max(r)) for v in r]
            M.append([v / sum(e) + EPS for v in e])
        M = cols(M)
        for _ in range(iters - 1):
            M = cols(rows(M))
        return M
    M = [[math.exp(v - max(r)) for v in r] for r in L]  # exp_rowmax: iters x {row, col}
    for _ in range(iters):
        M = cols(rows(M))
    return M


def naive_site(x, W, b, alphas, iters, convention, y):
    """(H_pre, H_post, H_res, x') per token, every step a scalar loop."""
    sink, transposed, pre_eps, rms = TABLE[convention]
    T, n, C = x.shape
    X, Wd, bd = x.double().tolist(), W.double().tolist(), b.double().tolist()
    Y = y.double().tolist()
    a_pre, a_post, a_res = (float(a) for a in alphas)
    sig = lambda v: 1.0 / (1.0 + math.exp(-v))  # noqa: E731
    out = []
    for t in range(T):
        xf = [v for s in X[t] for v in s]
        D = len(xf)
        if rms == "rsqrt_mean":
            r = 1.0 / math.sqrt(sum(v * v for v in xf) / D + EPS)
        else:
            r = 1.0 / (math.sqrt(sum(v * v for v in xf)) / math.sqrt(D) + EPS)
        scale = [a_pre] * n + [a_post] * n + [a_res] * (n * n)
        h = [r * sum(Wd[k][d] * xf[d] for d in range(D)) * scale[k] + bd[k]
             for k in range(n * n + 2 * n)]
        pre = [sig(h[j]) + (EPS if pre_eps else 0.0) for j in range(n)]
        post = [2.0 * sig(h[n + j]) for j in range(n)]
        H = naive_sinkhorn([[h[2 * n + i * n + j] for j in range(n)] for i in range(n)],
                           iters, sink)
        mixed = []
        for i in range(n):
            coef = [H[j][i] if transposed else H[i][j] for j in range(n)]
            mixed.append([sum(coef[j] * X[t][j][c] for j in range(n)) + post[i] * Y[t][c]
                          for c in range(C)])
        out.append((pre, post, H, mixed))
    return out


def _inputs(n, C, T=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, n, C, generator=g)
    W = torch.randn(n * n + 2 * n, n * C, generator=g) * 0.3
    b = torch.randn(n * n + 2 * n, generator=g)
    alphas = (torch.tensor([0.7]), torch.tensor([-0.4]), torch.tensor([1.3]))
    y = torch.randn(T, C, generator=g)
    return x, W, b, alphas, y


@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("iters", [1, 2, 3, 20])
@pytest.mark.parametrize("n,C", [(2, 3), (4, 8)])
def test_site_matches_naive(convention, iters, n, C):
    x, W, b, alphas, y = _inputs(n, C, seed=iters)
    H_pre, H_post, H_res = mhc_ref.coefficients(x, W, b, *alphas, iters=iters,
                                                convention=convention)
    out = mhc_ref.mix_post(x, H_res, H_post, y, convention)
    ref = naive_site(x, W, b, alphas, iters, convention, y)
    pre_ref = torch.tensor([r[0] for r in ref], dtype=torch.float64)
    # H_pre to well under the 1e-6 eps (the deepseek/dsv4 difference is exactly that eps)
    torch.testing.assert_close(H_pre.double(), pre_ref, atol=4e-7, rtol=0)
    torch.testing.assert_close(H_post.double(), torch.tensor([r[1] for r in ref],
                                                             dtype=torch.float64),
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(H_res.double(), torch.tensor([r[2] for r in ref],
                                                            dtype=torch.float64),
                               atol=2e-6, rtol=0)
    torch.testing.assert_close(out.double(), torch.tensor([r[3] for r in ref],
                                                          dtype=torch.float64),
                               atol=5e-6, rtol=0)


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_site_matches_naive_for_tiny_streams(convention):
    """Streams of RMS ~1e-6, where the conventions' RMS factors part ways (eps inside the
    square root vs added to the norm: r ~ 1e3 vs ~5e5): at O(1) streams they agree to 1e-6."""
    x, W, b, alphas, y = _inputs(4, 8, seed=5)
    x = x * 1e-6
    H_pre, H_post, H_res = mhc_ref.coefficients(x, W, b, *alphas, iters=3,
                                                convention=convention)
    ref = naive_site(x, W, b, alphas, 3, convention, y)
    for got, k in ((H_pre, 0), (H_post, 1), (H_res, 2)):
        want = torch.tensor([r[k] for r in ref], dtype=torch.float64)
        torch.testing.assert_close(got.double(), want, atol=2e-6, rtol=0)


def test_table_covers_every_convention():
    from mhc_model.conventions import CONVENTIONS as RECORDS

    assert set(TABLE) == set(RECORDS)


def test_inputs_are_far_from_the_exact_point():
    """The comparison above means something only if the mHC terms matter: H_res is far from
    uniform and not symmetric (a transposed mix differs), H_pre far from 1/n."""
    x, W, b, alphas, _ = _inputs(4, 8, seed=3)
    H_pre, _, H_res = mhc_ref.coefficients(x, W, b, *alphas, iters=3, convention="deepseek")
    assert (H_res - H_res.transpose(-1, -2)).abs().max() > 0.1
    assert (H_pre - 0.25).abs().max() > 0.1
