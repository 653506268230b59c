"""Reference mHC math: Sinkhorn is doubly stochastic, gates lie in their ranges, the two
conventions differ exactly where DESIGN.md §1 says they do."""

import pytest
import torch

from mhc_model import mhc_ref
from mhc_model.conventions import CONVENTIONS as TABLE

CONVENTIONS = list(TABLE)


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


def _naive_coefficients(x, W, b, alphas, iters, eps, *, softmax_first, pre_eps, inv_norm):
    """Per-token, per-entry loops in float64, written from DESIGN.md §1's table (no torch
    reductions over the mapping, no shared code with mhc_ref)."""
    import math

    T, n, C = x.shape
    K = n * n + 2 * n
    pre, post, res = [], [], []
    for t in range(T):
        xf = [float(v) for v in x[t].reshape(-1)]
        ss = sum(v * v for v in xf)
        r = (1.0 / (math.sqrt(ss) / math.sqrt(len(xf)) + eps) if inv_norm
             else 1.0 / math.sqrt(ss / len(xf) + eps))
        proj = [sum(float(W[k, d]) * xf[d] for d in range(len(xf))) for k in range(K)]
        scale = [alphas[0]] * n + [alphas[1]] * n + [alphas[2]] * (n * n)
        h = [r * proj[k] * scale[k] + float(b[k]) for k in range(K)]
        sig = [1.0 / (1.0 + math.exp(-v)) for v in h]
        pre.append([s + (eps if pre_eps else 0.0) for s in sig[:n]])
        post.append([2.0 * s for s in sig[n:2 * n]])
        L = [[h[2 * n + i * n + j] for j in range(n)] for i in range(n)]

        def rows(M):
            return [[M[i][j] / (sum(M[i]) + eps) for j in range(n)] for i in range(n)]

        def cols(M):
            cs = [sum(M[i][j] for i in range(n)) for j in range(n)]
            return [[M[i][j] / (cs[j] + eps) for j in range(n)] for i in range(n)]

        if softmax_first:
            M = []
            for i in range(n):
                e = [math.exp(v - max(L[i])) for v in L[i]]
                M.append([v / sum(e) + eps for v in e])
            M = cols(M)
            steps = iters - 1
        else:
            M = [[math.exp(v - max(L[i])) for v in L[i]] for i in range(n)]
            steps = iters
        for _ in range(steps):
            M = cols(rows(M))
        res.append(M)
    f64 = torch.float64
    return torch.tensor(pre, dtype=f64), torch.tensor(post, dtype=f64), torch.tensor(res, dtype=f64)


@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("rms", [1.0, 0.02])
@pytest.mark.parametrize("n", [2, 3])
def test_coefficients_match_a_naive_loop(convention, rms, n):
    """Every table row against loops driven by its fields; rms 0.02 is where the RMS forms
    differ most (the +eps sits outside vs inside the square root)."""
    conv = TABLE[convention]
    g = torch.Generator().manual_seed(10 * n)
    T, C, iters, eps = 4, 5, 7, 1e-6
    x = rms * torch.randn(T, n, C, generator=g)
    W = torch.randn(n * n + 2 * n, n * C, generator=g) / (n * C) ** 0.5
    b = 0.5 * torch.randn(n * n + 2 * n, generator=g)
    alphas = (0.7, 1.3, 0.9)
    got = mhc_ref.coefficients(x, W, b, *(torch.tensor([a]) for a in alphas), iters=iters,
                               convention=convention, eps=eps)
    want = _naive_coefficients(x.double(), W.double(), b.double(), alphas, iters, eps,
                               softmax_first=conv.sinkhorn == "softmax_first",
                               pre_eps=conv.h_pre_eps, inv_norm=conv.rms_factor == "inv_norm")
    for a, w in zip(got, want):
        torch.testing.assert_close(a.double(), w, atol=2e-6, rtol=2e-6)


def test_megatron_dev_combines_deepseek_sinkhorn_with_the_norm_rms():
    """megatron_dev = deepseek's Sinkhorn, H^T mix and +eps on H_pre, megatron_dsv4's RMS."""
    logits = torch.randn(8, 4, 4, generator=torch.Generator().manual_seed(0)) * 3
    assert torch.equal(mhc_ref.sinkhorn(logits, 5, "megatron_dev"),
                       mhc_ref.sinkhorn(logits, 5, "deepseek"))
    x = 0.02 * torch.randn(4, 32)
    assert torch.equal(mhc_ref.rms_factor(x, "megatron_dev"),
                       mhc_ref.rms_factor(x, "megatron_dsv4"))
    assert not torch.allclose(mhc_ref.rms_factor(x, "megatron_dev"),
                              mhc_ref.rms_factor(x, "deepseek"), rtol=1e-4, atol=0)
    g = torch.Generator().manual_seed(1)
    xs, H = torch.randn(3, 3, 5, generator=g), torch.rand(3, 3, 3, generator=g)
    post, y = torch.rand(3, 3, generator=g), torch.randn(3, 5, generator=g)
    assert torch.equal(mhc_ref.mix_post(xs, H, post, y, "megatron_dev"),
                       mhc_ref.mix_post(xs, H, post, y, "deepseek"))


