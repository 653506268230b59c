"""Mamba2 (`M`) and Gated DeltaNet (`G`) layers and their chunked scans.

The references here are written independently of the package: per-timestep recurrences in
float64, straight from the Mamba2 / Gated DeltaNet papers (and Megatron-Core 0.19.2's layer
math), and compared to the fp32 chunked implementations.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from mhc_model.config import GDNConfig, HybridConfig, MambaConfig, MLPConfig
from mhc_model.layers.gdn import GDNLayer
from mhc_model.layers.mamba2 import Mamba2Layer
from tests.model.ssm_naive import assert_close64, naive_gated_delta, naive_ssd
from tests.paths import MEGATRON_FIXTURE

FIXTURE_KEYS = (
    MEGATRON_FIXTURE / "keys.json"
)


# ---- (3) state-dict keys and shapes -----------------------------------------------------------
def mamba_cfg(**kw) -> HybridConfig:
    """The Megatron fixture's Mamba2: hidden 64, d_state 16, head_dim 16, 2 groups, expand 2."""
    mamba = MambaConfig(d_state=16, head_dim=16, num_groups=2, expand=2, d_conv=4, chunk_size=8)
    return HybridConfig(hybrid_layer_pattern="M*-M-", hidden_size=64, mamba=mamba, **kw)


def gdn_cfg(**kw) -> HybridConfig:
    gdn = GDNConfig(num_key_heads=2, num_value_heads=4, key_head_dim=16, value_head_dim=8,
                    conv_kernel=4, chunk_size=8)
    return HybridConfig(hybrid_layer_pattern="G-G*", hidden_size=64, gdn=gdn, **kw)


MAMBA_SHAPES = {
    "mixer.in_proj.layer_norm_weight": (64,),
    "mixer.in_proj.weight": (328, 64),  # z 128 | x 128 | B 32 | C 32 | dt 8
    "mixer.conv1d.weight": (192, 1, 4),  # x 128 | B 32 | C 32
    "mixer.conv1d.bias": (192,),
    "mixer.A_log": (8,),
    "mixer.D": (8,),
    "mixer.dt_bias": (8,),
    "mixer.norm.weight": (128,),
    "mixer.out_proj.weight": (64, 128),
}
GDN_SHAPES = {
    "self_attention.in_proj.layer_norm_weight": (64,),
    # query 32 | key 32 | value 32 | z 32 | beta 4 | alpha 4
    "self_attention.in_proj.weight": (136, 64),
    "self_attention.conv1d.weight": (96, 1, 4),  # query | key | value, no bias in Megatron
    "self_attention.A_log": (4,),
    "self_attention.dt_bias": (4,),
    "self_attention.out_norm.weight": (8,),
    "self_attention.out_proj.weight": (64, 32),
}


def test_mamba_state_dict_keys_and_shapes():
    sd = Mamba2Layer(mamba_cfg()).state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == MAMBA_SHAPES


def test_gdn_state_dict_keys_and_shapes():
    sd = GDNLayer(gdn_cfg()).state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == GDN_SHAPES


def test_mamba_keys_match_megatron_fixture():  # committed fixture: missing fails, never skips
    """Megatron's torch_dist splits in_proj/conv1d into named parts; merged in file order they
    must be exactly our tensors (same rows, same order)."""
    keys = json.loads(FIXTURE_KEYS.read_text())["keys"]
    prefix = "decoder.layers.0."
    ours = {k: tuple(v.shape) for k, v in Mamba2Layer(mamba_cfg()).state_dict().items()}
    merged: dict[str, list] = {}
    plain: set[str] = set()
    for key, shape in keys.items():
        if not key.startswith(prefix) or shape == "bytes":
            continue
        name = key[len(prefix):]
        base, _, part = name.rpartition(".")
        if part in {"z", "x", "B", "C", "dt"}:
            merged.setdefault(base, []).append((part, shape))
        else:
            plain.add(name)
            assert ours[name] == tuple(shape), name
    assert [p for p, _ in merged["mixer.in_proj.weight"]] == ["z", "x", "B", "C", "dt"]
    assert [p for p, _ in merged["mixer.conv1d.weight"]] == ["x", "B", "C"]
    assert [p for p, _ in merged["mixer.conv1d.bias"]] == ["x", "B", "C"]
    for name, parts in merged.items():
        rows = sum(shape[0] for _, shape in parts)
        assert ours[name] == (rows, *parts[0][1][1:]), name
    assert set(ours) == plain | set(merged)


