"""Fused Triton mHC kernels vs the reference (mhc_model.mhc_ref), forward and gradients.

Errors are measured relative to the largest reference magnitude, max|a - b| / max|b|.
Tolerances, by what the compared quantity is:
  * rounded to bf16 (outputs / stream grads of bf16 runs): 1e-2. One bf16 ulp is at most
    2^-7 = 7.8e-3 of the max; fp32 results that differ by float noise can round one ulp apart.
  * fp32 quantity computed from bf16 streams (H_*, dW, dbias, dalpha, dH_*): 1e-4. The
    kernels split fp32 weights / dproj into two bf16 terms (~2^-16 relative each).
  * fp32 runs: 5e-5 (different summation order over N*C and T; exact fp32 dot products).
The alpha gradients are scalars summed over T*K terms of both signs, so (as in the usual
summation error bound) their error is measured relative to the sum of the absolute terms
sum |dh * r * proj| of their group, with the same tolerances.
"""

from __future__ import annotations

import pytest
import torch

from mhc_model import kernels as K
from mhc_model import mhc_ref as R
from mhc_model.conventions import CONVENTIONS

pytestmark = pytest.mark.gpu

CONVS = list(CONVENTIONS)  # every row of the table
DTYPES = [torch.bfloat16, torch.float32]
NS = [2, 4, 6]
CS = [1000, 256]
T = 77


@pytest.fixture(autouse=True)
def _exact_fp32_reference():
    # the oracle must be true fp32 (no TF32 in torch's matmul)
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def _tol(t: torch.Tensor, stream_dtype: torch.dtype) -> float:
    if t.dtype == torch.bfloat16:
        return 1e-2
    return 1e-4 if stream_dtype == torch.bfloat16 else 5e-5


def _check(name, got, ref, stream_dtype):
    assert got.shape == ref.shape and got.dtype == ref.dtype, (name, got.shape, ref.shape)
    assert torch.isfinite(got).all(), name
    err = ((got.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30))
    tol = _tol(ref, stream_dtype)
    print(f"{name}: rel err {err.item():.2e} (tol {tol:.0e})")  # margins, visible with -s
    assert err.item() <= tol, f"{name}: rel err {err.item():.3e} > {tol:.0e}"


def _run(fn, inputs, seed=123):
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    gen = torch.Generator(device="cuda").manual_seed(seed)
    gouts = [torch.randn(o.shape, generator=gen, device="cuda").to(o.dtype) for o in outs]
    grads = torch.autograd.grad(outs, inputs, gouts)
    return outs, grads, gouts


def _coef_inputs(N, C, dtype, gen, T_=T):
    D, Kd = N * C, N * N + 2 * N
    x = torch.randn(T_, N, C, generator=gen, device="cuda").to(dtype).requires_grad_()
    W = (torch.randn(Kd, D, generator=gen, device="cuda") / D**0.5).requires_grad_()
    b = torch.randn(Kd, generator=gen, device="cuda").requires_grad_()
    alphas = [torch.tensor([v], device="cuda").requires_grad_() for v in (0.8, 1.1, 1.3)]
    return [x, W, b, *alphas]


def _alpha_scales(inputs, gouts, iters, conv):
    """sum_t,k |dh * r * proj| per alpha group (pre, post, res), from reference pieces."""
    x, W, b, *al = (t.detach() for t in inputs)
    T_, N, C = x.shape
    xf = x.reshape(T_, N * C).float()
    proj = xf @ W.float().t()
    r = R.rms_factor(xf, conv)
    h = (r * proj * R.alpha_lanes(*al, N) + b.float()).requires_grad_()
    (dh,) = torch.autograd.grad(R.mappings(h, N, iters=iters, convention=conv), h, gouts)
    terms = (dh * r * proj).abs()
    return terms[:, :N].sum(), terms[:, N : 2 * N].sum(), terms[:, 2 * N :].sum()


