"""MLA and DSA layers against independent references written here (the key names are checked
in ``test_layers_attn_mlp_moe.py``)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mhc_model.layers.dsa import DSALayer
from mhc_model.layers.mla import MLALayer
from tests.model.layer_refs import (
    EPS,
    B,
    C,
    S,
    build,
    causal_softmax_attend,
    qk_cfg,
    rms,
    rope_complex,
)


# ------------------------------------------------------------------ MLA vs reference
@pytest.mark.parametrize("qk_layernorm", [False, True])
@pytest.mark.parametrize("q_lora", [32, None])
def test_mla_matches_reference(qk_layernorm, q_lora):
    H, dqk, dpe, dv, kvl, base = 4, 16, 8, 16, 32, 300.0
    layer = build(MLALayer, qk_cfg(qk_layernorm, q_lora, rotary_base=base))
    sa = layer.self_attention
    u = torch.randn(S, B, C)
    x = rms(u, layer.input_layernorm.weight)
    if q_lora is None:
        cq, wq = x, sa.linear_q_proj
    else:
        cq, wq = x @ sa.linear_q_down_proj.weight.t(), sa.linear_q_up_proj
    if qk_layernorm:
        cq = rms(cq, wq.layer_norm_weight)
    q = (cq @ wq.weight.t()).view(S, B, H, dqk + dpe)
    ckv = x @ sa.linear_kv_down_proj.weight.t()
    c, k_pe = ckv[..., :kvl], ckv[..., kvl:]
    if qk_layernorm:
        c = rms(c, sa.linear_kv_up_proj.layer_norm_weight)
    kv = (c @ sa.linear_kv_up_proj.weight.t()).view(S, B, H, dqk + dv)
    pos = torch.arange(S)
    out = torch.zeros(S, B, H * dv)
    for b in range(B):
        kpe = rope_complex(k_pe[:, b], pos, base, interleaved=True)  # shared by all heads
        for h in range(H):
            qh = torch.cat([q[:, b, h, :dqk],
                            rope_complex(q[:, b, h, dqk:], pos, base, interleaved=True)], -1)
            kh = torch.cat([kv[:, b, h, :dqk], kpe], -1)
            out[:, b, h * dv:(h + 1) * dv] = causal_softmax_attend(
                qh, kh, kv[:, b, h, dqk:], (dqk + dpe) ** -0.5)
    torch.testing.assert_close(layer(u), out @ sa.linear_proj.weight.t())


# -------------------------------------------------------------------------------- DSA
def dsa_and_mla(qk_layernorm, topk):
    cfg = qk_cfg(qk_layernorm, index_topk=topk)
    dsa = build(DSALayer, cfg, seed=1)
    mla = MLALayer(cfg)
    sd = {k: v for k, v in dsa.state_dict().items() if ".indexer." not in k}
    rename = {
        "self_attention.q_layernorm.weight": "self_attention.linear_q_up_proj.layer_norm_weight",
        "self_attention.kv_layernorm.weight": "self_attention.linear_kv_up_proj.layer_norm_weight",
    }
    mla.load_state_dict({rename.get(k, k): v for k, v in sd.items()})
    return dsa, mla


@pytest.mark.parametrize("qk_layernorm", [False, True])
def test_dsa_equals_dense_mla_when_topk_covers_sequence(qk_layernorm):
    u = torch.randn(S, B, C)
    for topk in (S, S + 5):
        dsa, mla = dsa_and_mla(qk_layernorm, topk)
        torch.testing.assert_close(dsa(u), mla(u))


def test_dsa_sparse_differs_exactly_where_keys_dropped():
    topk = 4
    dsa, mla = dsa_and_mla(True, topk)
    u = torch.randn(S, B, C)
    y_dsa, y_mla = dsa(u), mla(u)
    # Query s has s + 1 causal keys: rows s < topk keep all of them, later rows drop some.
    torch.testing.assert_close(y_dsa[:topk], y_mla[:topk])
    assert (y_dsa[topk:] - y_mla[topk:]).abs().amax(-1).min() > 1e-5


def test_dsa_indexer_selection_matches_reference():
    topk = 5
    dsa, _ = dsa_and_mla(True, topk)
    sa = dsa.self_attention
    ix = sa.core_attention.indexer
    u = torch.randn(S, B, C)
    x = rms(u, dsa.input_layernorm.weight)
    qr = rms(x @ sa.linear_q_down_proj.weight.t(), sa.q_layernorm.weight)
    n, d, dpe = 2, 16, 8
    pos = torch.arange(S)
    allowed = ix.allowed_mask(x, qr)
    for b in range(B):
        k = F.layer_norm(x[:, b] @ ix.linear_wk.weight.t(), (d,), ix.k_norm.weight,
                         ix.k_norm.bias, EPS)
        k = torch.cat([rope_complex(k[:, :dpe], pos, 10000.0, False), k[:, dpe:]], -1)
        w = x[:, b] @ ix.linear_weights_proj.weight.t() / math.sqrt(n * d)
        q = (qr[:, b] @ ix.linear_wq_b.weight.t()).view(S, n, d)
        score = torch.zeros(S, S)
        for h in range(n):
            qh = torch.cat([rope_complex(q[:, h, :dpe], pos, 10000.0, False), q[:, h, dpe:]], -1)
            score += torch.relu(qh @ k.t()) * w[:, h:h + 1]
        causal = torch.ones(S, S, dtype=torch.bool).tril()
        got = ix.scores(x, qr)[b]
        torch.testing.assert_close(got[causal], score[causal])
        assert torch.isneginf(got[~causal]).all()
        for s in range(S):
            # ReLU makes exact ties (0.0) common, so check "is a top-k set", not indices.
            keep, drop = allowed[b, s] & causal[s], ~allowed[b, s] & causal[s]
            assert not (allowed[b, s] & ~causal[s]).any()
            assert keep.sum() == min(topk, s + 1), (b, s)
            if drop.any():
                assert score[s][keep].min() >= score[s][drop].max() - 1e-6, (b, s)
