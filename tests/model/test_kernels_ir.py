"""The projection kernels' compiled loops for Hopper (sm_90): no copy into shared memory
overwrites a buffer that a pending wgmma may still read.

Triton's software pipeliner prefetches the tiles of later iterations (num_stages - 1 ahead)
while the wgmma of this one runs.  Triton 3.6 gave x, loaded to registers as well as fed to a
wgmma, a ring of only 2 buffers at prefetch distance 2, and the H200 returned a wrong row in
about 1% of launches (``triton_proj._proj_fwd_tma_kernel``, bench/results/tma_race_h200.md).
The check reads the TTGIR, so it runs wherever Triton's NVIDIA backend compiles (no GPU
needed).  Inside each loop, taken three times so pending groups carry over, it keeps the
async ``warp_group_dot`` issued and drops them at each ``warp_group_dot_wait {pendings = p}``
(all but the newest p).  At every copy into a shared-memory buffer, no pending wgmma may read
that buffer unless its ring is deep enough for any prefetch distance the pipeliner can use
(1 .. num_stages - 1): num_stages buffers for a wgmma of this iteration, one more for each
iteration it has been pending.
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
_DOT = re.compile(r"ttng\.warp_group_dot (%[\w.]+), (%[\w.]+),.*isAsync = true")
_DEF = re.compile(r"^\s*(%[\w.]+)(?::\d+)? = (\S+) (%[\w.]+)")
_RING = re.compile(r"^\s*(%[\w.]+) = ttg\.local_alloc : \(\) -> !ttg\.memdesc<(\d+)x\d+x\d+x")
_VIEWS = ("ttg.memdesc_index", "ttg.memdesc_trans", "ttg.memdesc_subslice")
_NAME = re.compile(r"^\s*(%[\w.]+)(?::\d+)? = ")


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
    return k.asm["ttgir"], stages


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


def _hazards(ttgir: str, stages: int) -> list[str]:
    rings = {m.group(1): int(m.group(2)) for m in map(_RING.match, ttgir.splitlines()) if m}
    src = {}  # value -> the buffer it is a view of (SSA names are unique in the function)
    for line in ttgir.splitlines():
        m = _DEF.match(line)
        if m and m.group(2) in _VIEWS:
            src[m.group(1)] = src.get(m.group(3), m.group(3))
    loops = _loops(ttgir)
    assert loops, "no loop in the kernel"
    bad = []
    for body in loops:
        defined = {m.group(1) for m in map(_NAME.match, body) if m}
        defined -= set(src)  # views are traced
        pending: list[list[tuple[int, str]]] = []  # per wgmma: (round issued, buffer) each
        for rnd in range(3):
            for line in body:
                if m := _DOT.search(line):
                    # its shared-memory operands (register A operands are ptxas's to guard)
                    types = line.split("} : ", 1)[1].split(" -> ")[0].split(" * ")
                    pending.append([(rnd, src.get(op, op)) for op, ty in zip(m.groups(), types)
                                    if ty.startswith("!ttg.memdesc")])
                elif m := _WAIT.search(line):
                    keep = int(m.group(1))
                    pending = pending[len(pending) - keep:] if keep else []
                elif (m := _COPY.search(line)) and rnd == 2:
                    dst = re.search(r"\] (%[\w.]+)", line).group(1)
                    dst = src.get(dst, dst)
                    for issued, buf in (op for ops in pending for op in ops):
                        if buf in defined:  # made in the loop by something not a view
                            bad.append(f"untraced operand {buf} of a pending wgmma")
                            continue
                        # the copy fills slot i + d (d in 1 .. stages - 1) of a ring of R; a
                        # wgmma issued k iterations ago reads slot i - k: safe iff R >= stages + k
                        k, depth = rnd - issued, rings.get(buf, 1)
                        if buf == dst and depth < stages + k:
                            bad.append(f"{buf} (ring of {depth}, {stages} stages) is read by a "
                                       f"wgmma issued {k} iterations back and still pending "
                                       f"at: {line.strip()[:80]}")
    return bad


def _desc(rows, cols):
    return f"tensordesc<bf16[{rows},{cols}]>"


def _fwd_tma(K, KP, stages=None):
    BT, BD, warps, cfg_stages, _ = triton_proj.CONFIG["proj_fwd_tma_tile"]
    stages = stages or cfg_stages
    return _ttgir(triton_proj._proj_fwd_tma_kernel, warps, stages,
                  {"K": K, "KP": KP, "BT": BT, "BD": BD},
                  {"x_desc": _desc(BT, BD), "w_desc": _desc(KP, BD)})


def _fwd_plain(K, KP):
    BT, BD, warps, stages, _ = triton_proj.CONFIG["proj_fwd"]
    return _ttgir(triton_proj._proj_fwd_kernel, warps, stages,
                  {"K": K, "KP": KP, "BT": BT, "BD": BD, "SPLIT_BF16": True},
                  {"x_ptr": "*bf16", "w_ptr": "*bf16"})


def _bwd_tma(key, agg, extra, stages=None, K=24, KP=32):
    BT, BD, warps, cfg_stages, _, _ = triton_proj.CONFIG[key]
    stages = stages or cfg_stages
    d = _desc(BT, BD)
    return _ttgir(triton_proj_bwd._proj_bwd_tma_kernel, warps, stages,
                  {"K": K, "KP": KP, "BT": BT, "BD": BD, "AGG": agg, "EXTRA": extra},
                  {"x_desc": d, "dx_desc": d, "du_desc": d, "dxe_desc": d,
                   "dp_desc": _desc(BT, 2 * KP)})


def _bwd_plain(key, agg, K=24, KP=32, group=False, N=4, mixg=None, extra=False):
    BT, BD, warps, stages, dw_t, _ = triton_proj.CONFIG[key]
    bf = "*bf16"
    return _ttgir(triton_proj_bwd._proj_bwd_kernel, warps, stages,
                  {"N": N, "K": K, "KP": KP, "BT": BT, "BD": N * BD if group else BD,
                   "SPLIT_BF16": True, "PRESPLIT": True, "DW_T": dw_t, "AGG": agg,
                   "EXTRA": extra, "GROUP": group, "MIXG": group if mixg is None else mixg,
                   "MIX_T": True},
                  {"x_ptr": bf, "dproj_ptr": bf, "dx_ptr": bf, "du_ptr": bf, "dxe_ptr": bf,
                   "g_ptr": bf})


CASES = {
    # the coefficient projection (N 4: K 24, KP 32) and the learned head's (K = N 4)
    "fwd_tma_coef": lambda: _fwd_tma(24, 32),
    "fwd_tma_head": lambda: _fwd_tma(4, head_lanes(4)),
    "fwd_plain_coef": lambda: _fwd_plain(24, 32),
    "bwd_tma": lambda: _bwd_tma("proj_bwd", False, False),
    "bwd_tma_site": lambda: _bwd_tma("proj_bwd_site", True, True),
    "bwd_plain": lambda: _bwd_plain("proj_bwd", False),
    "bwd_plain_site": lambda: _bwd_plain("proj_bwd_site", True),
    # GROUP tiles: a C block of every stream, the mix's dx formed from g (MIXG) or EXTRA
    "bwd_plain_group": lambda: _bwd_plain("proj_bwd_group", True, group=True),
    "bwd_plain_group_extra": lambda: _bwd_plain("proj_bwd_group", True, group=True,
                                                mixg=False, extra=True),
    "bwd_plain_head_group": lambda: _bwd_plain("proj_bwd_group", True, K=4, KP=head_lanes(4),
                                               group=True, mixg=False),
    "bwd_plain_head": lambda: _bwd_plain("proj_bwd_site", True, K=4, KP=head_lanes(4)),
    "bwd_tma_head": lambda: _bwd_tma("proj_bwd_site", True, False, K=4, KP=head_lanes(4)),
    # N 6 (K 48, KP 64) and N 2 (K 8, KP 16): wider and narrower dots
    "fwd_tma_coef_n6": lambda: _fwd_tma(48, 64),
    "bwd_tma_n6": lambda: _bwd_tma("proj_bwd", False, False, K=48, KP=64),
    "fwd_tma_coef_n2": lambda: _fwd_tma(8, 16),
    "bwd_tma_n2": lambda: _bwd_tma("proj_bwd", False, False, K=8, KP=16),
    # the stage counts bench/kernels.py sweeps
    "fwd_tma_coef_2_stages": lambda: _fwd_tma(24, 32, 2),
    "fwd_tma_coef_4_stages": lambda: _fwd_tma(24, 32, 4),
    "bwd_tma_2_stages": lambda: _bwd_tma("proj_bwd", False, False, 2),
    "bwd_tma_4_stages": lambda: _bwd_tma("proj_bwd", False, False, 4),
}


@pytest.mark.parametrize("case", list(CASES))
def test_no_copy_overwrites_what_a_pending_wgmma_reads(case):
    ttgir, stages = CASES[case]()
    assert _DOT.search(ttgir), "the loop has no async wgmma: the check would see nothing"
    bad = _hazards(ttgir, stages)
    assert not bad, f"{case}: " + "; ".join(bad)


def test_group_tiles_need_a_power_of_two_and_whole_blocks(monkeypatch):
    # GROUP tiles reshape [BT, N, BC] to [BT, N BC] (N a power of two) and never straddle C
    BC = triton_proj.CONFIG["proj_bwd_group"][1]
    assert triton_proj.group_ok(4, 16 * BC) and triton_proj.group_ok(2, BC)
    assert not triton_proj.group_ok(6, 16 * BC)
    assert not triton_proj.group_ok(4, 16 * BC + BC // 2)
    for mode in ("group", "group_mixg"):
        monkeypatch.setitem(triton_proj.CONFIG, "proj_bwd_site_tiles", mode)
        assert triton_proj.site_tiles(4, 16 * BC) == mode
        assert triton_proj.site_tiles(6, 16 * BC) == "stream"
    assert triton_proj.head_group(4, 16 * BC) and not triton_proj.head_group(6, 16 * BC)
    monkeypatch.setitem(triton_proj.CONFIG, "proj_bwd_head_group", False)
    assert not triton_proj.head_group(4, 16 * BC)
