"""Our DeepSeek-V4 attention layers (`C`, `H`, `W`) without Megatron: the model properties every
layer kind has (forward/backward with mHC off and on, the exact enable; the shapes from the
spec table are checked in test_toggle_core.py), the masks their math implies (causal; a `W`
query sees only its window; a `C` query its window and its top-k causal compressed entries; an
`H` query every causal compressed entry)
and the config checks. Megatron itself is the oracle in ``test_dsv4_attention_megatron.py``.

S = 270 tokens so the ratio-128 compressor pools two blocks (and skips a tail of 14 tokens).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mhc_model import HybridModel, exact_enable_
from mhc_model.config import CSAConfig, HybridConfig
from mhc_model.layers import build_layer
from mhc_model.layers.csa import compressed_causal, window_mask
from mhc_model.layers.csa_rope import plain_inv_freq, rope_tail, yarn_inv_freq
from mhc_model.toggle import codec as K
from tests.model.helpers import off_to_on, perturb_norms_, tiny_config, tokens

S = 270


@pytest.mark.parametrize("mhc", [False, True])
def test_forward_backward_reaches_every_weight_but_the_indexer(mhc):
    torch.manual_seed(0)
    model = HybridModel(tiny_config("CEHW", mhc=mhc, contract="learned"))
    logits = model(tokens(seq=S))
    assert logits.shape == (2, S, 64) and torch.isfinite(logits).all()
    logits.square().mean().backward()
    for name, p in model.named_parameters():
        if ".indexer." in name:  # top-k is not differentiable; Megatron trains it by its KL loss
            assert p.grad is None, name
            continue
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if not K.is_mhc_param(name):  # the head starts at scale 0: no gradient into its fn
            assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("convention", ["deepseek", "megatron_dev", "megatron_dsv4"])
@pytest.mark.parametrize("contract", ["mean", "learned"])
def test_exact_enable_matches_mhc_off(convention, contract):
    torch.manual_seed(0)
    off = HybridModel(tiny_config("CEHW"))
    perturb_norms_(off)
    on = HybridModel(tiny_config("CEHW", mhc=True, convention=convention, contract=contract))
    missing, unexpected = on.load_state_dict(off_to_on(off.state_dict()), strict=False)
    assert not unexpected and all("hyper_connection" in k or "hc_head" in k for k in missing)
    exact_enable_(on)
    ids = tokens(seq=S)
    with torch.no_grad():
        diff = (on(ids) - off(ids)).abs().max().item()
    assert diff <= 1e-5, diff


def _grad_reach(symbol: str, query: int) -> torch.Tensor:
    """Which input tokens the layer's output at ``query`` depends on (|d y_q / d u_t| > 0)."""
    torch.manual_seed(0)
    cfg = tiny_config(symbol)
    layer = build_layer(symbol, cfg)
    u = torch.randn(S, 1, cfg.hidden_size, requires_grad=True)
    layer(u)[query].square().sum().backward()
    return u.grad.abs().sum(dim=(1, 2)) > 0


@pytest.mark.parametrize("symbol", ["C", "H", "W"])
@pytest.mark.parametrize("query", [3, 200, S - 1])
def test_causal(symbol, query):
    assert not _grad_reach(symbol, query)[query + 1:].any()


def test_window_layer_sees_only_its_window():
    window = tiny_config("W").csa.window_size
    reach = _grad_reach("W", 200)
    assert reach.nonzero().flatten().tolist() == list(range(200 - window + 1, 201))


def test_hca_layer_sees_whole_causal_blocks():
    """Query 255 (256 = 2 * 128 tokens so far): its window and both pooled blocks; query 254:
    only the first block (j < (i+1) // r)."""
    window = tiny_config("H").csa.window_size
    assert _grad_reach("H", 255)[:256].all()
    reach = _grad_reach("H", 254)
    assert reach[:128].all() and not reach[128:254 - window + 1].any()


def test_csa_layer_uses_topk_compressed_entries():
    """C: a query far from the start reaches tokens outside its window (through the selected
    compressed entries, an overlapping 8-token span each) but not every earlier token."""
    cfg = tiny_config("C")
    reach = _grad_reach("C", 260)
    outside = reach[:260 - cfg.csa.window_size + 1]
    assert outside.any()
    assert outside.sum() <= cfg.mla.index_topk * 8


def test_masks():
    assert window_mask(5, 2, None).int().tolist() == [
        [1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 1, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 1, 1]]
    assert compressed_causal(9, 2, 4, None).sum(dim=1).tolist() == [0, 0, 0, 1, 1, 1, 1, 2, 2]


def test_rope_is_a_rotation_and_its_inverse_undoes_it():
    x = torch.randn(7, 2, 3, 16, dtype=torch.float64)
    ang = torch.outer(torch.arange(7.0), plain_inv_freq(4, 10000.0)).double()
    y = rope_tail(x, 4, ang)
    assert torch.equal(y[..., :12], x[..., :12])
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(rope_tail(y, 4, ang, inverse=True), x)


def test_yarn_with_factor_one_is_plain_rope():
    assert torch.equal(yarn_inv_freq(8, 40000.0, 1.0, 4096, 32.0, 1.0),
                       plain_inv_freq(8, 40000.0))
    assert not torch.equal(yarn_inv_freq(8, 40000.0, 4.0, 64, 32.0, 1.0),
                           plain_inv_freq(8, 40000.0))


@pytest.mark.parametrize(("change", "match"), [
    (dict(mla=dict(q_lora_rank=None)), "q_lora_rank"),
    (dict(mla=dict(v_head_dim=4)), "must exceed"),
    (dict(mla=dict(index_head_dim=2)), "index_head_dim"),
    (dict(csa=dict(o_groups=3)), "o_groups"),
    (dict(csa=dict(window_size=0)), "window_size"),
])
def test_config_checks(change, match):
    cfg = tiny_config("C")
    subs = {name: dataclasses.replace(getattr(cfg, name), **fields)
            for name, fields in change.items()}
    with pytest.raises(ValueError, match=match):
        HybridConfig(**{**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)},
                        **subs})


def test_csa_section_is_checked_only_when_used():
    cfg = tiny_config("M-").replace(csa=CSAConfig(o_groups=3))
    assert cfg.num_layers == 2
