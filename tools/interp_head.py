"""The fused learned head (``triton_head``) against ``mhc_ref.contract_learned`` on the CPU
through the Triton interpreter, fp32 only (the interpreter's bf16 casts / dots are not the
GPU's; bf16 is checked by ``tests/model/test_head_gpu.py``).

    PYTHONPATH=/work/triton_cpu:. TRITON_INTERPRET=1 .venv/bin/python tools/interp_head.py

With ``MHC_MEGATRON_SRC_DEV`` / ``MHC_MEGATRON_SRC_DSV4`` set (``tests/megatron_env.py``) and
einops on the path, the head is also checked against Megatron's ``learned_output_contract``.

``mhc_model.kernels.use_triton`` is patched to accept non-empty CPU tensors, so the fused
path runs on CPU tensors.  Errors: max|a - b| / max|b|; d scale (a scalar summed over T N terms
of both signs) against sum |dh p r| (as ``test_kernels_gpu._alpha_scales``).  Exits 1 when an
error is over the fp32 tolerance of ``test_kernels_gpu.py`` (5e-5).
"""

from __future__ import annotations

import os
import sys

import torch

from mhc_model import kernels as K
from tests.model.test_head_gpu import _rel, enable_point_units, head_errors

TOL = 5e-5
calls = {"fused": 0}


def _patch():
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("run with TRITON_INTERPRET=1 (see the module docstring)")
    from mhc_model.kernels import triton_mhc

    def on_cpu(*ts):  # use_triton without the is_cuda test
        if not K.triton_available() or os.environ.get("MHC_KERNELS", "") == "reference":
            return False
        return all(t.numel() > 0 for t in ts)

    K.use_triton = on_cpu
    inner = triton_mhc.contract_learned

    def counted(*a, **k):
        calls["fused"] += 1
        return inner(*a, **k)

    triton_mhc.contract_learned = counted


def _sm_count(n):
    """Pretend the device has n SMs (None: the CPU default of ``triton_proj._sm_count``), which
    sets the D / T split counts of the projection kernels."""
    from mhc_model.kernels import triton_proj, triton_proj_bwd

    orig = getattr(_sm_count, "orig", None) or triton_proj._sm_count
    _sm_count.orig = orig
    fake = orig if n is None else (lambda device: n)
    triton_proj._sm_count = triton_proj_bwd._sm_count = fake


def _model_grads(model, ids, fused: str):
    """Logits and gradients with ``fused`` = "all" (every kernel fused), "head" (only the
    learned head fused) or "none" (reference path)."""
    from mhc_model.kernels import triton_mhc

    os.environ["MHC_KERNELS"] = "" if fused == "all" else "reference"
    saved = K.contract_learned
    if fused == "head":
        K.contract_learned = lambda *a: triton_mhc.contract_learned(*a)
    try:
        model.zero_grad()
        before = calls["fused"]
        logits = model(ids)
        logits.float().square().mean().backward()
        assert (calls["fused"] > before) == (fused != "none"), fused
    finally:
        K.contract_learned = saved
        os.environ.pop("MHC_KERNELS")
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                             if p.grad is not None}


def check_model(fused: str):
    """Whole HybridModel, learned contract, fp32: logits and every gradient against the
    reference path, with ``tests/model/test_model_gpu.py``'s whole-model criterion: logits
    within 1e-4 (abs and rel), each gradient's error over max(its own max, 1e-3 x the
    model's largest gradient) below 1e-3 (mHC alpha / head gradients are sums of cancelling
    terms; near the enable point the final norm's gradient is orthogonal to the nearly equal
    streams, so d pre is itself a cancelling sum)."""
    from mhc_model import HybridModel
    from tests.model.helpers import tiny_config, tokens

    torch.manual_seed(0)
    model = HybridModel(tiny_config("M-*E-", mhc=True, contract="learned"))
    with torch.no_grad():  # off the enable point, so every head gradient is non-zero
        model.decoder.hc_head_scale.fill_(0.6)
        model.decoder.hc_head_base.normal_()
    ids = tokens()
    l_ref, g_ref = _model_grads(model, ids, "none")
    l_fu, g_fu = _model_grads(model, ids, fused)
    torch.testing.assert_close(l_fu, l_ref, atol=1e-4, rtol=1e-4)
    top = max(g.abs().max().item() for g in g_ref.values())
    norm = {n: (g_fu[n] - g_ref[n]).abs().max().item()
            / max(g_ref[n].abs().max().item(), 1e-3 * top) for n in g_ref}
    worst = max(norm, key=norm.get)
    errs = {"logits": _rel(l_fu, l_ref), f"worst grad ({worst})": norm[worst]}
    errs.update({n: norm[n] for n in g_ref if "hc_head" in n})
    return errs


