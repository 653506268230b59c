"""Coefficient-forward variants on one GPU, against the shipped kernels (issue 16 sweeps).

Not a benchmark of record (that is ``bench/kernels.py``): a lab bench for the pieces of the
coefficient forward (weight split, projection, epilogue) at T 8192, C 4096, n 4, bf16.
Every variant writes the shipped partial layout ``[S, T, KP]``, so any projection runs with
any epilogue, and each whole forward is checked against the shipped outputs.  The groups are
the tables of bench/results/kernels_sweeps_h200.md run 12 (12a-12c here, 12d the Gluon forms
of ``bench/proj_gluon_lab.py``: groups gluon, ws, sk).

The Triton variants are ``bench/proj_triton_lab.py``'s (run 12a-12c), the Gluon forms
``bench/proj_gluon_lab.py``'s (run 12d, 13).  ``--interleave R`` times every variant once a
round for R rounds under one profile and reports medians (``bench/timing.interleaved_us``).

    PYTHONPATH=. python bench/coef_fwd_variants.py [--rounds 3] [--only 12a,gluon,ws,...]
"""

from __future__ import annotations

import argparse
import itertools

import torch
import triton
from triton.testing import do_bench_cudagraph

from bench.proj_triton_lab import EPS, ITERS, KP, C, D, K, N, T, epi_var, proj_var
from bench.timing import interleaved_us, kernel_us
from mhc_model.conventions import convention
from mhc_model.kernels import triton_coef, triton_proj
from mhc_model.kernels.triton_proj import proj_split


def _setup():
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(T, D, generator=gen, device="cuda").bfloat16()
    W = torch.randn(K, D, generator=gen, device="cuda") / D**0.5
    b = torch.randn(K, generator=gen, device="cuda")
    al = [torch.tensor([0.5], device="cuda") for _ in range(3)]
    return x, W, b, al


def shipped(x, W, b, al, **config):
    """The shipped coefficient forward, under ``triton_proj.CONFIG`` overrides ``config``."""
    old = {k: triton_proj.CONFIG[k] for k in config}
    triton_proj.CONFIG.update(config)
    try:
        return triton_coef.coef_forward(x.view(T, N, C), W, b, al, ITERS, "deepseek", EPS)[0]
    finally:
        triton_proj.CONFIG.update(old)


def _diff(a, b):
    return max(float((p - q).abs().max() / q.abs().max().clamp_min(1e-30)) for p, q in zip(a, b))


