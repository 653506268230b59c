"""The fused learned output contract (``triton_head``, DeepSeek-V4 "hc_head") against
``mhc_ref.contract_learned``, forward and the gradients of x, fn, base and scale.

The oracle is the reference on the inputs upcast to fp32 (as ``test_kernels_gpu._check_site``):
its bf16 backward would round the two paths of dx to bf16 before adding them.  Errors and
tolerances as ``test_kernels_gpu.py`` documents them: max|a - b| / max|b|; 1e-2 for
bf16-rounded results (y, dx of bf16 runs), 1e-4 for fp32 quantities from bf16 streams
(dfn, dbase), 5e-5 for fp32 runs; d scale, one scalar summed over T N terms of both signs, is
measured against sum |dh p r| (as ``_alpha_scales``).

``head_errors`` / ``enable_point_units`` take the device so ``tools/interp_head.py`` runs the
same checks on the CPU through the Triton interpreter (fp32 only).
"""

from __future__ import annotations

import math

import pytest
import torch

from mhc_model import kernels as K
from mhc_model import mhc_ref as R

# _exact_fp32_reference: the autouse fixture (no TF32 in the oracle's matmuls), imported to apply
from tests.model.test_kernels_gpu import _exact_fp32_reference, _tol  # noqa: F401
from tests.model.test_megatron_hc_parity import megatron  # noqa: F401 (fixture: the oracle)

pytestmark = pytest.mark.gpu

DTYPES = [torch.bfloat16, torch.float32]
NS = [2, 4, 6]
CS = [1000, 256]  # 256: the aggregate's dx folded into the projection backward; 1000: not
EPS = 1e-6


def _rel(a, b) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


def scale_terms(x, fn, base, scale, eps, dy) -> float:
    """sum_t,n |dh p r|: the size of the terms d scale sums (fp32 reference pieces)."""
    xf = x.detach().reshape(x.shape[0], -1).float()
    r = torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    p = xf @ fn.detach().float().t()
    h = (p * r * scale.detach().float() + base.detach().float()).requires_grad_()
    pre = torch.sigmoid(h) + eps
    y = torch.einsum("tn,tnc->tc", pre, x.detach().float())
    (dh,) = torch.autograd.grad(y, h, dy.float())
    return (dh * p * r).abs().sum().item()


def head_inputs(T_, N, C, dtype, device, seed):
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(T_, N, C, generator=gen, device=device).to(dtype).requires_grad_()
    fn = (torch.randn(N, N * C, generator=gen, device=device) / (N * C) ** 0.5)
    base = torch.randn(N, generator=gen, device=device)
    scale = torch.tensor([0.7], device=device)
    dy = torch.randn(T_, C, generator=gen, device=device).to(dtype)
    return [x, fn.requires_grad_(), base.requires_grad_(), scale.requires_grad_()], dy


def head_errors(T_, N, C, dtype, device="cuda", seed=0, eps=EPS,
                reference=R.contract_learned) -> dict[str, tuple[float, float]]:
    """{name: (error, tolerance)} of the fused head against ``reference`` (the signature of
    ``mhc_ref.contract_learned``) run on the inputs upcast to fp32."""
    inputs, dy = head_inputs(T_, N, C, dtype, device, seed)
    assert K.use_triton(*inputs)
    y = K.contract_learned(*inputs, eps)
    got = torch.autograd.grad(y, inputs, dy)
    ref_in = [t.detach().float().requires_grad_() for t in inputs]
    y_ref = reference(*ref_in, eps)
    want = torch.autograd.grad(y_ref, ref_in, dy.float())
    errs = {"y": (_rel(y, y_ref.to(dtype)), _tol(y, dtype))}
    for name, a, b, t in zip(("dx", "dfn", "dbase"), got, want, inputs):
        assert a.shape == t.shape and a.dtype == t.dtype, name
        assert torch.isfinite(a).all(), name
        errs[name] = (_rel(a, b.to(a.dtype)), _tol(a, dtype))
    dscale = (got[3].float() - want[3]).abs().max().item()
    errs["dscale / sum|terms|"] = (dscale / scale_terms(*inputs, eps, dy), _tol(got[3], dtype))
    return errs


def _assert_within(errs):
    for name, (err, tol) in errs.items():
        print(f"{name}: {err:.2e} (tol {tol:.0e})")  # margins, visible with -s
        assert err <= tol, f"{name}: {err:.3e} > {tol:.0e}"


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp32"])
@pytest.mark.parametrize("C", CS)
@pytest.mark.parametrize("N", NS)
def test_learned_head(N, C, dtype):
    _assert_within(head_errors(77, N, C, dtype, seed=N * 1000 + C))


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp32"])
def test_learned_head_many_tokens(dtype):
    # many token blocks: D-split partials in the forward, T-split dfn partials in the backward
    _assert_within(head_errors(3001, 4, 1000, dtype, seed=3001))


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp32"])
def test_learned_head_large_eps(dtype):
    # eps enters twice (RMS, gate offset); at 1e-6 the offset is below the fp32 tolerance of y
    _assert_within(head_errors(77, 4, 256, dtype, seed=9, eps=0.05))


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp32"])
def test_learned_head_matches_megatron(megatron, dtype):  # noqa: F811 (the imported fixture)
    """Upstream as the oracle: Megatron's ``learned_output_contract`` (dev / dsv4
    ``hyper_connection.py``, streams [s, b, n C], eps = layernorm_epsilon) on CUDA."""
    _, hc, _ = megatron
    T_, N, C = 77, 4, 256

    def theirs(x_TNC, fn, base, scale, eps):
        y = hc.learned_output_contract(x_TNC.reshape(T_, 1, N * C), fn, base, scale, N, eps)
        return y.reshape(T_, C)

    _assert_within(head_errors(T_, N, C, dtype, seed=21, eps=1e-5, reference=theirs))


def enable_point_units(N, C, dtype, device="cuda") -> float:
    """At scale = 0, base = logit(1/n - eps) the head is the stream mean: max over elements
    of |head - contract_mean| less one ulp of the stream dtype's result (bf16; none for fp32),
    in units of 2^-24 mean_j |x_j| (fp32 rounding of pre = 1/n and of the N-term sums)."""
    gen = torch.Generator(device=device).manual_seed(5 + N)
    x = torch.randn(77, N, C, generator=gen, device=device).to(dtype)
    fn = torch.randn(N, N * C, generator=gen, device=device)
    q = 1.0 / N - EPS
    base = torch.full((N,), math.log(q / (1.0 - q)), device=device)
    scale = torch.zeros(1, device=device)
    assert K.use_triton(x, fn, base, scale)
    y = K.contract_learned(x, fn, base, scale, EPS).float()
    mean = K.contract_mean(x).float()
    ulp = torch.zeros_like(mean)
    if dtype == torch.bfloat16:  # one bf16 ulp of the larger: 2^(exponent - 7)
        big = torch.maximum(y.abs(), mean.abs()).clamp_min(2.0**-126)
        ulp = torch.exp2(torch.floor(torch.log2(big)) - 7)
    over = ((y - mean).abs() - ulp).clamp_min(0)
    return (over / (x.float().abs().mean(1) * 2.0**-24)).max().item()


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp32"])
@pytest.mark.parametrize("N", NS)
def test_enable_point_is_the_stream_mean(N, dtype):
    units = enable_point_units(N, 1000, dtype)
    print(f"N={N}: {units:.1f} x 2^-24 mean_j |x_j| beyond one ulp")
    assert units <= 16.0, units