def check_megatron(branch: str, tree):
    """Megatron's own ``learned_output_contract`` (the tree's ``hyper_connection.py``) as the
    oracle, as ``test_head_gpu.test_learned_head_matches_megatron`` on the GPU."""
    import importlib

    torch.cuda.nvtx.range_push = lambda *a, **k: 0  # CPU: Megatron's nvtx ranges are no-ops
    torch.cuda.nvtx.range_pop = lambda *a, **k: 0
    sys.path.insert(0, str(tree))
    for name in [m for m in sys.modules if m == "megatron" or m.startswith("megatron.")]:
        del sys.modules[name]
    with torch._dynamo.config.patch(disable=True):
        hc = importlib.import_module("megatron.core.transformer.hyper_connection")
    sys.path.remove(str(tree))
    T_, N, C = 77, 4, 256

    def theirs(x_TNC, fn, base, scale, eps):
        y = hc.learned_output_contract(x_TNC.reshape(T_, 1, N * C), fn, base, scale, N, eps)
        return y.reshape(T_, C)

    return head_errors(T_, N, C, torch.float32, device="cpu", seed=21, eps=1e-5,
                       reference=theirs)


def main():
    _patch()
    bad = []
    f32 = torch.float32
    cases = [(77, n, c, n * 1000 + c) for n in (2, 4, 6) for c in (1000, 256)]
    big = [(3001, 4, 1000, 3001), (3001, 4, 256, 3001)]
    eps = {(77, 4, 256, 9): 0.05}  # test_learned_head_large_eps
    for T, N, C, seed in cases + big + list(eps):  # test_head_gpu.py's (+ T 3001 folded)
        _sm_count(132 if T > 1000 else None)  # T 3001: the H200's 132 SMs, so T splits > 1
        before = calls["fused"]
        e = eps.get((T, N, C, seed), 1e-6)
        errs = head_errors(T, N, C, f32, device="cpu", seed=seed, eps=e)
        assert calls["fused"] == before + 1, "the fused path did not run"
        print(f"T={T} N={N} C={C} eps={e}: "
              + ", ".join(f"{k} {v:.2e}" for k, (v, _) in errs.items()))
        bad += [(T, N, C, k) for k, (v, tol) in errs.items() if v > tol]
    _sm_count(None)
    for N in (2, 4, 6):
        units = enable_point_units(N, 1000, f32, device="cpu")
        print(f"enable point N={N}: |head - contract_mean| <= {units:.1f} x 2^-24 mean_j |x_j|"
              " (test bound 16)")
        bad += [("enable", N)] if units > 16 else []
    from tests.megatron_env import megatron_trees

    for branch, tree in megatron_trees().items():
        if tree is None or branch == "main":
            continue  # MHC_MEGATRON_SRC_DEV / _DSV4 (and einops importable) add this check
        errs = check_megatron(branch, tree)
        print(f"vs Megatron {branch} learned_output_contract: "
              + ", ".join(f"{k} {v:.2e}" for k, (v, _) in errs.items()))
        bad += [(branch, k) for k, (v, tol) in errs.items() if v > tol]
    for fused in ("head", "all"):
        errs = check_model(fused)
        print(f"HybridModel M-*E- learned, {fused} fused (grads: test_model_gpu criterion, "
              "tol 1e-3): " + ", ".join(f"{k} {v:.2e}" for k, v in errs.items()))
        bad += [("model", fused, k) for k, v in errs.items()
                if v > (TOL if k == "logits" else 1e-3)]
    print("FAIL " + str(bad) if bad else f"all within {TOL:.0e}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