# (label, tile, MODE, IL, WS, PF, PF_LINES) per table of kernels_sweeps_h200.md run 12
_B = triton_proj.CONFIG["proj_fwd_tma_tile"]  # the shipped tile
PROJ_GROUPS = {
    "12a": [("var", _B, 0, 0, 0, 0, 0), ("var IL", _B, 0, 1, 0, 0, 0),
            ("var (64,128,8,3,2)", (64, 128, 8, 3, 2), 0, 0, 0, 0, 0),
            ("var WS (64,128,8,3,2)", (64, 128, 8, 3, 2), 0, 0, 1, 0, 0),
            ("var IL WS (64,128,8,3,2)", (64, 128, 8, 3, 2), 0, 1, 1, 0, 0),
            ("var WS (64,128,8,4,2)", (64, 128, 8, 4, 2), 0, 0, 1, 0, 0),
            ("sq only (floor)", _B, 1, 0, 0, 0, 0),
            ("sq only 6 stages", (64, 128, 4, 6, 2), 1, 0, 0, 0, 0),
            ("sq only IL", _B, 1, 1, 0, 0, 0), ("dots only", _B, 2, 0, 0, 0, 0),
            ("sq + w loads", _B, 3, 0, 0, 0, 0),
            ("var (128,128,8,4,1)", (128, 128, 8, 4, 1), 0, 0, 0, 0, 0),
            ("var (128,128,8,4,2)", (128, 128, 8, 4, 2), 0, 0, 0, 0, 0),
            ("var (128,128,8,3,1)", (128, 128, 8, 3, 1), 0, 0, 0, 0, 0),
            ("var WS (128,128,8,3,1)", (128, 128, 8, 3, 1), 0, 0, 1, 0, 0),
            ("var IL (128,128,8,4,1)", (128, 128, 8, 4, 1), 0, 1, 0, 0, 0)],
    "12b": [("var", _B, 0, 0, 0, 0, 0)]
    + [(f"var PF={pf}", _B, 0, 0, 0, pf, 0) for pf in (2, 3, 4, 6)]
    + [("var PF=4 IL", _B, 0, 1, 0, 4, 0),
       ("var PF=4 (64,128,4,2,2)", (64, 128, 4, 2, 2), 0, 0, 0, 4, 0),
       ("var PF=4 (64,128,4,2,3)", (64, 128, 4, 2, 3), 0, 0, 0, 4, 0),
       ("var PF=4 (128,128,8,3,1)", (128, 128, 8, 3, 1), 0, 0, 0, 4, 0),
       ("var PF=8 (128,128,8,3,1)", (128, 128, 8, 3, 1), 0, 0, 0, 8, 0),
       ("sq only (floor)", _B, 1, 0, 0, 0, 0), ("sq only PF=4", _B, 1, 0, 0, 4, 0),
       ("fixed W: dots + sq", _B, 4, 0, 0, 0, 0), ("fixed W: dots only", _B, 5, 0, 0, 0, 0),
       ("dots only", _B, 2, 0, 0, 0, 0)],
    "12c": [("var", _B, 0, 0, 0, 0, 0)]
    + [(f"var lines PF={pf}", _B, 0, 0, 0, pf, 1) for pf in (2, 4, 8)]
    + [(f"var lines PF={pf} (64,128,4,2,3)", (64, 128, 4, 2, 3), 0, 0, 0, pf, 1)
       for pf in (4, 6)]
    + [("var lines PF=4 (128,128,8,3,1)", (128, 128, 8, 3, 1), 0, 0, 0, 4, 1),
       ("sq only lines PF=4", _B, 1, 0, 0, 4, 1)],
}
# Gluon forms (run 12d): (BT, BD, NS, warps, programs per SM) / ws: (BT, NS, warps, per SM,
# maxnreg) / stream-K: (BT, BD, NS, warps, programs per SM)
GLUON = [(64, 128, 3, 4, 2), (64, 128, 2, 4, 3), (64, 128, 3, 4, 3), (128, 128, 4, 8, 1),
         (128, 128, 3, 8, 2), (128, 128, 2, 8, 2), (128, 64, 4, 8, 2), (128, 64, 8, 8, 1),
         (256, 128, 2, 8, 1)]
GLUON_SK = [(128, 128, 4, 8, 1), (64, 128, 3, 4, 2), (128, 64, 8, 8, 1), (128, 64, 4, 8, 2),
            (128, 128, 3, 8, 1)]
# (BT, BD, NS, warps, per_sm, mode): mode 1 x as the wgmma A operand in registers, squares
# from them, 2 the same with the squares as the diagonal of x x^T on the tensor cores
# (``proj_gluon_lab._tile_areg``); mode 0 the same ring reading x back for the squares
GLUON_AREG = [(64, 128, 3, 4, 2, 0), (64, 128, 3, 4, 2, 1), (64, 128, 3, 4, 2, 2),
              (64, 128, 2, 4, 3, 1), (64, 128, 2, 4, 3, 2), (64, 128, 4, 4, 2, 1),
              (128, 128, 4, 8, 1, 0), (128, 128, 4, 8, 1, 1), (128, 128, 2, 8, 2, 1),
              (128, 128, 3, 8, 1, 1)]
# the A / B set for ``--interleave`` (run 13): the best areg rows of run 12's first call,
# their read-back twins and the shipped tile's neighbours
GLUON_AREG2 = [(128, 128, 3, 8, 1, 1), (128, 128, 3, 8, 1, 0), (128, 128, 4, 8, 1, 1),
               (128, 128, 2, 8, 1, 1), (64, 128, 3, 4, 2, 1), (64, 128, 2, 4, 3, 2),
               (128, 64, 5, 8, 1, 1), (256, 128, 2, 8, 1, 1)]
# run 13b: the shipped Gluon tile against warp-specialized areg forms (BT, NS, warps, per_sm,
# maxnreg) and larger tiles (BT, BD, NS, warps, per_sm, mode)
# (BT, NS, warps, per_sm) of gluon_proj's warp-specialized kernel; 13e ran the lab's copy of
# it (maxnreg 168 / none / 168 / 168 at NS 3 / 3 / 4 / 2)
AREG_WS = [(128, 3, 8, 1), (128, 4, 8, 1), (128, 2, 8, 1)]
AREG_TILES = [(128, 256, 2, 8, 1, 1), (128, 128, 3, 8, 1, 1)]
GROUPS = (*PROJ_GROUPS, "gluon", "areg", "areg2", "areg3", "sk", "epi", "split")


