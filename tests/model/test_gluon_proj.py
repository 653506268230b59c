"""``mhc_model.kernels.gluon_proj`` compiled for Hopper (sm_90), no GPU needed: the loop takes x
from registers (ldmatrix into the wgmma A operand, no read-back of the tile for the squares),
issues the hi and lo wgmmas of a tile with one wait, and refills the ring by TMA.  Its numbers
against the reference and its bitwise repeatability are GPU tests (test_kernels_gpu.py, the
"gluon" form)."""

from __future__ import annotations

import re

import pytest

pytestmark = pytest.mark.triton
triton = pytest.importorskip("triton")
pytest.importorskip("triton.backends.nvidia")
pytest.importorskip("triton.experimental.gluon")  # Triton's Gluon (>= 3.5)

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.experimental.gluon import language as gl  # noqa: E402
from triton.experimental.gluon._runtime import GluonASTSource  # noqa: E402

from mhc_model.kernels import gluon_proj, triton_proj  # noqa: E402


def gluon_ptx(fn, const: dict, BT: int, BD: int, KP: int, warps: int) -> str:
    """PTX of a Gluon projection kernel (x boxes [BT, BD], weight-pair boxes [2 KP, BD])."""
    sig = {a: "constexpr" if a in const else "i32" for a in fn.arg_names}
    xl = repr(gl.NVMMASharedLayout.get_default_for([BT, BD], gl.bfloat16))
    wl = repr(gl.NVMMASharedLayout.get_default_for([2 * KP, BD], gl.bfloat16))
    sig.update(part_ptr="*fp32", x_desc=f"tensordesc<bf16[{BT},{BD}],{xl}>",
               w_desc=f"tensordesc<bf16[{2 * KP},{BD}],{wl}>")
    k = triton.compile(GluonASTSource(fn, sig, {**const, "num_warps": warps}),
                       target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    return k.asm["ptx"]


@pytest.mark.parametrize("ws", [True, False], ids=["ws", "ring"])
@pytest.mark.parametrize("BT, BD, warps, NS, K, KP", [
    (*triton_proj.CONFIG["proj_fwd_gluon_tile"][:4], 24, 32),  # the shipped tile
    (64, 128, 4, 3, 24, 32),
    (128, 128, 8, 3, 4, 16)])  # the learned head's lanes (N 4)
def test_loop_feeds_the_wgmma_from_registers(BT, BD, warps, NS, K, KP, ws):
    const = {"K": K, "KP": KP, "NS": NS}
    if ws:
        fn, const = gluon_proj._proj_fwd_gluon_ws_kernel, {**const,
                                                           "LOAD_REGS": gluon_proj.LOAD_REGS}
    else:
        fn = gluon_proj._proj_fwd_gluon_kernel
    ptx = gluon_ptx(fn, const, BT, BD, KP, warps)
    mma = re.findall(rf"wgmma\.mma_async\.sync\.aligned\.m64n{KP}k16\.f32\.bf16\.bf16 "
                     r"\{[^}]*\}, (\S+)", ptx)
    # hi and lo wgmmas over the tile's BD / 16 k-steps, each with A in four registers
    assert len(mma) == 2 * BD // 16, len(mma)
    assert all(a.startswith("{%r") for a in mma), "an A operand is read from shared memory"
    assert ptx.count("wgmma.wait_group") == 1
    # x is read from shared memory once, by ldmatrix (m8n8.x4: 16 x 16 a warp), never read
    # back by plain shared loads (ws: one byte of the partitions' own state is)
    assert ptx.count("ldmatrix") == BD // 16
    assert not re.findall(r"ld\.shared(?!\.b8)", ptx)
    # x and the weight pair by TMA: the ring's NS - 1 prologue refills and its loop's one;
    # the producer warp's loop (ws), which the compiler may peel
    copies = ptx.count("cp.async.bulk.tensor")
    assert copies == 2 * NS if not ws else copies >= 2 and copies % 2 == 0


def test_available_only_on_hopper_cuda_devices():
    import torch

    assert not gluon_proj.available(torch.device("cpu"))


@pytest.mark.parametrize("version, ok", [
    ("3.6.0", True), ("3.7.1", True), ("4.0.0", True), ("3.6.0+git1234", True),
    ("3.10.0", True), ("3.5.1", False), ("2.9.0", False), ("dev", False)])
def test_triton_version_gate(version, ok):
    # written and measured on Triton 3.6: older Gluon APIs differ (warp_specialize)
    assert gluon_proj.triton_ok(version) is ok