def test_init_is_deterministic_and_in_range():
    for make in (lambda: Mamba2Layer(mamba_cfg()), lambda: GDNLayer(gdn_cfg())):
        torch.manual_seed(7)
        a = make().state_dict()
        torch.manual_seed(7)
        b = make().state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
    torch.manual_seed(0)
    m = Mamba2Layer(mamba_cfg()).mixer
    dt = F.softplus(m.dt_bias.float())
    assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 1e-1 * 1.001
    A = m.A_log.exp()
    assert A.min() >= 1 and A.max() <= 16
    assert torch.equal(m.D, torch.ones(8)) and torch.equal(m.norm.weight, torch.ones(128))
    assert abs(m.in_proj.weight.std().item() - 0.02) < 0.002
    assert abs(m.out_proj.weight.std().item() - 0.02 / math.sqrt(10)) < 0.001
    gd = GDNLayer(gdn_cfg()).self_attention
    assert torch.equal(gd.dt_bias, torch.ones(4))
    assert gd.A_log.exp().min() >= 1 and gd.A_log.exp().max() <= 16


# ---- layer math vs a hand-written composition with the naive recurrences ----------------------
def _rms(x, w, eps):
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps) * w


def _causal_conv_silu(x_bsd, w, bias, act=F.silu):
    s = x_bsd.shape[1]
    out = torch.zeros_like(x_bsd)
    for t in range(s):
        for j in range(w.shape[-1]):  # tap j multiplies x[t - (W-1) + j]
            src = t - (w.shape[-1] - 1) + j
            if src >= 0:
                out[:, t] += x_bsd[:, src] * w[:, 0, j]
    if bias is not None:
        out = out + bias
    return act(out)


def test_mamba_layer_matches_naive_composition():
    torch.manual_seed(0)
    cfg = mamba_cfg()
    layer = Mamba2Layer(cfg).double()
    with torch.no_grad():  # non-trivial norm weights so their layout is tested
        for p in (layer.mixer.in_proj.layer_norm_weight, layer.mixer.norm.weight):
            p.uniform_(0.5, 1.5)
    sd = {k: v for k, v in layer.state_dict().items()}
    u = torch.randn(11, 2, 64, dtype=torch.float64)
    m = "mixer."
    h = _rms(u, sd[m + "in_proj.layer_norm_weight"], cfg.norm_eps) @ sd[m + "in_proj.weight"].T
    h = h.transpose(0, 1)  # [b, s, 328]
    z, xbc, dt = h[..., :128], h[..., 128:320], h[..., 320:]
    xbc = _causal_conv_silu(xbc, sd[m + "conv1d.weight"], sd[m + "conv1d.bias"])
    x, B, C = xbc[..., :128], xbc[..., 128:160], xbc[..., 160:]
    y, _ = naive_ssd(x.unflatten(-1, (8, 16)), dt, -sd[m + "A_log"].exp(),
                     B.unflatten(-1, (2, 16)), C.unflatten(-1, (2, 16)), sd[m + "D"],
                     sd[m + "dt_bias"])
    yz = (y.flatten(-2) * F.silu(z)).unflatten(-1, (2, 64))  # norm groups of d_inner/ngroups
    yn = _rms(yz, 1.0, 1e-5).flatten(-2) * sd[m + "norm.weight"]
    ref = (yn @ sd[m + "out_proj.weight"].T).transpose(0, 1)
    out = layer(u)
    assert out.shape == u.shape and out.dtype == u.dtype
    assert_close64(out, ref, tol=1e-6)  # the scans run in fp32


# Megatron's GDN uses the run's activation_func for the conv and the output gate (SiLU with
# SwiGLU, relu^2 with squared ReLU; dev ssm/gated_delta_net/gdn.py, common.py).
_GDN_ACT = {"swiglu": F.silu, "squared_relu": lambda x: F.relu(x).square()}


