"""Megatron's factory splits (``specs._mamba_splits``, ``specs._gdn_splits``): the order and
sizes of the parts, which shapes alone cannot pin (B and C, query and key, have equal sizes).

* Mamba2: against the real megatron-core 0.19.2 files (``.metadata`` of the committed fixture,
  read by the converter, config from its own args): for every Mamba layer, the parts of every
  split tensor in the order Megatron stored them, with their row counts and dtypes.
* GDN (no Megatron fixture here): against what the layer computes. Zeroing one named disk view
  of ``in_proj`` or ``conv1d`` must silence exactly the quantity of that name in the forward.
"""

from __future__ import annotations

import pytest
import torch

from mhc_convert.adapters import detect
from mhc_model.config import GDNConfig, HybridConfig
from mhc_model.layers.gdn import GDNLayer
from mhc_model.toggle import codec as K
from tests.paths import MEGATRON_FIXTURE


def test_mamba_splits_match_megatron_files():
    adapter = detect(MEGATRON_FIXTURE)
    view = adapter.read(MEGATRON_FIXTURE)
    cfg = adapter.config(view)
    stored = list(view.entries.items())  # .metadata order: Megatron's sharded_state_dict order
    checked = 0
    for i, sym in enumerate(cfg.layer_symbols):
        if sym != "M":
            continue
        for base, parts in K.split_table(cfg, "M").items():
            prefix = f"decoder.layers.{i}.{base}."
            found = [(k[len(prefix):], e) for k, e in stored if k.startswith(prefix)]
            assert [(p, e.shape[0]) for p, e in found] == list(parts), (i, base)
            assert len({(e.dtype, e.shape[1:]) for _, e in found}) == 1, (i, base)
            checked += 1
    assert checked >= 3 * 2  # in_proj, conv1d weight and bias of at least two Mamba layers


def _gdn():
    cfg = HybridConfig(hybrid_layer_pattern="G", hidden_size=32, gdn=GDNConfig(
        num_key_heads=2, num_value_heads=4, key_head_dim=8, value_head_dim=4, conv_kernel=3,
        chunk_size=4))
    torch.manual_seed(0)
    return cfg, GDNLayer(cfg)


def _run(layer, monkeypatch) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    seen: dict[str, torch.Tensor] = {}
    net = layer.self_attention
    inner = net._delta_rule

    def spy(q, k, v, g, beta, dtype):
        seen.update(query=q, key=k, value=v, alpha=g, beta=beta)
        return inner(q, k, v, g, beta, dtype)

    monkeypatch.setattr(net, "_delta_rule", spy)
    out = layer(torch.randn(5, 2, 32, generator=torch.Generator().manual_seed(1)))
    return seen, out


def _silenced(name: str, seen: dict[str, torch.Tensor], out: torch.Tensor) -> bool:
    if name == "z":  # the output gate: silu(0) = 0, so the whole branch output vanishes
        return bool((out == 0).all())
    t = seen[name]
    if name == "beta":  # sigmoid(0)
        return bool((t == 0.5).all())
    if name == "alpha":  # g = -exp(A_log) * softplus(0 + dt_bias): constant over tokens
        return bool((t == t[:1, :1]).all())
    return bool((t == 0).all())


@pytest.mark.parametrize("tensor", ["in_proj.weight", "conv1d.weight"])
def test_gdn_split_names_are_what_the_layer_computes(tensor, monkeypatch):
    cfg, layer = _gdn()
    key = f"decoder.layers.0.self_attention.{tensor}"
    parts = [p for p, _ in K.split_table(cfg, "G")[f"self_attention.{tensor}"]]
    assert set(parts) <= {"query", "key", "value", "z", "beta", "alpha"}
    base = {k: v.clone() for k, v in layer.state_dict().items()}
    for part in parts:
        layer.load_state_dict(base)
        weight = dict(layer.named_parameters())[key.removeprefix("decoder.layers.0.")]
        with torch.no_grad():
            K.disk_views(cfg, key, weight)[f"{key}.{part}"].zero_()
        seen, out = _run(layer, monkeypatch)
        assert _silenced(part, seen, out), part
        others = [p for p in parts if p != part and p in seen]
        assert not any(_silenced(p, seen, out) for p in others), (part, others)
