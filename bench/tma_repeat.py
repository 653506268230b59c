"""Repeat the projection kernels and count launches whose output differs bitwise from the first.

Every sum in the projection forward and backward has a fixed order, so any difference is a
race.  This found one: the TMA forward returned a wrong row in about 1% of launches on the
H200 (bench/results/tma_race_h200.md; guarded by tests/model/test_kernels_ir.py).

    PYTHONPATH=. python bench/tma_repeat.py [--seconds 20] [--plain | --no-gluon | --ring]
        [--stages 3] [--backward]

The forward runs as ``proj_forward`` picks it (``gluon_proj`` on Hopper); --no-gluon takes the
Triton TMA kernel, --plain plain loads.

Exit status 1 when any launch differs.
"""

from __future__ import annotations

import argparse
import time

import torch

from mhc_model.kernels import gluon_proj, triton_mhc, triton_proj

N, C, T = 4, 1000, 3001  # T 3001 leaves a partial token block
D, K, KP = N * C, N * N + 2 * N, 32


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--plain", action="store_true", help="plain loads instead of TMA")
    ap.add_argument("--no-gluon", action="store_true", help="the Triton TMA forward")
    ap.add_argument("--ring", action="store_true",
                    help="gluon_proj's one-barrier ring, not its warp-specialized kernel")
    ap.add_argument("--stages", type=int, default=None, help="pipeline stages of the forward")
    ap.add_argument("--backward", action="store_true", help="repeat the coefficient backward")
    a = ap.parse_args()
    if a.plain:
        for key in ("proj_fwd_tma", "proj_bwd_tma"):
            triton_proj.CONFIG[key] = False
    if a.no_gluon:
        triton_proj.CONFIG["proj_fwd_gluon"] = False
    if a.ring:
        triton_proj.CONFIG["proj_fwd_gluon_ws"] = False
    if a.stages is not None:
        tile = list(triton_proj.CONFIG["proj_fwd_tma_tile"])
        tile[3] = a.stages
        triton_proj.CONFIG["proj_fwd_tma_tile"] = tuple(tile)
    gen = torch.Generator(device="cuda").manual_seed(67)
    x = torch.randn(T, N, C, generator=gen, device="cuda").bfloat16().requires_grad_()
    W = (torch.randn(K, D, generator=gen, device="cuda") / D**0.5).requires_grad_()
    b = torch.randn(K, generator=gen, device="cuda").requires_grad_()
    al = [torch.tensor([v], device="cuda").requires_grad_() for v in (0.8, 1.1, 1.3)]
    ins = [x, W, b, *al]
    if a.backward:
        outs = triton_mhc.coefficients(*ins, iters=20, convention="megatron_dsv4")
        gs = [torch.randn_like(o) for o in outs]

        def run():
            return torch.autograd.grad(outs, ins, gs, retain_graph=True)
    else:
        x_TD, w_KD = x.detach().view(T, D), W.detach()

        def run():
            return (triton_proj.proj_forward(x_TD, w_KD, K, KP, True),)
    first = [t.clone() for t in run()]
    bad = torch.zeros((), dtype=torch.int64, device="cuda")
    n, t_end = 0, time.time() + a.seconds
    while time.time() < t_end:
        for _ in range(50):
            bad += sum((o != f).any().long() for o, f in zip(run(), first))
            n += 1
        torch.cuda.synchronize()
    what = "coefficient backward" if a.backward else "projection forward"
    glu = (not a.plain and triton_proj.CONFIG["proj_fwd_gluon"]
           and gluon_proj.available(x.device))
    ws = " warp-specialized" if triton_proj.CONFIG["proj_fwd_gluon_ws"] else " ring"
    form = "plain loads" if a.plain else f"TMA, Gluon{ws}" if glu else "TMA, Triton"
    tile = triton_proj.CONFIG["proj_fwd_gluon_tile" if glu else "proj_fwd_tma_tile"]
    print(f"{torch.cuda.get_device_name()}, {what}, {form}, {tile}: {n} launches, "
          f"{bad.item()} differ")
    return 1 if bad.item() else 0  # a differing launch is a race: fail the run


if __name__ == "__main__":
    raise SystemExit(main())