@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("n", [2, 3, 4])
def test_exact_pre_bias_sums_to_one(convention, n):
    """At the exact enable point sum_j H_pre[j] = 1 under each convention's H_pre eps."""
    from mhc_model.hyper_connection import exact_hc_tensors
    from tests.model.helpers import tiny_config

    cfg = tiny_config("-", mhc=True, n=n, convention=convention)
    p = exact_hc_tensors(cfg, 0)
    x = torch.randn(6, n, cfg.hidden_size)
    H_pre, H_post, _ = mhc_ref.coefficients(
        x, p["mapping_proj.weight"], p["bias"], p["alpha_pre"], p["alpha_post"], p["alpha_res"],
        iters=20, convention=convention)
    torch.testing.assert_close(H_pre.sum(-1), torch.ones(6), atol=2e-7, rtol=0)
    torch.testing.assert_close(H_post, torch.ones(6, n))


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_learned_head_exact_point_uses_the_convention_eps(convention):
    """exact_head_tensors and the stack's head use the same eps (mhc_eps for deepseek, the
    model's norm_eps for the Megatron conventions), so the head returns the stream mean."""
    from mhc_model.hyper_connection import exact_head_tensors, head_eps
    from tests.model.helpers import tiny_config

    cfg = tiny_config("-", mhc=True, n=4, convention=convention, contract="learned")
    want = cfg.mhc.mhc_eps if TABLE[convention].head_eps == "mhc_eps" else cfg.norm_eps
    assert head_eps(cfg) == want
    p = exact_head_tensors(cfg)
    x = torch.randn(10, 4, cfg.hidden_size)
    out = mhc_ref.contract_learned(x, p["hc_head_fn"], p["hc_head_base"], p["hc_head_scale"],
                                   head_eps(cfg))
    torch.testing.assert_close(out, x.mean(1), atol=1e-6, rtol=1e-6)


def test_site_pre_reference_path_refuses_recompute_links():
    """``streams``/``done`` only mean something on the fused path; the reference path would
    silently keep x under autograd, so it refuses them (``mhc_model.recompute`` checks
    ``use_triton`` and recomputes through its own Functions there)."""
    from mhc_model import kernels

    T, n, C = 3, 4, 8
    K = n * n + 2 * n
    args = (torch.randn(T, n, C), torch.randn(K, n * C), torch.zeros(K), *torch.ones(3, 1))
    u, H_post, H_res, link = kernels.site_pre(*args, iters=3, convention="deepseek")
    assert link is None and u.shape == (T, C)
    with pytest.raises(ValueError, match="fused path"):
        kernels.site_pre(*args, iters=3, convention="deepseek", streams=lambda: args[0])


def test_contract_learned_dispatch_is_the_reference_off_cuda():
    """``kernels.contract_learned`` on CPU tensors is ``mhc_ref.contract_learned``: same values
    and gradients, bitwise."""
    from mhc_model import kernels

    g = torch.Generator().manual_seed(0)
    T, n, C = 5, 4, 8
    ins = [torch.randn(T, n, C, generator=g), torch.randn(n, n * C, generator=g),
           torch.randn(n, generator=g), torch.tensor([0.7])]
    ins = [t.requires_grad_() for t in ins]
    assert not kernels.use_triton(*ins)
    got = kernels.contract_learned(*ins, 1e-5)
    want = mhc_ref.contract_learned(*ins, 1e-5)
    assert torch.equal(got, want)
    dy = torch.randn(T, C, generator=g)
    for a, b in zip(torch.autograd.grad(got, ins, dy), torch.autograd.grad(want, ins, dy)):
        assert torch.equal(a, b)


def test_stack_contract_runs_the_dispatched_learned_head(monkeypatch):
    """The model's learned contract goes through ``kernels.contract_learned`` (the fused head on
    CUDA) with the decoder's head parameters and the convention's head eps."""
    from mhc_model import HybridModel, kernels
    from mhc_model.hyper_connection import head_eps
    from tests.model.helpers import tiny_config, tokens

    cfg = tiny_config("-", mhc=True, contract="learned")
    model = HybridModel(cfg)
    seen = []

    def spy(x, fn, base, scale, eps):
        seen.append((fn, base, scale, eps))
        return mhc_ref.contract_learned(x, fn, base, scale, eps)

    monkeypatch.setattr(kernels, "contract_learned", spy)
    model(tokens())
    d = model.decoder
    assert len(seen) == 1
    fn, base, scale, eps = seen[0]
    assert fn is d.hc_head_fn and base is d.hc_head_base and scale is d.hc_head_scale
    assert eps == head_eps(cfg)
