"""The chunked scans (Mamba2 SSD, gated delta rule) against the float64 per-timestep
recurrences of ``ssm_naive`` (lengths, chunk sizes, initial and final states)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mhc_model.layers.delta_rule import chunk_gated_delta_rule_ref
from mhc_model.layers.ssd import ssd_chunk_scan
from tests.model.ssm_naive import assert_close64, naive_gated_delta, naive_ssd


# ---- (1) chunked SSD vs the recurrence --------------------------------------------------------
def _ssd_inputs(b, s, h, p, g, n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, s, h, p, generator=gen)
    dt_raw = torch.randn(b, s, h, generator=gen)
    A = -torch.empty(h).uniform_(1, 16, generator=gen)
    B = torch.randn(b, s, g, n, generator=gen) / math.sqrt(n)
    C = torch.randn(b, s, g, n, generator=gen) / math.sqrt(n)
    D = torch.randn(h, generator=gen)
    dt_bias = torch.randn(h, generator=gen) - 3.0  # small dt: long memory, stresses the carry
    return x, dt_raw, A, B, C, D, dt_bias


@pytest.mark.parametrize(
    "s,chunk,h,g", [(1, 8, 2, 1), (16, 8, 4, 2), (37, 8, 8, 2), (45, 16, 6, 3), (20, 64, 4, 4)]
)
def test_ssd_chunked_matches_recurrence(s, chunk, h, g):
    x, dt_raw, A, B, C, D, dt_bias = _ssd_inputs(2, s, h, 4, g, 8)
    y = ssd_chunk_scan(x, dt_raw, A, B, C, chunk, D_H=D, dt_bias_H=dt_bias)
    y_ref, _ = naive_ssd(x, dt_raw, A, B, C, D, dt_bias)
    assert y.shape == x.shape and y.dtype == torch.float32
    assert_close64(y, y_ref)


def test_ssd_initial_and_final_state():
    x, dt_raw, A, B, C, D, dt_bias = _ssd_inputs(2, 29, 4, 4, 2, 8, seed=1)
    h0 = torch.randn(2, 4, 4, 8)
    y, hT = ssd_chunk_scan(x, dt_raw, A, B, C, 8, D_H=D, dt_bias_H=dt_bias,
                           initial_state_BHPN=h0, return_final_state=True)
    y_ref, hT_ref = naive_ssd(x, dt_raw, A, B, C, D, dt_bias, h0=h0)
    assert_close64(y, y_ref)
    assert_close64(hT, hT_ref)
    # Splitting the sequence and carrying the state gives the same outputs.
    y1, h1 = ssd_chunk_scan(x[:, :13], dt_raw[:, :13], A, B[:, :13], C[:, :13], 8, D_H=D,
                            dt_bias_H=dt_bias, initial_state_BHPN=h0, return_final_state=True)
    y2 = ssd_chunk_scan(x[:, 13:], dt_raw[:, 13:], A, B[:, 13:], C[:, 13:], 8, D_H=D,
                        dt_bias_H=dt_bias, initial_state_BHPN=h1)
    assert_close64(torch.cat([y1, y2], dim=1), y_ref)


# ---- (2) chunked gated delta rule vs the recurrence -------------------------------------------
def _gdn_inputs(b, s, h, dk, dv, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(b, s, h, dk, generator=gen), dim=-1)
    k = F.normalize(torch.randn(b, s, h, dk, generator=gen), dim=-1)
    v = torch.randn(b, s, h, dv, generator=gen)
    # Mostly weak decay (long memory, so the cross-chunk carry matters), some strong steps.
    g = -0.2 * F.softplus(torch.randn(b, s, h, generator=gen)) * torch.rand(b, s, h, generator=gen)
    beta = torch.sigmoid(torch.randn(b, s, h, generator=gen))
    return q, k, v, g, beta


@pytest.mark.parametrize("s,chunk", [(1, 8), (16, 8), (37, 8), (45, 16), (20, 64)])
def test_gated_delta_chunked_matches_recurrence(s, chunk):
    q, k, v, g, beta = _gdn_inputs(2, s, 3, 8, 6)
    o, _ = chunk_gated_delta_rule_ref(q, k, v, g, beta, chunk_size=chunk)
    o_ref, _ = naive_gated_delta(q, k, v, g, beta, scale=8**-0.5)
    assert o.shape == v.shape and o.dtype == torch.float32
    assert_close64(o, o_ref)


def test_gated_delta_initial_and_final_state():
    q, k, v, g, beta = _gdn_inputs(2, 27, 2, 8, 4, seed=3)
    S0 = torch.randn(2, 2, 4, 8)  # paper layout [dv, dk]; the package stores [dk, dv]
    o, hT = chunk_gated_delta_rule_ref(q, k, v, g, beta, scale=0.5, chunk_size=8,
                                       initial_state_BHKV=S0.transpose(-1, -2),
                                       output_final_state=True)
    o_ref, ST_ref = naive_gated_delta(q, k, v, g, beta, scale=0.5, S0=S0)
    assert_close64(o, o_ref)
    assert_close64(hT.transpose(-1, -2), ST_ref)