def _variants(only, x, W, b, al, conv):
    """{label: a whole coefficient forward} for the groups in ``only`` (the shipped form
    first)."""
    def epilogue(part):
        return triton_coef.coef_epilogue(part, b, al, N, D, ITERS, conv, EPS)[:3]

    def pair():
        return triton_proj.split_weight(W, KP)

    def parts(S):
        return torch.empty((S, T, KP), dtype=torch.float32, device=x.device)

    variants = {"shipped": lambda: shipped(x, W, b, al)}
    if only & {"areg2", "areg3"}:  # the Triton TMA kernel, shipped before gluon_proj
        variants["shipped, proj_fwd_gluon False"] = lambda: shipped(x, W, b, al,
                                                                    proj_fwd_gluon=False)
    for group in only & set(PROJ_GROUPS):
        for name, tile, mode, il, ws, pf, lines in PROJ_GROUPS[group]:
            variants[f"{group} proj {name}"] = (
                lambda tile=tile, mode=mode, il=il, ws=ws, pf=pf, lines=lines: epilogue(
                    proj_var(x, W, tile, mode, bool(il), bool(ws), pf=pf,
                             pf_lines=bool(lines))))
    if only & {"gluon", "areg", "areg2", "areg3", "sk"}:
        from bench import proj_gluon_lab as G
    rows = [(*c, 0) for c in GLUON] if "gluon" in only else []
    rows += GLUON_AREG if "areg" in only else []
    rows += AREG_TILES if "areg3" in only else []
    for BT, BD, NS, warps, per_sm, mode in rows + (GLUON_AREG2 if "areg2" in only else []):
        def run(BT=BT, BD=BD, NS=NS, warps=warps, per_sm=per_sm, mode=mode):
            S, dps = proj_split(T, D, BT, BD, per_sm, x.device)
            return epilogue(G.launch(x, pair(), parts(S), S, dps, K, KP, BT=BT, BD=BD,
                                     NS=NS, warps=warps, squares=mode))
        tag = ("", " areg (shipped gluon_proj)", " areg sq_mma")[mode]
        name = f"gluon{tag} BT={BT} BD={BD} NS={NS} w={warps} per_sm={per_sm}"
        variants[name + " again" * (name in variants)] = run
    if "areg3" in only:
        for BT, NS, warps, per_sm in AREG_WS:
            def run(BT=BT, NS=NS, warps=warps, per_sm=per_sm):
                S, dps = proj_split(T, D, BT, 128, per_sm, x.device)
                return epilogue(G.launch(x, pair(), parts(S), S, dps, K, KP, BT=BT, NS=NS,
                                         warps=warps, squares=1, ws=True))
            variants[f"gluon ws areg (gluon_proj ws) BT={BT} NS={NS} w={warps} "
                     f"per_sm={per_sm}"] = run
        for BT, NS in ((128, 3), (128, 2)):
            def run(BT=BT, NS=NS):  # the weight split in the kernel (no split launch)
                S, dps = proj_split(T, D, BT, 128, 1, x.device)
                return epilogue(G.launch_w32(x, W, parts(S), S, dps, K, KP, BT=BT, NS=NS))
            variants[f"gluon w32 BT={BT} BD=128 NS={NS} w=8 per_sm=1"] = run
        variants["shipped (again, last)"] = lambda: shipped(x, W, b, al)
    if "sk" in only:
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count
        for BT, BD, NS, warps, per_sm in GLUON_SK:
            def run(BT=BT, BD=BD, NS=NS, warps=warps, P=per_sm * sms):
                part = parts(G.sk_slots(T, D, BT, BD, P))
                return epilogue(G.launch_sk(x, pair(), part, K, KP, P, BT=BT, BD=BD, NS=NS,
                                            warps=warps))
            variants[f"gluon sk BT={BT} BD={BD} NS={NS} w={warps} P={per_sm}x{sms}"] = run
    if "epi" in only:
        for BT, warps, sp in [(16, 1, True), (16, 1, False), (32, 1, True), (8, 1, True),
                              (16, 2, True)]:
            variants[f"epi unrolled BT={BT} w={warps} proj={int(sp)}"] = (
                lambda BT=BT, warps=warps, sp=sp: epi_var(
                    triton_proj.proj_forward(x, W, K, KP, True), b, al, BT, warps, sp))
    if "split" in only:
        for bd, warps in itertools.product((64, 128, 256), (1, 2, 4)):
            def run(bd=bd, warps=warps):
                out = torch.empty((2, KP, D), dtype=torch.bfloat16, device=x.device)
                triton_proj._split_w_kernel[(triton.cdiv(D, bd),)](
                    W, out, D, K=K, KP=KP, BD=bd, num_warps=warps)
                return out
            variants[f"split BD={bd} w={warps}"] = run
    return variants


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", default="12a,epi,split",
                    help=f"comma-separated groups of {', '.join(GROUPS)}")
    ap.add_argument("--interleave", type=int, default=0, metavar="R",
                    help="instead of --rounds: R rounds of one call per variant under one "
                         "profile, medians (interleaved_us)")
    args = ap.parse_args()
    only = set(args.only.split(","))
    if only - set(GROUPS):
        raise SystemExit(f"unknown groups {sorted(only - set(GROUPS))}; known: {GROUPS}")
    x, W, b, al = _setup()
    conv = convention("deepseek")
    f = conv.kernel_flags()
    assert not f["RMS_INV_NORM"] and f["SINKHORN_SOFTMAX"] and f["PRE_EPS"], f
    ref = shipped(x, W, b, al)
    wpair = triton_proj.split_weight(W, KP)
    variants = _variants(only, x, W, b, al, conv)
    results = {k: [] for k in variants}
    errs = {}
    for name, fn in variants.items():
        try:
            out = fn()
            torch.cuda.synchronize()
            if name.startswith("split"):
                errs[name] = float((out.float() - wpair.float()).abs().max())
            elif "only" in name or "w loads" in name or "fixed W" in name:
                errs[name] = float("nan")  # timing references: not the shipped outputs
            else:
                errs[name] = _diff(out, ref)
        except Exception as e:  # a variant that does not compile is reported, not fatal
            errs[name] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
    if args.interleave:
        ok = {k: v for k, v in variants.items() if not isinstance(errs[k], str)}
        res = interleaved_us(ok, args.interleave)
        print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton "
              f"{triton.__version__}; T {T}, C {C}, n {N}; {args.interleave} rounds, one "
              "call per variant a round, one profile; medians")
        print("| variant | kernel sum µs (median) | quartiles | vs shipped | per kernel µs "
              "(medians) |")
        print("|---|---|---|---|---|")
        for name, (med, sums, per) in res.items():
            q = sorted(sums)
            print(f"| {name} | {med:.1f} | {q[len(q) // 4]:.1f}-{q[(3 * len(q)) // 4]:.1f} | "
                  f"{errs[name]:.2e} | " + ", ".join(f"{k}={v:.1f}" for k, v in per.items())
                  + " |")
        for name in variants:
            if isinstance(errs[name], str):
                print(f"| {name} | | | {errs[name]} | |")
        return
    for _ in range(args.rounds):
        for name, fn in variants.items():
            if isinstance(errs[name], str):
                continue
            tot, per = kernel_us(fn)
            span = do_bench_cudagraph(fn, rep=50) * 1e3
            results[name].append((tot, span, per))
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton "
          f"{triton.__version__}; T {T}, C {C}, n {N}; {args.rounds} rounds interleaved")
    print("| variant | kernel sum µs (min-max) | span µs (min) | vs shipped | per kernel µs |")
    print("|---|---|---|---|---|")
    for name, rs in results.items():
        if not rs:
            print(f"| {name} | | | {errs[name]} | |")
            continue
        tots = [r[0] for r in rs]
        per = min(rs, key=lambda r: r[0])[2]
        e = errs[name]
        print(f"| {name} | {min(tots):.1f}-{max(tots):.1f} | {min(r[1] for r in rs):.1f} | "
              f"{e:.2e} | " + ", ".join(f"{k}={v:.1f}" for k, v in per.items()) + " |")


if __name__ == "__main__":
    main()
