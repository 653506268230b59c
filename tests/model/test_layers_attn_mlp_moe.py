"""Attention-family, MLP and MoE hybrid layers: Megatron key names/shapes, and the math checked
against independent per-head / per-token references written here."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mhc_model.config import AttentionConfig, MLAConfig, MLPConfig, MoEConfig
from mhc_model.layers.attention import AttentionLayer
from mhc_model.layers.dsa import DSALayer
from mhc_model.layers.mla import MLALayer
from mhc_model.layers.mlp import MLPLayer
from mhc_model.layers.moe import MoELayer
from mhc_model.layers.rope import apply_rope, rope_angles
from tests.model.layer_refs import (
    B,
    C,
    S,
    build,
    causal_softmax_attend,
    make_cfg,
    qk_cfg,
    rms,
    rope_complex,
    shapes,
)


# ---------------------------------------------------------------------------- key names
def test_attention_keys():
    assert shapes(build(AttentionLayer, make_cfg())) == {
        "self_attention.linear_qkv.layer_norm_weight": (C,),
        "self_attention.linear_qkv.weight": ((4 + 2 * 2) * 16, C),
        "self_attention.linear_proj.weight": (C, 4 * 16),
    }
    cfg = make_cfg(attention=AttentionConfig(num_attention_heads=4, num_query_groups=1,
                                             kv_channels=8, qk_layernorm=True))
    assert shapes(build(AttentionLayer, cfg)) == {
        "self_attention.linear_qkv.layer_norm_weight": (C,),
        "self_attention.linear_qkv.weight": ((4 + 2) * 8, C),
        "self_attention.linear_proj.weight": (C, 4 * 8),
        "self_attention.q_layernorm.weight": (8,),
        "self_attention.k_layernorm.weight": (8,),
    }


def mla_expected(qk_norm_style, q_lora=32):
    H, dqk, dpe, dv, kvl = 4, 16, 8, 16, 32
    keys = {
        "input_layernorm.weight": (C,),
        "self_attention.linear_kv_down_proj.weight": (kvl + dpe, C),
        "self_attention.linear_kv_up_proj.weight": (H * (dqk + dv), kvl),
        "self_attention.linear_proj.weight": (C, H * dv),
    }
    if q_lora is None:
        keys["self_attention.linear_q_proj.weight"] = (H * (dqk + dpe), C)
        if qk_norm_style == "fused":
            keys["self_attention.linear_q_proj.layer_norm_weight"] = (C,)
    else:
        keys["self_attention.linear_q_down_proj.weight"] = (q_lora, C)
        keys["self_attention.linear_q_up_proj.weight"] = (H * (dqk + dpe), q_lora)
        if qk_norm_style == "fused":
            keys["self_attention.linear_q_up_proj.layer_norm_weight"] = (q_lora,)
        elif qk_norm_style == "separate":
            keys["self_attention.q_layernorm.weight"] = (q_lora,)
    if qk_norm_style == "fused":
        keys["self_attention.linear_kv_up_proj.layer_norm_weight"] = (kvl,)
    elif qk_norm_style == "separate":
        keys["self_attention.kv_layernorm.weight"] = (kvl,)
    return keys


@pytest.mark.parametrize("qk_layernorm", [False, True])
@pytest.mark.parametrize("q_lora", [32, None])
def test_mla_keys(qk_layernorm, q_lora):
    got = shapes(build(MLALayer, qk_cfg(qk_layernorm, q_lora)))
    assert got == mla_expected("fused" if qk_layernorm else None, q_lora)


@pytest.mark.parametrize("qk_layernorm", [False, True])
def test_dsa_keys(qk_layernorm):
    got = shapes(build(DSALayer, qk_cfg(qk_layernorm)))
    idx = "self_attention.core_attention.indexer."
    expected = mla_expected("separate" if qk_layernorm else None) | {
        idx + "linear_wq_b.weight": (2 * 16, 32),
        idx + "linear_wk.weight": (16, C),
        idx + "k_norm.weight": (16,),
        idx + "k_norm.bias": (16,),
        idx + "linear_weights_proj.weight": (2, C),
    }
    assert got == expected
    # Without q_lora_rank the indexer's query projection reads the normed hidden state.
    assert shapes(build(DSALayer, qk_cfg(False, None)))[idx + "linear_wq_b.weight"] == (32, C)
    with pytest.raises(ValueError, match="q_lora_rank"):
        DSALayer(qk_cfg(True, None))


@pytest.mark.parametrize("act,rows", [("squared_relu", 256), ("swiglu", 512)])
def test_mlp_keys(act, rows):
    got = shapes(build(MLPLayer, make_cfg(mlp=MLPConfig(ffn_hidden_size=256, activation=act))))
    assert got == {"mlp.linear_fc1.layer_norm_weight": (C,), "mlp.linear_fc1.weight": (rows, C),
                   "mlp.linear_fc2.weight": (C, 256)}


def test_moe_keys():
    cfg = make_cfg(mlp=MLPConfig(activation="swiglu"),
                   moe=MoEConfig(num_experts=3, router_topk=2, moe_ffn_hidden_size=24,
                                 shared_expert_ffn_hidden_size=40, score_function="sigmoid",
                                 router_expert_bias=True))
    layer = build(MoELayer, cfg)
    expected = {"pre_mlp_layernorm.weight": (C,), "mlp.router.weight": (3, C),
                "mlp.router.expert_bias": (3,),
                "mlp.shared_experts.linear_fc1.weight": (80, C),
                "mlp.shared_experts.linear_fc2.weight": (C, 40)}
    for e in range(3):
        expected[f"mlp.experts.linear_fc1.weight{e}"] = (48, C)
        expected[f"mlp.experts.linear_fc2.weight{e}"] = (C, 24)
    assert shapes(layer) == expected
    assert layer.state_dict()["mlp.router.expert_bias"].dtype == torch.float32
    plain = shapes(build(MoELayer, make_cfg()))
    assert "mlp.router.expert_bias" not in plain
    assert not any(k.startswith("mlp.shared_experts") for k in plain)
    with pytest.raises(ValueError, match="sigmoid"):
        MoELayer(make_cfg(moe=MoEConfig(router_expert_bias=True)))


# ------------------------------------------------------------------ generic behaviour
LAYERS = [AttentionLayer, MLALayer, DSALayer, MLPLayer, MoELayer]


@pytest.mark.parametrize("cls", LAYERS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_forward_backward(cls, dtype):
    cfg = make_cfg(params_dtype=dtype, attention=AttentionConfig(num_attention_heads=4,
                                                                 num_query_groups=2,
                                                                 qk_layernorm=True),
                   moe=MoEConfig(shared_expert_ffn_hidden_size=32))
    layer = build(cls, cfg)
    assert all(p.dtype == getattr(torch, dtype) for p in layer.parameters())
    u = torch.randn(S, B, C, dtype=getattr(torch, dtype), requires_grad=True)
    y = layer(u)
    assert y.shape == u.shape and y.dtype == u.dtype
    assert torch.isfinite(y.float()).all() and y.float().abs().sum() > 0
    y.float().square().sum().backward()
    assert torch.isfinite(u.grad.float()).all() and u.grad.float().abs().sum() > 0
    for name, p in layer.named_parameters():
        if ".indexer." in name:  # trained only by Megatron's indexer KL loss, not this forward
            assert p.grad is None
        else:
            assert p.grad is not None and torch.isfinite(p.grad.float()).all(), name


def test_init_deterministic():
    for cls in LAYERS:
        torch.manual_seed(3)
        a = cls(make_cfg())
        torch.manual_seed(3)
        b = cls(make_cfg())
        for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
            assert ka == kb and torch.equal(va, vb)


@pytest.mark.parametrize("cls", [AttentionLayer, MLALayer, DSALayer])
def test_causal(cls):
    cfg = make_cfg(mla=MLAConfig(index_topk=4))
    layer = build(cls, cfg)
    u = torch.randn(S, B, C)
    t = 7
    u2 = u.clone()
    u2[t:] += torch.randn(S - t, B, C)
    y, y2 = layer(u), layer(u2)
    assert torch.equal(y[:t], y2[:t]), "an earlier output depends on a later token"
    assert (y[t:] - y2[t:]).abs().amax(-1).min() > 1e-4


# ------------------------------------------------------------ attention vs reference
@pytest.mark.parametrize("rope", ["rope", "none"])
@pytest.mark.parametrize("qk_layernorm", [False, True])
def test_attention_matches_reference(rope, qk_layernorm):
    H, G, D = 4, 2, 16
    cfg = make_cfg(attention=AttentionConfig(num_attention_heads=H, num_query_groups=G,
                                             position_embedding_type=rope, rotary_base=500.0,
                                             qk_layernorm=qk_layernorm))
    layer = build(AttentionLayer, cfg)
    sa = layer.self_attention
    u = torch.randn(S, B, C)
    x = rms(u, sa.linear_qkv.layer_norm_weight)
    W = sa.linear_qkv.weight.detach()
    per, block = H // G, (H // G + 2) * D
    pos = torch.arange(S)
    out = torch.zeros(S, B, H * D)
    for b in range(B):
        for h in range(H):
            g = h // per  # megatron: "q1 q2 k1 v1 | q3 q4 k2 v2"
            q = x[:, b] @ W[g * block + (h % per) * D:][:D].t()
            k = x[:, b] @ W[g * block + per * D:][:D].t()
            v = x[:, b] @ W[g * block + (per + 1) * D:][:D].t()
            if qk_layernorm:
                q, k = rms(q, sa.q_layernorm.weight), rms(k, sa.k_layernorm.weight)
            if rope == "rope":
                q, k = (rope_complex(t, pos, 500.0, interleaved=False) for t in (q, k))
            out[:, b, h * D:(h + 1) * D] = causal_softmax_attend(q, k, v, D**-0.5)
    ref = out @ sa.linear_proj.weight.t()
    torch.testing.assert_close(layer(u), ref)


def test_rope_on_off_differ():
    # A larger init makes attention logits big enough that positions matter visibly.
    on = build(AttentionLayer, make_cfg(init_std=0.2))
    off = build(AttentionLayer, make_cfg(init_std=0.2, attention=AttentionConfig(
        num_attention_heads=4, num_query_groups=2, position_embedding_type="none")))
    off.load_state_dict(on.state_dict())
    u = torch.randn(S, B, C)
    y_on, y_off = on(u), off(u)
    torch.testing.assert_close(y_on[0], y_off[0])  # position 0 is not rotated
    assert ((y_on[1:] - y_off[1:]).norm() / y_off[1:].norm()) > 0.05


def test_apply_rope_matches_complex_rotation():
    x_SHD = torch.randn(S, 3, 8)
    ang, pos = rope_angles(S, 8, 10000.0), torch.arange(S)
    per_head = [rope_complex(x_SHD[:, h], pos, 10000.0, False) for h in range(3)]
    got = apply_rope(x_SHD[:, None], ang)[:, 0]
    torch.testing.assert_close(got, torch.stack(per_head, 1))
    # MLA mode: DeepSeek's interleaved pairs, returned de-interleaved (Megatron's layout).
    ref = torch.stack([rope_complex(x_SHD[:, h], pos, 10000.0, True) for h in range(3)], 1)
    ref = torch.cat([ref[..., 0::2], ref[..., 1::2]], -1)
    torch.testing.assert_close(apply_rope(x_SHD[:, None], ang, mla_interleaved=True)[:, 0], ref)


# -------------------------------------------------------------------------------- MLP
@pytest.mark.parametrize("act", ["swiglu", "squared_relu"])
def test_mlp_matches_reference(act):
    m = build(MLPLayer, make_cfg(mlp=MLPConfig(ffn_hidden_size=32, activation=act))).mlp
    u = torch.randn(S, B, C)
    h = rms(u, m.linear_fc1.layer_norm_weight) @ m.linear_fc1.weight.t()
    # swiglu: Megatron's torch.chunk puts the gate rows first, the up rows second.
    a = F.silu(h[..., :32]) * h[..., 32:] if act == "swiglu" else torch.relu(h).pow(2)
    torch.testing.assert_close(m(u), a @ m.linear_fc2.weight.t())


# -------------------------------------------------------------------------------- MoE
@pytest.mark.parametrize("score,bias,act,shared,topk", [
    ("softmax", False, "squared_relu", None, 2),
    ("softmax", False, "swiglu", 24, 1),
    ("sigmoid", True, "swiglu", 24, 2),
    ("sigmoid", False, "squared_relu", None, 1),
])
def test_moe_equals_per_token_loop(score, bias, act, shared, topk):
    E = 4
    cfg = make_cfg(mlp=MLPConfig(activation=act),
                   moe=MoEConfig(num_experts=E, router_topk=topk, moe_ffn_hidden_size=16,
                                 shared_expert_ffn_hidden_size=shared, score_function=score,
                                 router_expert_bias=bias))
    layer = build(MoELayer, cfg)
    mlp = layer.mlp
    if bias:  # large enough to change which experts win
        mlp.router.expert_bias.copy_(torch.tensor([0.3, -0.3, 0.0, 0.15]))

    def act_fn(h):
        if act == "swiglu":
            g, up = h.chunk(2, -1)
            return F.silu(g) * up
        return torch.relu(h) ** 2

    u = torch.randn(S, B, C)
    x = rms(u, layer.pre_mlp_layernorm.weight)
    ref = torch.zeros(S, B, C)
    chosen = set()
    for s in range(S):
        for b in range(B):
            xt = x[s, b]
            logits = mlp.router.weight @ xt
            if score == "softmax":
                sel = sorted(range(E), key=lambda e: -logits[e].item())[:topk]
                p = torch.softmax(logits[sel], -1)
            else:
                sc = torch.sigmoid(logits)
                rank = sc + (mlp.router.expert_bias if bias else 0)
                sel = sorted(range(E), key=lambda e: -rank[e].item())[:topk]
                p = sc[sel] / sc[sel].sum() if topk > 1 else sc[sel]
            chosen.update(sel)
            for j, e in enumerate(sel):
                w1 = getattr(mlp.experts.linear_fc1, f"weight{e}")
                w2 = getattr(mlp.experts.linear_fc2, f"weight{e}")
                ref[s, b] += p[j] * (w2 @ act_fn(w1 @ xt))
            if shared:
                se = mlp.shared_experts
                ref[s, b] += se.linear_fc2.weight @ act_fn(se.linear_fc1.weight @ xt)
    assert len(chosen) > 1
    torch.testing.assert_close(layer(u), ref)