@pytest.mark.parametrize("activation", sorted(_GDN_ACT))
def test_gdn_layer_matches_naive_composition(activation):
    torch.manual_seed(0)
    cfg = gdn_cfg(mlp=MLPConfig(ffn_hidden_size=256, activation=activation))
    act = _GDN_ACT[activation]
    layer = GDNLayer(cfg).double()
    with torch.no_grad():
        for p in (layer.self_attention.in_proj.layer_norm_weight,
                  layer.self_attention.out_norm.weight):
            p.uniform_(0.5, 1.5)
        layer.self_attention.dt_bias.normal_()
    sd = layer.state_dict()
    a = "self_attention."
    u = torch.randn(13, 2, 64, dtype=torch.float64)
    h = _rms(u, sd[a + "in_proj.layer_norm_weight"], cfg.norm_eps) @ sd[a + "in_proj.weight"].T
    h = h.transpose(0, 1)  # [b, s, 136]
    qkv, z, b, al = h[..., :96], h[..., 96:128], h[..., 128:132], h[..., 132:]
    qkv = _causal_conv_silu(qkv, sd[a + "conv1d.weight"], None, act=act)
    q = qkv[..., :32].unflatten(-1, (2, 16))
    k = qkv[..., 32:64].unflatten(-1, (2, 16))
    v = qkv[..., 64:].unflatten(-1, (4, 8))
    q = q / torch.sqrt(q.square().sum(-1, keepdim=True) + 1e-6)
    k = k / torch.sqrt(k.square().sum(-1, keepdim=True) + 1e-6)
    q, k = q[:, :, [0, 0, 1, 1]], k[:, :, [0, 0, 1, 1]]  # value head j uses key head j // 2
    g = -sd[a + "A_log"].exp() * F.softplus(al + sd[a + "dt_bias"])
    o, _ = naive_gated_delta(q, k, v, g, torch.sigmoid(b), scale=16**-0.5)
    y = _rms(o, sd[a + "out_norm.weight"], cfg.norm_eps) * act(z.unflatten(-1, (4, 8)))
    ref = (y.flatten(-2) @ sd[a + "out_proj.weight"].T).transpose(0, 1)
    out = layer(u)
    assert out.shape == u.shape and out.dtype == u.dtype
    assert_close64(out, ref, tol=1e-6)  # the scans run in fp32


# ---- (4) forward/backward, causality; (5) dtypes ----------------------------------------------
LAYERS = [pytest.param(Mamba2Layer, mamba_cfg, id="mamba2"),
          pytest.param(GDNLayer, gdn_cfg, id="gdn")]


@pytest.mark.parametrize("layer_cls,make_cfg", LAYERS)
def test_forward_backward_finite(layer_cls, make_cfg):
    torch.manual_seed(0)
    layer = layer_cls(make_cfg())
    u = torch.randn(21, 3, 64, requires_grad=True)
    out = layer(u)
    assert out.shape == u.shape and out.dtype == u.dtype
    assert torch.isfinite(out).all()
    out.square().sum().backward()
    assert torch.isfinite(u.grad).all() and u.grad.abs().sum() > 0
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} gets no gradient"


@pytest.mark.parametrize("layer_cls,make_cfg", LAYERS)
def test_causality(layer_cls, make_cfg):
    torch.manual_seed(0)
    layer = layer_cls(make_cfg())
    u = torch.randn(19, 2, 64)
    u2 = u.clone()
    u2[12] += torch.randn(2, 64)  # perturb token 12 (chunk size 8: inside the second chunk)
    with torch.no_grad():
        a, b = layer(u), layer(u2)
    assert torch.equal(a[:12], b[:12]), "an earlier output depends on a future token"
    assert (a[12:] - b[12:]).abs().amax(dim=(1, 2)).min() > 0, "perturbation had no effect"


