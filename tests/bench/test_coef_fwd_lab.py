"""bench/proj_triton_lab.py and bench/proj_gluon_lab.py: the coefficient-forward lab kernels
(kernels_sweeps_h200.md run 12) still compile for Hopper, the Triton variants' loops pass the
same wgmma / copy hazard check as the shipped kernels, and the stream-K slot count is right."""

from __future__ import annotations

import pytest

from tests.model import test_kernels_ir as ir

pytestmark = pytest.mark.triton
triton = pytest.importorskip("triton")
pytest.importorskip("triton.backends.nvidia")

from bench import proj_triton_lab as V  # noqa: E402

CONST = {"K": 24, "KP": 32, "BD": 128, "WS": 0, "STAGES": 3}


@pytest.mark.parametrize("BT, warps, mode, il, pf", [
    (64, 4, 0, 0, 0), (64, 4, 0, 1, 0), (64, 4, 0, 0, 4), (128, 8, 0, 0, 0), (64, 4, 4, 0, 0)])
def test_variant_loops_have_no_copy_over_a_pending_wgmma(BT, warps, mode, il, pf):
    const = {**CONST, "BT": BT, "MODE": mode, "IL": il, "PF": pf, "PF_LINES": int(pf > 0)}
    ttgir, stages = ir._ttgir(V._proj_var_kernel, warps, 3, const,
                              {"x_desc": ir._desc(BT, 128), "w_desc": ir._desc(32, 128),
                               "x_ptr": "*bf16"})
    assert ir._loops(ttgir), "no loop compiled"
    assert ir._hazards(ttgir, stages) == []


def test_stream_k_slots_are_the_most_programs_touching_one_token_block():
    pytest.importorskip("triton.experimental.gluon")  # Triton's Gluon (>= 3.5)
    from bench import proj_gluon_lab as G

    for T, D, BT, BD, P in [(8192, 16384, 128, 128, 132), (8192, 16384, 64, 128, 264),
                            (3001, 4000, 64, 128, 132), (512, 1024, 64, 64, 7)]:
        NT = triton.cdiv(D, BD)
        n = triton.cdiv(T, BT) * NT

        def start(p, n=n, P=P):
            return (p * n) // P

        most = max(sum(1 for p in range(P) if start(p) < (tb + 1) * NT and start(p + 1) > tb * NT)
                   for tb in range(triton.cdiv(T, BT)))
        assert G.sk_slots(T, D, BT, BD, P) == most


@pytest.mark.parametrize("kernel, extra, dots", [
    ("_proj_fwd_gl_kernel", {"SQUARES": 0}, 16), ("_proj_fwd_gl_kernel", {"SQUARES": 2}, 24),
    ("_proj_fwd_gl_sk_kernel", {"SMAX": 3}, 16)])
def test_gluon_forms_compile_for_hopper(kernel, extra, dots):
    pytest.importorskip("triton.experimental.gluon")  # Triton's Gluon (>= 3.5)
    from bench import proj_gluon_lab as G
    from tests.model.test_gluon_proj import gluon_ptx

    ptx = gluon_ptx(getattr(G, kernel), {"K": 24, "KP": 32, "NS": 3, **extra}, 64, 128, 32, 4)
    # the hi and lo wgmmas of a tile (8 k-steps each at BD 128; SQUARES 2 adds x x^T), one
    # wait, TMA loads
    assert ptx.count("wgmma.mma_async") == dots and ptx.count("wgmma.wait_group") == 1
    assert "cp.async.bulk.tensor" in ptx


def test_gluon_in_kernel_weight_split_compiles_for_hopper():
    # the fp32 weight by TMA, split into the pair in shared memory, fenced for the wgmmas
    pytest.importorskip("triton.experimental.gluon")
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import GluonASTSource

    from bench import proj_gluon_lab as G

    fn = G._proj_fwd_gl_w32_kernel
    const = {"K": 24, "KP": 32, "NS": 3, "num_warps": 8}
    sig = {a: "constexpr" if a in const else "i32" for a in fn.arg_names}
    xl = repr(gl.NVMMASharedLayout.get_default_for([128, 128], gl.bfloat16))
    wl = repr(gl.NVMMASharedLayout.get_default_for([32, 128], gl.float32))
    sig.update(part_ptr="*fp32", x_desc=f"tensordesc<bf16[128,128],{xl}>",
               w_desc=f"tensordesc<fp32[32,128],{wl}>")
    ptx = triton.compile(GluonASTSource(fn, sig, const), target=GPUTarget("cuda", 90, 32),
                         options={"num_warps": 8}).asm["ptx"]
    assert ptx.count("wgmma.mma_async") == 16 and ptx.count("wgmma.wait_group") == 1
    assert ptx.count("fence.proxy.async") >= 2 and "st.shared" in ptx
