"""Keys and shapes of a model, without building it: each layer kind's keys are read off its
module on the meta device (``LayerSpec``), once per (symbol, config); the non-layer keys and the
mHC parameters are fixed by the config (DESIGN.md §2, §3). ``stored_layer_shape`` and
``stored_shape`` give the shape Megatron stores for a key in any of its spellings (an alias, a
factory split part, a stack), read off the same tables, for the planner and the adapters."""

from __future__ import annotations

from functools import lru_cache

import torch

from mhc_model.config import HybridConfig
from mhc_model.hyper_connection import hc_param_shapes, head_param_shapes
from mhc_model.layers.common import allocatable, no_initialisers
from mhc_model.specs import layer_spec
from mhc_model.toggle import codec as K
from mhc_model.toggle.codec import hc_key, head_key

Shapes = dict[str, tuple[int, ...]]


@lru_cache(maxsize=256)
def layer_key_shapes(cfg: HybridConfig, symbol: str) -> Shapes:
    """Layer-relative keys -> shapes of one ``symbol`` layer (branch module, mHC off)."""
    with allocatable(cfg), no_initialisers(), torch.device("meta"):
        module = layer_spec(symbol).layer_class()(cfg)
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


@lru_cache(maxsize=64)
def expected_model_shapes(cfg: HybridConfig) -> Shapes:
    """Keys and shapes of the mHC-off model for this config (its mHC fields are ignored)."""
    cfg = cfg.with_mhc(enable_hyper_connections=False)
    V, C = cfg.vocab_size, cfg.hidden_size
    out: Shapes = {"embedding.word_embeddings.weight": (V, C)}
    for i, symbol in enumerate(cfg.layer_symbols):
        out.update({f"decoder.layers.{i}.{k}": s
                    for k, s in layer_key_shapes(cfg, symbol).items()})
    out["decoder.final_norm.weight"] = (C,)
    out.update(mtp_depth_shapes(cfg))
    if not cfg.tie_word_embeddings:
        out["output_layer.weight"] = (V, C)
    return out


def mtp_proj_shapes(cfg: HybridConfig, on: bool) -> dict[str, tuple[int, ...]]:
    """An MTP depth's input projection(s), by depth-relative name (``mhc_model.mtp``)."""
    C = cfg.hidden_size
    names = K.MTP_PROJ_ON if on else K.MTP_PROJ_OFF
    return {n: (C, C) if on else (C, 2 * C) for n in names}


def mtp_depth_shapes(cfg: HybridConfig) -> Shapes:
    """The MTP depths' keys of the mHC-off model (norms, ``eh_proj``, layers), model order."""
    C, out = cfg.hidden_size, {}
    P = len(cfg.mtp_symbols)
    for d in range(cfg.mtp_num_depths):
        pre = f"mtp.layers.{d}."
        out[pre + "enorm.weight"] = out[pre + "hnorm.weight"] = (C,)
        out.update({pre + n: s for n, s in mtp_proj_shapes(cfg, on=False).items()})
        for k, symbol in enumerate(cfg.mtp_symbols):
            site = K.site_prefix(cfg, cfg.num_layers + d * P + k)
            out.update({site + rel: s for rel, s in layer_key_shapes(cfg, symbol).items()})
        out[pre + "final_layernorm.weight"] = (C,)
    return out


def hc_keys(layer: int, cfg: HybridConfig) -> Shapes:
    """One site's ``hyper_connection.*`` keys for ``cfg``'s stream count (a decoder layer, or
    past the decoder an MTP layer: ``HybridConfig.site_symbols``)."""
    return {hc_key(layer, name, cfg): shape for name, shape in hc_param_shapes(cfg).items()}


def head_keys(cfg: HybridConfig, depth: int | None = None) -> Shapes:
    """``decoder.hc_head_*`` (depth None) or MTP depth ``depth``'s ``hc_head_*`` when ``cfg``
    is mHC-on with the learned contract, else none."""
    if not cfg.mhc_on or cfg.mhc.mhc_output_contract != "learned":
        return {}
    return {head_key(name, depth): shape for name, shape in head_param_shapes(cfg).items()}


def mhc_param_shapes(cfg: HybridConfig) -> Shapes:
    """Every mHC parameter an mHC-on model of ``cfg`` holds, by model key: the decoder's sites
    and head, then each MTP depth's sites and head."""
    out: Shapes = {}
    for i in range(cfg.num_layers):
        out.update(hc_keys(i, cfg))
    out.update(head_keys(cfg))
    P = len(cfg.mtp_symbols)
    for d in range(cfg.mtp_num_depths):
        for k in range(P):
            out.update(hc_keys(cfg.num_layers + d * P + k, cfg))
        out.update(head_keys(cfg, d))
    return out


def stored_layer_shape(cfg: HybridConfig, symbol: str, rel: str) -> tuple[int, ...] | None:
    """The shape Megatron stores for the layer-relative key ``rel`` of a ``symbol`` layer: ours
    or an alias of ours (the model shape), a factory split part ([rows, *rest]) or a stack
    ([count, *shape]); None when ``rel`` is none of these."""
    expected = layer_key_shapes(cfg.with_mhc(enable_hyper_connections=False), symbol)
    rel = K.canonical(symbol, rel)
    if rel in expected:
        return expected[rel]
    stack = K.stack_table(cfg, symbol).get(rel)
    if stack is not None:
        template, count = stack
        shapes = {expected.get(template.format(i)) for i in range(count)}
        if len(shapes) == 1 and None not in shapes:
            return (count, *shapes.pop())
        return None
    base, _, part = rel.rpartition(".")
    rows = dict(K.split_table(cfg, symbol).get(base, ())).get(part)
    if rows is not None and base in expected:
        return (rows, *expected[base][1:])
    return None


def layer_owns_module(cfg: HybridConfig, symbol: str, module: str) -> bool:
    """Whether ``module`` (layer-relative) is a module of a ``symbol`` layer in any spelling:
    a prefix of one of its keys, of a stored stack, or an alias of ``module.weight`` (the
    owner of an ``_extra_state``: Megatron's linears, e.g. SequentialMLP's
    ``mlp.experts.local_experts.K.linear_fc1``)."""
    expected = layer_key_shapes(cfg.with_mhc(enable_hyper_connections=False), symbol)
    names = [*expected, *K.stack_table(cfg, symbol)]
    return (any(n.startswith(module + ".") for n in names)
            or K.canonical(symbol, module + ".weight") in expected)


def stored_shape(cfg: HybridConfig, key: str) -> tuple[int, ...] | None:
    """The shape Megatron stores for a full model key of either layout (layer keys in any
    spelling, mHC parameters when ``cfg`` is mHC-on, the non-layer keys); None: not a key."""
    key = K.unwrap(key)
    found = K.site_of(cfg, key)
    if K.is_mhc_param(key):
        return mhc_param_shapes(cfg).get(key) if cfg.mhc_on else None
    if found:
        symbol = K.layer_symbol(cfg, found[0])
        return stored_layer_shape(cfg, symbol, found[2]) if symbol else None
    depth = K.mtp_depth_key(key)
    if depth and depth[0] < cfg.mtp_num_depths and depth[1] in K.MTP_PROJ_ON:
        return mtp_proj_shapes(cfg, on=True)[depth[1]] if cfg.mhc_on else None
    return expected_model_shapes(cfg).get(key)