def _check_coefficients(inputs, iters, conv):
    dtype = inputs[0].dtype

    def f(impl):
        return lambda *a: impl.coefficients(*a, iters=iters, convention=conv)

    assert K.use_triton(*inputs)
    got, ggot, _ = _run(f(K), inputs)
    ref, gref, gouts = _run(f(R), inputs)
    for name, a, b in zip(["H_pre", "H_post", "H_res"], got, ref):
        _check(name, a, b, dtype)
    for name, a, b in zip(["dx", "dW", "dbias"], ggot[:3], gref[:3]):
        _check(name, a, b, dtype)
    scales = _alpha_scales(inputs, gouts, iters, conv)
    names = ["dalpha_pre", "dalpha_post", "dalpha_res"]
    for name, a, b, sc in zip(names, ggot[3:], gref[3:], scales):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        err = ((a - b).abs().max() / sc).item()
        tol = _tol(b, dtype)
        print(f"{name}: err / sum|terms| {err:.2e} (tol {tol:.0e})")
        assert err <= tol, f"{name}: err / sum|terms| {err:.3e} > {tol:.0e}"


@pytest.mark.parametrize("conv", CONVS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp32"])
@pytest.mark.parametrize("C", CS)
@pytest.mark.parametrize("N", NS)
def test_coefficients(N, C, dtype, conv):
    gen = torch.Generator(device="cuda").manual_seed(N * 1000 + C)
    _check_coefficients(_coef_inputs(N, C, dtype, gen), 20, conv)


@pytest.mark.parametrize("conv", CONVS)
@pytest.mark.parametrize("iters", [1, 3])
def test_coefficients_few_iters(conv, iters):
    gen = torch.Generator(device="cuda").manual_seed(7)
    _check_coefficients(_coef_inputs(4, 1000, torch.float32, gen), iters, conv)


@pytest.mark.parametrize("conv", CONVS)
def test_coefficients_many_tokens_split_paths(conv):
    # T spanning many token blocks exercises both split-reduction layouts (over D and T).
    gen = torch.Generator(device="cuda").manual_seed(11)
    _check_coefficients(_coef_inputs(4, 1000, torch.bfloat16, gen, T_=3001), 20, conv)


FORMS = ["gluon", "gluon_ring", "tma", "plain"]


def _force_tma(monkeypatch, form) -> None:
    """The projection forward as ``gluon_proj`` ("gluon": warp-specialized, "gluon_ring": one
    CTA barrier a tile; Hopper only, skipped elsewhere), the Triton TMA kernel ("tma") or plain
    loads ("plain"; False), the backward by TMA for all but plain (on per-stream tiles: GROUP
    tiles, the learned head's default, have no TMA form; "plain" keeps the defaults).
    The kernels a form must not fall back to are removed, so a silent fallback fails the
    test."""
    from mhc_model.kernels import gluon_proj, triton_proj, triton_proj_bwd

    form = {True: "tma", False: "plain"}.get(form, form)
    glu = form.startswith("gluon")
    if glu and not gluon_proj.available(torch.device("cuda")):
        pytest.skip("gluon_proj needs Gluon and a Hopper GPU")
    tma = form != "plain"
    for key in ("proj_fwd_tma", "proj_bwd_tma", "proj_bwd_site_tma"):
        monkeypatch.setitem(triton_proj.CONFIG, key, tma)
    if tma:
        monkeypatch.setitem(triton_proj.CONFIG, "proj_bwd_site_tiles", "stream")
        monkeypatch.setitem(triton_proj.CONFIG, "proj_bwd_head_group", False)
    monkeypatch.setitem(triton_proj.CONFIG, "proj_fwd_gluon", glu)
    monkeypatch.setitem(triton_proj.CONFIG, "proj_fwd_gluon_ws", form == "gluon")
    if tma:
        monkeypatch.setattr(triton_proj, "_proj_fwd_kernel", None)
        monkeypatch.setattr(triton_proj_bwd, "_proj_bwd_kernel", None)
    if glu:
        monkeypatch.setattr(triton_proj, "_proj_fwd_tma_kernel", None)
        other = "_proj_fwd_gluon_kernel" if form == "gluon" else "_proj_fwd_gluon_ws_kernel"
        monkeypatch.setattr(gluon_proj, other, None)


@pytest.mark.parametrize("conv", CONVS)
@pytest.mark.parametrize("T_", [1000, 3001])
@pytest.mark.parametrize("form", FORMS)
def test_coefficients_projection_forms(monkeypatch, form, T_, conv):
    # the projection forward and backward with every [T, *] operand moved by TMA (the
    # forward in Gluon or Triton), and with plain loads; T 3001 leaves a partial token block
    # (TMA reads it as zeros)
    _force_tma(monkeypatch, form)
    gen = torch.Generator(device="cuda").manual_seed(19)
    _check_coefficients(_coef_inputs(4, 1000, torch.bfloat16, gen, T_=T_), 20, conv)


@pytest.mark.parametrize("conv", CONVS)
@pytest.mark.parametrize("hist_regs", [0, 10**6], ids=["scratch", "registers"])
def test_coefficients_backward_forms(monkeypatch, hist_regs, conv):
    # the Sinkhorn history read ahead from the L2 scratch or kept in registers, with the
    # TMA projection backward
    from mhc_model.kernels import triton_proj

    monkeypatch.setitem(triton_proj.CONFIG, "coef_bwd_hist_regs", hist_regs)
    _force_tma(monkeypatch, True)
    gen = torch.Generator(device="cuda").manual_seed(29)
    _check_coefficients(_coef_inputs(4, 1000, torch.bfloat16, gen, T_=3001), 20, conv)


@pytest.mark.parametrize("conv", CONVS)
def test_sinkhorn_reciprocal_forms(monkeypatch, conv):
    # the SFU reciprocal (rcp.approx.ftz.f32, <= 1 ulp) against IEEE division in every
    # Sinkhorn step, forward and backward: both match the reference, and each other within
    # the bound of 2 ITERS steps of one ulp each (2 * 20 * 2^-23 of the largest value)
    from mhc_model.kernels import triton_proj

    gen = torch.Generator(device="cuda").manual_seed(31)
    inputs = _coef_inputs(4, 1000, torch.float32, gen, T_=3001)

    def f(*a):
        return K.coefficients(*a, iters=20, convention=conv)

    runs = []
    for approx in (True, False):
        monkeypatch.setitem(triton_proj.CONFIG, "rcp_approx", approx)
        assert triton_proj.rcp_approx() is approx
        _check_coefficients(inputs, 20, conv)
        outs, grads, gouts = _run(f, inputs)
        runs.append(outs + grads)
    # the alpha gradients are sums of both signs: measured against sum |terms| (as above)
    scales = [None] * 6 + list(_alpha_scales(inputs, gouts, 20, conv))
    bound = 2 * 20 * 2.0**-23
    for i, (a, b) in enumerate(zip(*runs)):
        ref = b.abs().max().clamp_min(1e-30) if scales[i] is None else scales[i]
        err = ((a - b).abs().max() / ref).item()
        assert err <= bound, f"output {i}: approx vs IEEE reciprocal {err:.2e} > {bound:.1e}"


def _differing_calls(fn, calls: int) -> int:
    """How many of ``calls`` further calls of ``fn`` (a tuple of tensors) differ bitwise from
    its first call: every sum has a fixed order, so any difference is a race."""
    first = [t.clone() for t in fn()]
    bad = torch.zeros((), dtype=torch.int64, device="cuda")
    for _ in range(calls):
        bad += sum((a != b).any().long() for a, b in zip(fn(), first))
    return int(bad.item())


@pytest.mark.parametrize("form", ["gluon", "gluon_ring", "tma"])
def test_tma_projection_is_bitwise_repeatable(monkeypatch, form):
    # The pipelined TMA loops once let a wgmma read an x tile the next prefetch had already
    # overwritten: a wrong row in ~1% of forward launches on the H200 (T 3001; see
    # test_kernels_ir.py).  The Gluon ring refills a slot only after a CTA barrier.
    from mhc_model.kernels import triton_proj

    _force_tma(monkeypatch, form)
    gen = torch.Generator(device="cuda").manual_seed(67)
    ins = _coef_inputs(4, 1000, torch.bfloat16, gen, T_=3001)
    x_TD, W = ins[0].detach().view(3001, 4000), ins[1].detach()
    bad = _differing_calls(lambda: (triton_proj.proj_forward(x_TD, W, 24, 32, True),), 2000)
    assert bad == 0, f"{bad} of 2000 forward launches differ from the first"
    outs = K.coefficients(*ins, iters=20, convention="megatron_dsv4")
    gs = [torch.randn_like(o) for o in outs]
    bad = _differing_calls(lambda: torch.autograd.grad(outs, ins, gs, retain_graph=True), 300)
    assert bad == 0, f"{bad} gradients of 300 backward calls differ from the first"


@pytest.mark.parametrize("tma", FORMS)
def test_site_and_head_are_bitwise_repeatable(monkeypatch, tma):
    # the fused site and the learned head, forward and backward (C 1024: the aggregate's dx
    # is folded into the projection backward)
    _force_tma(monkeypatch, tma)
    gen = torch.Generator(device="cuda").manual_seed(71)
    T_, N, C = 3001, 4, 1024
    ins = _coef_inputs(N, C, torch.bfloat16, gen, T_=T_)
    y, g_u, g_out = (torch.randn(*shape, generator=gen, device="cuda").bfloat16()
                     for shape in ((T_, C), (T_, C), (T_, N, C)))
    y.requires_grad_()
    head = [ins[0], (torch.randn(N, N * C, generator=gen, device="cuda") / (N * C) ** 0.5),
            torch.randn(N, generator=gen, device="cuda"), torch.tensor([0.7], device="cuda")]
    for t in head[1:]:
        t.requires_grad_()

    def site():
        u, H_post, H_res, link = K.site_pre(*ins, iters=20, convention="deepseek")
        assert link is not None  # the fused site ran
        out = K.site_post(ins[0], H_res, H_post, y, "deepseek", link)
        return (u, out, *torch.autograd.grad((u, out), [*ins, y], (g_u, g_out)))

    def learned_head():
        out = K.contract_learned(*head, 1e-6)
        return (out, *torch.autograd.grad(out, head, g_u))

    for name, fn in (("site", site), ("learned head", learned_head)):
        bad = _differing_calls(fn, 200)
        assert bad == 0, f"{name}: {bad} outputs of 200 calls differ from the first"


def test_projection_tma_falls_back_on_unaligned_rows(monkeypatch):
    # D % 8 != 0: the row stride is not 16-byte aligned, TMA cannot describe x
    from mhc_model.kernels import triton_proj, triton_proj_bwd

    for key in ("proj_fwd_tma", "proj_bwd_tma", "proj_bwd_site_tma"):
        monkeypatch.setitem(triton_proj.CONFIG, key, True)
    monkeypatch.setattr(triton_proj, "_proj_fwd_tma_kernel", None)
    monkeypatch.setattr(triton_proj_bwd, "_proj_bwd_tma_kernel", None)
    gen = torch.Generator(device="cuda").manual_seed(23)
    _check_coefficients(_coef_inputs(3, 333, torch.bfloat16, gen), 20, "deepseek")


def test_split_weight_is_round_to_nearest_pair():
    from mhc_model.kernels import triton_proj

    W = torch.randn(24, 3000, device="cuda")
    got = triton_proj.split_weight(W, 32)
    hi = W.to(torch.bfloat16)
    assert torch.equal(got[0, :24], hi)
    assert torch.equal(got[1, :24], (W - hi.float()).to(torch.bfloat16))
    assert not got[:, 24:].any()


@pytest.mark.parametrize("tile", [(16384, 4), (8192, 2), (2048, 4)])
@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp32"])
def test_mix_post_backward_variants(monkeypatch, tile, dtype):
    # C tiles of 1024, 512 and 128 at N 4: one, two and eight steps of the C loop at C 1000
    from mhc_model.kernels import triton_stream

    monkeypatch.setitem(triton_stream.CONFIG, "mix_bwd", tile)
    test_mix_post(4, 1000, dtype, "deepseek")


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp32"])
@pytest.mark.parametrize("C", CS)
@pytest.mark.parametrize("N", NS)
def test_aggregate(N, C, dtype):
    gen = torch.Generator(device="cuda").manual_seed(N + C)
    x = torch.randn(T, N, C, generator=gen, device="cuda").to(dtype).requires_grad_()
    h = torch.rand(T, N, generator=gen, device="cuda").requires_grad_()
    got, ggot, _ = _run(K.aggregate, [x, h])
    ref, gref, _ = _run(R.aggregate, [x, h])
    _check("u", got[0], ref[0], dtype)
    _check("dx", ggot[0], gref[0], dtype)
    _check("dH_pre", ggot[1], gref[1], dtype)


@pytest.mark.parametrize("conv", CONVS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp32"])
@pytest.mark.parametrize("C", CS)
@pytest.mark.parametrize("N", NS)
def test_mix_post(N, C, dtype, conv):
    gen = torch.Generator(device="cuda").manual_seed(3 * N + C)
    x = torch.randn(T, N, C, generator=gen, device="cuda").to(dtype).requires_grad_()
    hr = torch.rand(T, N, N, generator=gen, device="cuda").requires_grad_()
    hp = (2 * torch.rand(T, N, generator=gen, device="cuda")).requires_grad_()
    y = torch.randn(T, C, generator=gen, device="cuda").to(dtype).requires_grad_()
    inputs = [x, hr, hp, y]
    got, ggot, _ = _run(lambda *a: K.mix_post(*a, conv), inputs)
    ref, gref, _ = _run(lambda *a: R.mix_post(*a, conv), inputs)
    _check("out", got[0], ref[0], dtype)
    for name, a, b in zip(["dx", "dH_res", "dH_post", "dy"], ggot, gref):
        _check(name, a, b, dtype)


def test_dispatch_env_reference(monkeypatch):
    gen = torch.Generator(device="cuda").manual_seed(5)
    x = torch.randn(8, 4, 64, generator=gen, device="cuda")
    h = torch.rand(8, 4, generator=gen, device="cuda")
    assert K.use_triton(x, h)
    monkeypatch.setenv("MHC_KERNELS", "reference")
    assert not K.use_triton(x, h)
    assert torch.equal(K.aggregate(x, h), R.aggregate(x, h))
    assert not K.use_triton(x.cpu(), h.cpu())


@pytest.mark.parametrize("conv", CONVS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp32"])
@pytest.mark.parametrize("C", CS)
@pytest.mark.parametrize("N", NS)
def test_site_pre_post(N, C, dtype, conv):
    _check_site(N, C, dtype, conv)


@pytest.mark.parametrize("conv", CONVS)
@pytest.mark.parametrize("C", CS)
def test_site_pre_post_tma(monkeypatch, C, conv):
    # the site's projection backward (AGG / EXTRA operands) through TMA descriptors
    _force_tma(monkeypatch, True)
    _check_site(4, C, torch.bfloat16, conv)


@pytest.mark.parametrize("conv", CONVS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp32"])
@pytest.mark.parametrize("tiles", ["stream", "group", "group_mixg"])
def test_site_pre_post_tiles(monkeypatch, tiles, dtype, conv):
    # the site's projection backward on each tile mode (triton_proj.site_tiles): per stream,
    # GROUP with the mix's dx as EXTRA, GROUP forming the mix's dx from g
    from mhc_model.kernels import triton_proj

    monkeypatch.setitem(triton_proj.CONFIG, "proj_bwd_site_tiles", tiles)
    assert triton_proj.site_tiles(4, 256) == tiles
    _check_site(4, 256, dtype, conv)


@pytest.mark.parametrize("T_", [77, 3001])
@pytest.mark.parametrize("tile", [(32, 16, 4, 3, True, 4), (64, 16, 4, 3, True, 4),
                                  (64, 16, 8, 3, True, 4), (32, 32, 8, 3, True, 4),
                                  (16, 64, 8, 3, True, 4), (32, 16, 4, 4, True, 8)])
@pytest.mark.parametrize("tiles", ["group", "group_mixg"])
def test_site_group_tiles(monkeypatch, tiles, tile, T_):
    # the GROUP tiles bench/kernels.py sweeps (T 3001: several T splits, a partial last tile)
    from mhc_model.kernels import triton_proj

    monkeypatch.setitem(triton_proj.CONFIG, "proj_bwd_group", tile)
    monkeypatch.setitem(triton_proj.CONFIG, "proj_bwd_site_tiles", tiles)
    assert triton_proj.site_tiles(4, 256) == tiles
    _check_site(4, 256, torch.bfloat16, "deepseek", T_)


def _check_site(N, C, dtype, conv, T_=T):
    """The fused site (coefficients + aggregate, then the mix, stream gradient written once
    by the projection backward) against the three reference functions in fp32 on the same
    inputs upcast.  u and y are independent ends (cotangent of u given, y a leaf), so every
    term of dx (coefficients, aggregate, mix) is checked without a branch's rounding.
    C = 256 folds the aggregate's dx into the projection backward; C = 1000 is not a multiple
    of its tile and adds it to the mix's dx first (``test_site_pre_post_tiles`` runs the other
    tile modes)."""
    gen = torch.Generator(device="cuda").manual_seed(17 * N + C)
    ins = _coef_inputs(N, C, dtype, gen, T_)
    y = torch.randn(T_, C, generator=gen, device="cuda").to(dtype).requires_grad_()
    g_u = torch.randn(T_, C, generator=gen, device="cuda").to(dtype)
    g_out = torch.randn(T_, N, C, generator=gen, device="cuda").to(dtype)
    assert K.use_triton(*ins)
    u, H_post, H_res, link = K.site_pre(*ins, iters=20, convention=conv)
    assert link is not None  # the fused site ran
    out = K.site_post(ins[0], H_res, H_post, y, conv, link)
    got = torch.autograd.grad((u, out), [*ins, y], (g_u, g_out))

    ref_ins = [t.detach().float().requires_grad_() for t in ins]
    y_ref = y.detach().float().requires_grad_()
    Hs = R.coefficients(*ref_ins, iters=20, convention=conv)
    for h in Hs:
        h.retain_grad()
    u_ref = R.aggregate(ref_ins[0], Hs[0])
    out_ref = R.mix_post(ref_ins[0], Hs[2], Hs[1], y_ref, conv)
    torch.autograd.backward((u_ref, out_ref), (g_u.float(), g_out.float()))
    _check("u", u, u_ref.detach().to(dtype), dtype)
    _check("out", out, out_ref.detach().to(dtype), dtype)
    _check("H_post", H_post, Hs[1].detach(), dtype)
    _check("H_res", H_res, Hs[2].detach(), dtype)
    names = ["dx", "dW", "dbias"]
    for name, a, b in zip(names, got[:3], ref_ins[:3]):
        _check(name, a, b.grad.to(a.dtype), dtype)
    _check("dy", got[-1], y_ref.grad.to(dtype), dtype)
    scales = _alpha_scales(ins, [h.grad for h in Hs], 20, conv)
    for name, a, b, sc in zip(["dalpha_pre", "dalpha_post", "dalpha_res"], got[3:6],
                              ref_ins[3:6], scales):
        err = ((a - b.grad).abs().max() / sc).item()
        tol = _tol(b.grad, dtype)
        print(f"{name}: err / sum|terms| {err:.2e} (tol {tol:.0e})")
        assert err <= tol, f"{name}: err / sum|terms| {err:.3e} > {tol:.0e}"
    # the mix's dx (or, MIXG, its g and H_res) was consumed, nothing kept
    assert link.dx is None and link.mix_g is None and link.x is None


def test_site_post_refuses_other_streams():
    gen = torch.Generator(device="cuda").manual_seed(3)
    ins = _coef_inputs(4, 256, torch.float32, gen)
    u, H_post, H_res, link = K.site_pre(*ins, iters=3, convention="deepseek")
    other = ins[0].detach().clone()
    with pytest.raises(ValueError, match="same link"):
        K.site_post(other, H_res, H_post, u, "deepseek", link)


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp32"])
@pytest.mark.parametrize("N", NS)
def test_expand_and_contract_mean(N, dtype):
    # the stream start and the mean contract (fused: one pass each way) against the reference
    gen = torch.Generator(device="cuda").manual_seed(17 + N)
    h = torch.randn(T, 1000, generator=gen, device="cuda").to(dtype).requires_grad_()
    x = torch.randn(T, N, 1000, generator=gen, device="cuda").to(dtype).requires_grad_()
    for name, fast, ref, inp in (("expand", lambda a: K.expand(a, N), lambda a: R.expand(a, N), h),
                                 ("contract_mean", K.contract_mean, R.contract_mean, x)):
        assert K.use_triton(inp)
        got, ggot, _ = _run(fast, [inp])
        want, gwant, _ = _run(ref, [inp])
        if name == "expand":
            assert torch.equal(got[0], want[0]), name
        _check(name, got[0], want[0], dtype)
        _check(f"d {name}", ggot[0], gwant[0], dtype)