@pytest.mark.parametrize("layer_cls,make_cfg", LAYERS)
def test_bf16_params_run_and_track_fp32(layer_cls, make_cfg):
    torch.manual_seed(0)
    layer32 = layer_cls(make_cfg())
    torch.manual_seed(0)
    layer16 = layer_cls(make_cfg(params_dtype="bfloat16"))
    fp32_names = {"mixer.A_log", "mixer.D", "mixer.dt_bias"}  # megatron-core keeps these fp32
    for name, p in layer16.named_parameters():
        want = torch.float32 if name in fp32_names else torch.bfloat16
        assert p.dtype == want, name
    u = torch.randn(17, 2, 64)
    out16 = layer16(u.bfloat16())
    assert out16.dtype == torch.bfloat16 and out16.shape == u.shape
    assert torch.isfinite(out16.float()).all()
    out16.float().square().sum().backward()
    assert all(torch.isfinite(p.grad.float()).all() for p in layer16.parameters())
    # Same init, rounded: bf16 tracks fp32 to bf16 precision.
    with torch.no_grad():
        layer32.load_state_dict({k: v.float() for k, v in layer16.state_dict().items()})
        out32 = layer32(u.bfloat16().float())
    rel = (out16.float() - out32).norm() / out32.norm()
    assert rel < 3e-2, f"bf16 vs fp32 relative error {rel:.3e}"


# ---- optional GPU kernels vs the reference ----------------------------------------------------
@pytest.mark.gpu
def test_gpu_kernels_match_reference(monkeypatch):
    pytest.importorskip("triton")
    for layer_cls, make_cfg in ((Mamba2Layer, mamba_cfg), (GDNLayer, gdn_cfg)):
        torch.manual_seed(0)
        layer = layer_cls(make_cfg(params_dtype="bfloat16")).cuda()
        u = torch.randn(70, 2, 64, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            monkeypatch.setenv("MHC_KERNELS", "reference")
            ref = layer(u).float()
            monkeypatch.delenv("MHC_KERNELS")
            fast = layer(u).float()
        rel = (fast - ref).norm() / ref.norm()
        assert rel < 2e-2, f"{layer_cls.__name__}: fast vs reference relative error {rel:.3e}"


def test_fla_backward_guard_follows_flas_own_flags(monkeypatch):
    """fla's flags say Hopper + Triton in [3.4.0, 3.7.1): its GDN backward is refused, so a
    step that needs gradients uses the reference (warned once); inference may still use fla."""
    import sys
    import types

    from mhc_model.layers import gdn

    fake = types.ModuleType("fla.utils")
    fake.IS_NVIDIA_HOPPER, fake.TRITON_ABOVE_3_4_0, fake.TRITON_ABOVE_3_7_1 = True, True, False
    monkeypatch.setitem(sys.modules, "fla", types.ModuleType("fla"))
    monkeypatch.setitem(sys.modules, "fla.utils", fake)
    sys.modules["fla"].utils = fake
    gdn.fla_backward_refusal.cache_clear()
    try:
        assert "3.7.1" in gdn.fla_backward_refusal()
        x = torch.ones(2, requires_grad=True)
        with pytest.warns(RuntimeWarning, match="reference chunked kernel"):
            assert not gdn._fla_allowed(x)
        with torch.no_grad():
            assert gdn._fla_allowed(x)  # forward-only: fla's forward is correct
        fake.TRITON_ABOVE_3_7_1 = True
        gdn.fla_backward_refusal.cache_clear()
        assert gdn.fla_backward_refusal() is None and gdn._fla_allowed(x)
    finally:
        gdn.fla_backward_refusal.cache_clear()


@pytest.mark.gpu
def test_gdn_layer_trains_on_gpu_with_whatever_gdn_kernel_applies():
    """With or without the `gpu` extra (fla-core): forward and backward of a G layer run and
    match the reference kernel's gradients to bf16 precision."""
    pytest.importorskip("triton")
    torch.manual_seed(0)
    layer = GDNLayer(gdn_cfg(params_dtype="bfloat16")).cuda()
    u = torch.randn(70, 2, 64, device="cuda", dtype=torch.bfloat16)
    grads = {}
    for mode in ("fast", "reference"):
        os.environ["MHC_KERNELS"] = "reference" if mode == "reference" else ""
        layer.zero_grad(set_to_none=True)
        layer(u).float().square().mean().backward()
        grads[mode] = torch.cat([p.grad.float().flatten() for p in layer.parameters()])
    os.environ.pop("MHC_KERNELS", None)
    assert torch.isfinite(grads["fast"]).all()
    rel = (grads["fast"] - grads["reference"]).norm() / grads["reference"].norm()
    assert rel < 5e-2, f"GDN grads fast vs reference relative error {rel:.3e}"
