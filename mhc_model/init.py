"""In-place enable init for a whole mHC-on model (DESIGN.md §4)."""

from __future__ import annotations

import torch
from torch import nn

from mhc_model.hyper_connection import exact_head_tensors
from mhc_model.stack import HybridLayer


@torch.no_grad()
def exact_enable_(model: nn.Module, *, init: str = "exact") -> nn.Module:
    """Set every hyper-connection parameter (and the learned head) of an mHC-on model to the
    function-preserving point: with replicated streams the model computes exactly what its
    mHC-off twin (same inner weights) computes. ``init="megatron"`` uses Megatron's approximate
    init instead (alpha = mhc_init_gating_factor, bias 0)."""
    cfg = model.config
    if not cfg.mhc_on:
        raise ValueError("exact_enable_: the model has enable_hyper_connections=False")
    decoder = model.decoder
    for layer in decoder.layers:
        if not isinstance(layer, HybridLayer):
            raise TypeError(f"exact_enable_: expected HybridLayer, got {type(layer).__name__}")
        layer.hyper_connection.reset_parameters(cfg, init=init)
    if cfg.mhc.mhc_output_contract == "learned":
        for name, value in exact_head_tensors(cfg).items():
            getattr(decoder, name).copy_(value)
    return model
