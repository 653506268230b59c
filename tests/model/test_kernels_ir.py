"""The projection kernels' compiled loops for Hopper (sm_90): no wgmma in flight when a copy
into shared memory is issued.

Triton's software pipeliner prefetches the tiles of later iterations while the wgmma of this
one runs.  A wgmma still pending at that point may be reading the buffer the copy fills:
Triton 3.6 gave x, loaded to registers as well as fed to a wgmma, a ring of 2 buffers at
prefetch distance 2, and the H200 returned a wrong row in about 1% of launches
(``triton_proj._proj_fwd_tma_kernel``, bench/results/tma_race_h200.md).  The check is on the
TTGIR, so it runs wherever Triton's NVIDIA backend compiles (no GPU needed): inside each loop,
taken twice so pending groups carry over, count the async ``warp_group_dot`` issued and lower
the count at each ``warp_group_dot_wait {pendings = p}``; every copy into shared memory must
see 0.  That is stricter than the hazard (a deep enough ring would be safe), and it is what the
kernels guarantee.
"""

from __future__ import annotations

import re

import pytest

pytestmark = pytest.mark.triton
triton = pytest.importorskip("triton")
pytest.importorskip("triton.backends.nvidia")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from mhc_model.kernels import triton_proj, triton_proj_bwd  # noqa: E402
from mhc_model.kernels.triton_head import head_lanes  # noqa: E402

_COPY = re.compile(r"ttng\.async_tma_copy_global_to_local|ttg\.async_copy_global_to_local")
_WAIT = re.compile(r"ttng\.warp_group_dot_wait .*\{pendings = (\d+)")
_DOT = re.compile(r"ttng\.warp_group_dot %.*isAsync = true")


def _ttgir(fn, warps, stages, const, types):
    sig = {}
    for a in fn.arg_names:
        if a in const:
            sig[a] = "constexpr"
        elif a in types:
            sig[a] = types[a]
        else:
            sig[a] = "*fp32" if a.endswith("_ptr") else "i32"
    src = ASTSource(fn, sig, const)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": warps, "num_stages": stages})
    return k.asm["ttgir"]


def _loops(ttgir: str) -> list[list[str]]:
    """Bodies of the scf.for loops, by indentation (nested loops are bodies of their own)."""
    lines = ttgir.splitlines()
    out = []
    for i, line in enumerate(lines):
        if "scf.for" not in line:
            continue
        indent = len(line) - len(line.lstrip())
        body = []
        for nxt in lines[i + 1:]:
            if nxt.strip() == "}" and len(nxt) - len(nxt.lstrip()) == indent:
                break
            body.append(nxt)
        out.append(body)
    return out


def _copies_under_pending_wgmma(ttgir: str) -> list[str]:
    bad = []
    loops = _loops(ttgir)
    assert loops, "no loop in the kernel"
    for body in loops:
        pending = 0
        for rnd in range(2):
            for line in body:
                if _DOT.search(line):
                    pending += 1
                elif m := _WAIT.search(line):
                    pending = min(pending, int(m.group(1)))
                elif _COPY.search(line) and pending and rnd == 1:
                    bad.append(f"{pending} wgmma pending at: {line.strip()[:120]}")
    return bad


def _desc(rows, cols):
    return f"tensordesc<bf16[{rows},{cols}]>"


def _fwd_tma(K, KP):
    BT, BD, warps, stages, _ = triton_proj.CONFIG["proj_fwd_tma_tile"]
    return _ttgir(triton_proj._proj_fwd_tma_kernel, warps, stages,
                  {"K": K, "KP": KP, "BT": BT, "BD": BD},
                  {"x_desc": _desc(BT, BD), "w_desc": _desc(KP, BD)})


def _fwd_plain(K, KP):
    BT, BD, warps, stages, _ = triton_proj.CONFIG["proj_fwd"]
    return _ttgir(triton_proj._proj_fwd_kernel, warps, stages,
                  {"K": K, "KP": KP, "BT": BT, "BD": BD, "SPLIT_BF16": True},
                  {"x_ptr": "*bf16", "w_ptr": "*bf16"})


def _bwd_tma(key, agg, extra):
    BT, BD, warps, stages, _, _ = triton_proj.CONFIG[key]
    d = _desc(BT, BD)
    return _ttgir(triton_proj_bwd._proj_bwd_tma_kernel, warps, stages,
                  {"K": 24, "KP": 32, "BT": BT, "BD": BD, "AGG": agg, "EXTRA": extra},
                  {"x_desc": d, "dx_desc": d, "du_desc": d, "dxe_desc": d,
                   "dp_desc": _desc(BT, 64)})


def _bwd_plain(key, agg):
    BT, BD, warps, stages, dw_t, _ = triton_proj.CONFIG[key]
    bf = "*bf16"
    return _ttgir(triton_proj_bwd._proj_bwd_kernel, warps, stages,
                  {"K": 24, "KP": 32, "BT": BT, "BD": BD, "SPLIT_BF16": True,
                   "PRESPLIT": True, "DW_T": dw_t, "AGG": agg, "EXTRA": False},
                  {"x_ptr": bf, "dproj_ptr": bf, "dx_ptr": bf, "du_ptr": bf, "dxe_ptr": bf})


CASES = {
    # the coefficient projection (N 4: K 24, KP 32) and the learned head's (K = N 4)
    "fwd_tma_coef": lambda: _fwd_tma(24, 32),
    "fwd_tma_head": lambda: _fwd_tma(4, head_lanes(4)),
    "fwd_plain_coef": lambda: _fwd_plain(24, 32),
    "bwd_tma": lambda: _bwd_tma("proj_bwd", False, False),
    "bwd_tma_site": lambda: _bwd_tma("proj_bwd_site", True, True),
    "bwd_plain": lambda: _bwd_plain("proj_bwd", False),
    "bwd_plain_site": lambda: _bwd_plain("proj_bwd_site", True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_no_wgmma_in_flight_at_a_shared_memory_copy(case):
    ttgir = CASES[case]()
    assert _DOT.search(ttgir), "the loop has no async wgmma: the check would see nothing"
    bad = _copies_under_pending_wgmma(ttgir)
    assert not bad, f"{case}: " + "; ".join(bad)
