"""Our mHC site against Megatron-LM's own ``HyperConnectionModule`` (same weights, same inputs).

Megatron is the oracle here: its real ``megatron/core/transformer/hyper_connection.py`` is
imported from a source tree given by the environment (nothing of it is copied into the
project). Which tree, and which of our conventions it is compared with:

  MHC_MEGATRON_SRC_DEV=/path    a tree holding ``megatron/`` of Megatron-LM's ``dev`` branch
                                -> compared with ``megatron_dev``
  MHC_MEGATRON_SRC_DSV4=/path   the same for the ``dsv4`` branch -> ``megatron_dsv4``
  MHC_MEGATRON_SRC=/path        one tree of either branch; its branch is named by
  MHC_MEGATRON_BRANCH=dev|dsv4  (required with MHC_MEGATRON_SRC)

Any combination may be set (a per-branch variable wins over MHC_MEGATRON_SRC for its branch);
a branch whose tree is not given is skipped. Get a tree with
``git archive dev megatron | tar -x -C DIR`` in a Megatron-LM clone. Megatron's imports need
``einops`` and ``triton`` (3.6.0 on the CPU box) besides torch; without them the tests skip.
Both branches can run in one process: the ``megatron`` package is dropped from
``sys.modules`` between them.

Run on CPU in fp32. Test-only patches, none of them changing Megatron's math: ``torch.compile``
is disabled (Megatron's ``@torch.compile`` functions then run their eager bodies; inductor would
need a C++ toolchain and only changes fusion), and ``torch.cuda.nvtx.range_push/range_pop``
become no-ops (NVTX is missing from CPU builds of torch).

Checked, for n = 2, 3, 4 and inputs at rms 1 and at rms 0.02 (where the RMS factors of the
conventions differ most), at a non-trivial point (alpha, bias and W random, not the exact-init
point): H_pre, H_post, H_res, the aggregate and the layer output of Megatron's native path
against ``mhc_model.stack.HybridLayer`` wrapping the same branch function F, and the gradients
of the layer output w.r.t. the input streams and the five mHC parameters; plus the learned
output contract (``learned_output_contract`` with Megatron's eps = ``layernorm_epsilon``)
against ``mhc_ref.contract_learned`` with the convention's head eps.

Error measure: max|ours - megatron| / max|megatron| <= 1e-6. The alpha gradients are scalars
summed over T*K terms of both signs (the two sides sum them in different orders, e.g. the
aggregate's backward over C), so their error is taken relative to the sum of the absolute terms
sum |dh * r * proj| of their group, the scale of the usual summation error bound (as in
``test_kernels_gpu.py``); their plain relative error is printed too. Run with ``-s`` to see
every measured error.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from mhc_model.config import HybridConfig, MHCConfig
from mhc_model.hyper_connection import head_eps
from mhc_model.mhc_ref import aggregate, contract_learned, rms_factor, sinkhorn
from mhc_model.stack import HybridLayer
from tests.megatron_env import megatron_trees

OURS = {"dev": "megatron_dev", "dsv4": "megatron_dsv4"}
TOL = 1e-6
C = 32
S, B = 5, 3
ITERS = 20
LN_EPS = 1e-5  # Megatron's default layernorm_epsilon, set explicitly on both sides


def _drop_megatron() -> None:
    for name in [m for m in sys.modules if m == "megatron" or m.startswith("megatron.")]:
        del sys.modules[name]


@pytest.fixture(scope="module", params=["dev", "dsv4"])
def megatron(request):
    """(branch, Megatron's hyper_connection module, its TransformerConfig class)."""
    branch = request.param
    tree = megatron_trees()[branch]
    if tree is None:
        pytest.skip(f"no Megatron {branch} tree (set MHC_MEGATRON_SRC_{branch.upper()}, or "
                    f"MHC_MEGATRON_SRC with MHC_MEGATRON_BRANCH={branch})")
    # a tree was given: a broken oracle is a failure, never a skip
    if not (tree / "megatron" / "core" / "transformer" / "hyper_connection.py").is_file():
        pytest.fail(f"{tree} holds no megatron/core/transformer/hyper_connection.py",
                    pytrace=False)
    for need in ("einops", "triton"):
        if importlib.util.find_spec(need) is None:
            pytest.fail(f"Megatron's imports need {need}: install it beside the Megatron tree",
                        pytrace=False)
    mp = pytest.MonkeyPatch()
    mp.setattr(torch.cuda.nvtx, "range_push", lambda *a, **k: 0)
    mp.setattr(torch.cuda.nvtx, "range_pop", lambda *a, **k: 0)
    mp.syspath_prepend(str(tree))
    _drop_megatron()
    try:
        with torch._dynamo.config.patch(disable=True):
            hc = importlib.import_module("megatron.core.transformer.hyper_connection")
            tc = importlib.import_module("megatron.core.transformer.transformer_config")
            assert Path(hc.__file__).resolve().is_relative_to(tree.resolve()), hc.__file__
            yield branch, hc, tc.TransformerConfig
    finally:
        _drop_megatron()
        mp.undo()


def _configs(TransformerConfig, branch: str, n: int):
    mcfg = TransformerConfig(num_layers=1, hidden_size=C, num_attention_heads=4,
                             layernorm_epsilon=LN_EPS, enable_hyper_connections=True,
                             num_residual_streams=n, mhc_sinkhorn_iterations=ITERS,
                             mhc_init_gating_factor=0.01)
    ours = HybridConfig(hybrid_layer_pattern="-", hidden_size=C, norm_eps=LN_EPS,
                        mhc=MHCConfig(enable_hyper_connections=True, num_residual_streams=n,
                                      mhc_sinkhorn_iterations=ITERS,
                                      mhc_convention=OURS[branch],
                                      mhc_output_contract="learned"))
    return mcfg, ours


class _Branch(nn.Module):
    """The layer's branch F (shared by both sides): y = tanh(u A) + u / 2."""

    def __init__(self, A: torch.Tensor):
        super().__init__()
        self.A = A

    def forward(self, u):
        return torch.tanh(u @ self.A) + 0.5 * u


def _err(name: str, ours: torch.Tensor, ref: torch.Tensor, errs: dict) -> None:
    assert ours.shape == ref.shape, (name, ours.shape, ref.shape)
    ab = (ours.double() - ref.double()).abs().max().item()
    rel = ab / max(ref.double().abs().max().item(), 1e-30)
    errs[name] = (ab, rel)


def _alpha_scales(hc, x_TNC: torch.Tensor, dH: tuple) -> dict[str, float]:
    """sum_t,k |dh * r * proj| per alpha group, from our reference pieces and the cotangents
    dH = (dH_pre, dH_post, dH_res) our layer's backward fed into the mappings."""
    T, n, C = x_TNC.shape
    xf = x_TNC.reshape(T, n * C).double()
    proj = xf @ hc.mapping_proj.weight.detach().double().t()
    r = rms_factor(xf, hc.convention, hc.mhc.mhc_eps).double()
    a = [getattr(hc, f"alpha_{g}").detach().double().reshape(1) for g in ("pre", "post", "res")]
    scale = torch.cat([a[0].expand(n), a[1].expand(n), a[2].expand(n * n)])
    h = (r * proj * scale + hc.bias.detach().double()).requires_grad_(True)
    outs = (torch.sigmoid(h[:, :n]), 2.0 * torch.sigmoid(h[:, n:2 * n]),
            sinkhorn(h[:, 2 * n:].reshape(T, n, n), ITERS, hc.convention, hc.mhc.mhc_eps))
    (dh,) = torch.autograd.grad(outs, h, [g.double() for g in dH])
    terms = (dh * r * proj).abs()
    return {"d alpha_pre": terms[:, :n].sum().item(),
            "d alpha_post": terms[:, n:2 * n].sum().item(),
            "d alpha_res": terms[:, 2 * n:].sum().item()}


def _report(tag: str, errs: dict, scales: dict | None = None) -> None:
    """errs[name] = (abs, rel); for names in ``scales`` the checked error is abs / scale."""
    scales = scales or {}
    checked = {k: (ab / scales[k] if k in scales else rel) for k, (ab, rel) in errs.items()}
    worst = max(checked, key=checked.get)
    print(f"\n{tag}: max abs {max(a for a, _ in errs.values()):.2e}, max checked rel "
          f"{checked[worst]:.2e} ({worst}), max plain rel "
          f"{max(r for _, r in errs.values()):.2e}")
    for name, (ab, rel) in errs.items():
        extra = f" | abs / sum|terms| {checked[name]:.2e}" if name in scales else ""
        print(f"  {name:>22}: abs {ab:.2e} rel {rel:.2e}{extra}")
    bad = {k: v for k, v in checked.items() if v > TOL}
    assert not bad, f"{tag}: relative error above {TOL:.0e}: {bad}"


@pytest.mark.parametrize("rms", [1.0, 0.02])
@pytest.mark.parametrize("n", [2, 3, 4])
def test_layer_forward_backward_matches_megatron(megatron, n, rms):
    branch, hc, TransformerConfig = megatron
    torch.manual_seed(1000 * n + int(rms * 100))
    mcfg, cfg = _configs(TransformerConfig, branch, n)
    K = n * n + 2 * n
    theirs = hc.HyperConnectionModule(mcfg, layer_number=1)
    with torch.no_grad():  # a point away from both inits
        theirs.mapping_proj.weight.mul_(3.0)
        theirs.bias.copy_(0.5 * torch.randn(K))
        theirs.alpha_pre.fill_(0.7)
        theirs.alpha_post.fill_(1.3)
        theirs.alpha_res.fill_(0.9)
    A = torch.randn(C, C) / C**0.5
    ours = HybridLayer(cfg, 0, _Branch(A))
    missing = ours.hyper_connection.load_state_dict(theirs.state_dict(), strict=True)
    assert not missing.missing_keys and not missing.unexpected_keys
    F = _Branch(A)

    x0 = rms * torch.randn(S, B, n, C)
    G = torch.randn(S, B, n, C)  # cotangent of the layer output

    # Megatron: module forward (aggregate + mappings) and its native h_res/h_post/bda merge.
    x_m = x0.reshape(S, B, n * C).clone().requires_grad_(True)
    outs = theirs(x_m)
    agg_m, h_res_m, h_post_m = outs[0], outs[1], outs[2]
    y_m = F(agg_m)
    if branch == "dev":
        out_m = theirs.fused_h_res_h_post_bda(h_res_m, outs[3], h_post_m, (y_m, None), 0.0,
                                              False, False)
    else:
        out_m = theirs.h_res_h_post_bda(h_res_m, x_m, h_post_m, (y_m, None), 0.0, False, False)
    (out_m.reshape(S, B, n, C) * G).sum().backward()
    with torch.no_grad():
        h_pre_m = theirs.compute_mappings(x_m)[0]

    # Ours: the real wrapper layer (a hook keeps the mappings' cotangents for _alpha_scales).
    seen: list = []
    hook = ours.hyper_connection.register_forward_hook(
        lambda mod, args, out: seen.extend(t.retain_grad() or t for t in out))
    x_o = x0.clone().requires_grad_(True)
    out_o = ours(x_o)
    (out_o * G).sum().backward()
    hook.remove()
    scales = _alpha_scales(ours.hyper_connection, x0.reshape(S * B, n, C),
                           tuple(t.grad for t in seen))
    with torch.no_grad():
        H_pre, H_post, H_res = ours.hyper_connection(x0.reshape(S * B, n, C))
        agg_o = aggregate(x0.reshape(S * B, n, C), H_pre)

    errs: dict = {}
    _err("H_pre", H_pre, h_pre_m.reshape(S * B, n), errs)
    _err("H_post", H_post, h_post_m.detach().reshape(S * B, n), errs)
    _err("H_res", H_res, h_res_m.detach().reshape(S * B, n, n), errs)
    _err("aggregate", agg_o, agg_m.detach().reshape(S * B, C), errs)
    _err("layer output", out_o.detach(), out_m.detach().reshape(S, B, n, C), errs)
    _err("d x", x_o.grad, x_m.grad.reshape(S, B, n, C), errs)
    ohc = ours.hyper_connection
    for name, p in ohc.named_parameters():
        ref = dict(theirs.named_parameters())[name].grad
        _err(f"d {name}", p.grad, ref, errs)
    _report(f"{branch} vs {OURS[branch]}, n={n}, rms={rms}", errs, scales)


@pytest.mark.parametrize("rms", [1.0, 0.02])
@pytest.mark.parametrize("n", [2, 4])
def test_learned_head_matches_megatron(megatron, n, rms):
    branch, hc, TransformerConfig = megatron
    _, cfg = _configs(TransformerConfig, branch, n)
    g = torch.Generator().manual_seed(7 * n)
    x0 = rms * torch.randn(S, B, n, C, generator=g)
    fn0 = torch.randn(n, n * C, generator=g) / (n * C) ** 0.5
    base0 = 0.3 * torch.randn(n, generator=g)
    scale0 = torch.tensor([0.8])
    G = torch.randn(S, B, C, generator=g)

    leaves_m = [t.clone().requires_grad_(True) for t in (x0.reshape(S, B, n * C), fn0, base0,
                                                         scale0)]
    y_m = hc.learned_output_contract(*leaves_m, n, LN_EPS)  # Megatron: layernorm_epsilon
    (y_m * G).sum().backward()
    leaves_o = [t.clone().requires_grad_(True) for t in (x0.reshape(S * B, n, C), fn0, base0,
                                                         scale0)]
    y_o = contract_learned(*leaves_o, head_eps(cfg))
    (y_o * G.reshape(S * B, C)).sum().backward()
    assert head_eps(cfg) == LN_EPS

    errs: dict = {}
    _err("head output", y_o.detach(), y_m.detach().reshape(S * B, C), errs)
    for name, a, b in zip(("d x", "d hc_head_fn", "d hc_head_base", "d hc_head_scale"),
                          leaves_o, leaves_m):
        _err(name, a.grad.reshape(b.grad.shape), b.grad, errs)
    _report(f"{branch} head vs {OURS[branch]}, n={n}, rms={rms}", errs)
