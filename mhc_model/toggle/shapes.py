"""Keys and shapes of a model, without building it: each layer kind's keys are read off its
module on the meta device (``LayerSpec``), once per (symbol, config); the non-layer keys and the
mHC parameters are fixed by the config (DESIGN.md §2, §3)."""

from __future__ import annotations

from functools import lru_cache

import torch

from mhc_model.config import HybridConfig
from mhc_model.hyper_connection import hc_param_shapes, head_param_shapes
from mhc_model.layers.common import allocatable, no_initialisers
from mhc_model.specs import layer_spec
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
    if not cfg.tie_word_embeddings:
        out["output_layer.weight"] = (V, C)
    return out


def hc_keys(layer: int, cfg: HybridConfig) -> Shapes:
    """One layer's ``hyper_connection.*`` keys for ``cfg``'s stream count."""
    return {hc_key(layer, name): shape for name, shape in hc_param_shapes(cfg).items()}


def head_keys(cfg: HybridConfig) -> Shapes:
    """``decoder.hc_head_*`` when ``cfg`` is mHC-on with the learned contract, else none."""
    if not cfg.mhc_on or cfg.mhc.mhc_output_contract != "learned":
        return {}
    return {head_key(name): shape for name, shape in head_param_shapes(cfg).items()}


def mhc_param_shapes(cfg: HybridConfig) -> Shapes:
    """Every mHC parameter an mHC-on model of ``cfg`` holds, by model key, in model order."""
    out: Shapes = {}
    for i in range(cfg.num_layers):
        out.update(hc_keys(i, cfg))
    out.update(head_keys(cfg))
    return out
