"""The fused mHC site (``triton_site``: coefficients + aggregate, the mix, the stream gradient
written once by the projection backward) against ``mhc_ref`` in fp64, on the CPU through the
Triton interpreter, fp32 only (bf16 is checked by ``tests/model/test_kernels_gpu.py``), on
each tile mode of the projection backward (``triton_proj.site_tiles``: per stream, GROUP,
GROUP forming the mix's dx from g).

    PYTHONPATH=/work/triton_cpu:. TRITON_INTERPRET=1 .venv/bin/python tools/interp_site.py

(/work/triton_cpu: numpy < 2.3, which Triton 3.6's interpreter needs.)  ``use_triton`` is
patched to accept CPU tensors; ``rcp_approx`` is off (a PTX instruction).  Exits 1 when an
error max|a - b| / max|b| is over the fp32 tolerance of ``test_kernels_gpu.py`` (5e-5).
"""

from __future__ import annotations

import os
import sys

import torch

from mhc_model import kernels as K
from mhc_model import mhc_ref as R
from mhc_model.conventions import CONVENTIONS
from mhc_model.kernels import triton_proj

TOL = 5e-5


def _rel(a, b) -> float:
    return ((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def site_errors(N: int, C: int, conv: str, T: int = 77) -> dict[str, float]:
    gen = torch.Generator().manual_seed(17 * N + C)
    D, Kd = N * C, N * N + 2 * N
    ins = [torch.randn(T, N, C, generator=gen), torch.randn(Kd, D, generator=gen) / D**0.5,
           torch.randn(Kd, generator=gen), *(torch.tensor([v]) for v in (0.8, 1.1, 1.3))]
    ins = [t.requires_grad_() for t in ins]
    y = torch.randn(T, C, generator=gen).requires_grad_()
    g_u, g_out = torch.randn(T, C, generator=gen), torch.randn(T, N, C, generator=gen)
    u, H_post, H_res, link = K.site_pre(*ins, iters=20, convention=conv)
    assert link is not None, "the fused site did not run"
    out = K.site_post(ins[0], H_res, H_post, y, conv, link)
    got = torch.autograd.grad((u, out), [*ins, y], (g_u, g_out))
    assert link.dx is None and link.mix_g is None and link.x is None
    ref = [t.detach().double().requires_grad_() for t in (*ins, y)]
    Hs = R.coefficients(*ref[:6], iters=20, convention=conv)
    u_ref = R.aggregate(ref[0], Hs[0])
    out_ref = R.mix_post(ref[0], Hs[2], Hs[1], ref[6], conv)
    torch.autograd.backward((u_ref, out_ref), (g_u.double(), g_out.double()))
    errs = {"u": _rel(u, u_ref), "out": _rel(out, out_ref)}
    errs.update({name: _rel(a, b.grad) for name, a, b in
                 zip(("dx", "dW", "dbias", "dy"), (*got[:3], got[6]), (*ref[:3], ref[6]))})
    return errs


def main() -> None:
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("run with TRITON_INTERPRET=1 (see the module docstring)")
    triton_proj.CONFIG["rcp_approx"] = False
    K.use_triton = lambda *ts: K.triton_available() and all(t.numel() > 0 for t in ts)
    worst = 0.0
    for conv in CONVENTIONS:
        for N, C in ((4, 64), (2, 32), (6, 32)):
            for mode in ("stream", "group", "group_mixg"):
                triton_proj.CONFIG["proj_bwd_site_tiles"] = mode
                tiles = triton_proj.site_tiles(N, C)
                errs = site_errors(N, C, conv)
                worst = max(worst, *errs.values())
                print(f"{conv} N={N} C={C} {tiles} tiles: "
                      + ", ".join(f"{k} {v:.2e}" for k, v in errs.items()), flush=True)
    print(f"worst {worst:.2e} (tolerance {TOL:.0e})")
    sys.exit(1 if worst > TOL else 0)


if __name__ == "__main__":
    main()
