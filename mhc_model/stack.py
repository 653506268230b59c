"""HybridLayer (the mHC wrapper) and HybridStack (the decoder), Megatron key layout.

mHC off: ``decoder.layers.{i}.<suffix>`` and x <- x + F(x) (pre-norm residual).
mHC on:  ``decoder.layers.{i}.inner_layer.<suffix>`` + ``decoder.layers.{i}.hyper_connection.*``;
streams start as n copies of the embedding and end through the mean or the learned head.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

from mhc_model import kernels, mhc_ref
from mhc_model.config import HybridConfig
from mhc_model.hyper_connection import HyperConnection, exact_head_tensors, head_param_shapes
from mhc_model.layers import build_layer
from mhc_model.layers.common import RMSNorm, torch_dtype

# --- recompute (DESIGN.md §1 "Recompute", paper §4.3.2) ----------------------------------------
# Inside a block we checkpoint the whole block with a selective policy: ops executed inside an
# inner layer's branch are saved (the expensive mixer is never re-run), every mHC op (mapping,
# Sinkhorn, aggregate, mix) is dropped and recomputed in backward. The block's output is the
# checkpoint's output, so it is kept: it is what triggers the block's recompute.
_state = threading.local()


@contextlib.contextmanager
def _inside_branch() -> Iterator[None]:
    prev = getattr(_state, "in_branch", False)
    _state.in_branch = True
    try:
        yield
    finally:
        _state.in_branch = prev


_FACTORY_OPS = ("zeros", "ones", "empty", "full", "new_", "scalar_tensor", "arange", "eye")


def _policy(ctx, func, *args, **kwargs) -> CheckpointPolicy:
    if not getattr(_state, "in_branch", False):
        return CheckpointPolicy.PREFER_RECOMPUTE
    # Buffers that the branch fills in place (MoE's index_add_ accumulator, masks) must be
    # rebuilt, not cached: a cached tensor may not be mutated after it was saved.
    name = func.__name__ if hasattr(func, "__name__") else str(func)
    if func._schema.is_mutable or name.startswith(_FACTORY_OPS):
        return CheckpointPolicy.PREFER_RECOMPUTE
    return CheckpointPolicy.MUST_SAVE


def block_end_plan(num_layers: int, block: int | None) -> tuple[bool, ...]:
    """end[l] = l is last or (l+1) % L_r == 0; computed once per stack."""
    if block is None:
        return tuple(True for _ in range(num_layers))
    return tuple(l == num_layers - 1 or (l + 1) % block == 0 for l in range(num_layers))


class HybridLayer(nn.Module):
    """aggregate -> inner branch -> mix (DESIGN.md §1). The inner layer runs in branch-only
    mode, so its own residual is never added: y = F(u) directly."""

    def __init__(self, cfg: HybridConfig, layer_index: int, inner: nn.Module):
        super().__init__()
        self.inner_layer = inner
        # mHC parameters stay fp32 whatever the params dtype (DeepSeek-V4 keeps hc_* in fp32):
        # the mapping math is fp32, and logit(1/n) is not representable in bf16, so a bf16
        # bias_pre would move sum(H_pre) off 1 by ~2e-3 and break the exact enable point.
        self.hyper_connection = HyperConnection(cfg, layer_index, torch.float32)
        self.convention = cfg.mhc.mhc_convention
        self.branch_dtype = torch_dtype(cfg)

    def forward(self, x_SBNC: Tensor) -> Tensor:
        S, B, N, C = x_SBNC.shape
        x_TNC = x_SBNC.reshape(S * B, N, C)
        H_pre, H_post, H_res = self.hyper_connection(x_TNC)
        u_TC = kernels.aggregate(x_TNC, H_pre)
        # fp32_residual_connection: the branch runs in its params dtype; u is cast up front,
        # never recovered by subtraction.
        with _inside_branch():
            y_SBC = self.inner_layer(u_TC.reshape(S, B, C).to(self.branch_dtype))
        if y_SBC.shape != (S, B, C):
            raise RuntimeError(f"branch output shape {tuple(y_SBC.shape)} != input {(S, B, C)}")
        out_TNC = kernels.mix_post(x_TNC, H_res, H_post, y_SBC.reshape(S * B, C), self.convention)
        # cast back so fp32 streams never leak into later layers (DESIGN.md §1)
        return out_TNC.reshape(S, B, N, C).to(self.branch_dtype)


class HybridStack(nn.Module):
    """Megatron's ``decoder``: layers, optional learned contract head, final norm."""

    def __init__(self, cfg: HybridConfig):
        super().__init__()
        self.cfg = cfg
        dtype = torch_dtype(cfg)
        inner = [build_layer(sym, cfg) for sym in cfg.layer_symbols]
        if cfg.mhc_on:
            self.layers = nn.ModuleList(
                HybridLayer(cfg, i, layer) for i, layer in enumerate(inner)
            )
            if cfg.mhc.mhc_output_contract == "learned":
                shapes = head_param_shapes(cfg)
                init = exact_head_tensors(cfg)
                for name, shape in shapes.items():
                    # Megatron keeps these as bare Parameters on the stack: decoder.hc_head_*
                    self.register_parameter(name, nn.Parameter(init[name].float().reshape(shape)))
        else:
            self.layers = nn.ModuleList(inner)
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, dtype)
        self._block_ends = block_end_plan(cfg.num_layers, cfg.mhc.mhc_recompute_layer_num)

    # ---- mHC off: plain pre-norm residual layers -------------------------------------------
    def _forward_plain(self, h_SBC: Tensor) -> Tensor:
        dtype = torch_dtype(self.cfg)
        resid = h_SBC.float() if self.cfg.fp32_residual_connection else h_SBC
        for layer in self.layers:
            y = layer(resid.to(dtype))
            resid = resid + y.to(resid.dtype)
        return resid.to(dtype)

    # ---- mHC on --------------------------------------------------------------------------
    def _run_block(self, x_SBNC: Tensor, start: int, stop: int) -> Tensor:
        for layer in self.layers[start:stop]:
            x_SBNC = layer(x_SBNC)
        return x_SBNC

    def _forward_mhc(self, h_SBC: Tensor) -> Tensor:
        cfg = self.cfg
        n = cfg.mhc.num_residual_streams
        S, B, C = h_SBC.shape
        x_SBNC = mhc_ref.expand(h_SBC.reshape(S * B, C), n).reshape(S, B, n, C)
        recompute = cfg.mhc.mhc_recompute_layer_num is not None and torch.is_grad_enabled()
        start = 0
        for l, end in enumerate(self._block_ends):
            if not end:
                continue
            if recompute:
                x_SBNC = checkpoint(
                    self._run_block, x_SBNC, start, l + 1, use_reentrant=False,
                    context_fn=lambda: create_selective_checkpoint_contexts(_policy),
                )
            else:
                x_SBNC = self._run_block(x_SBNC, start, l + 1)
            start = l + 1
        x_TNC = x_SBNC.reshape(S * B, n, C)
        if cfg.mhc.mhc_output_contract == "learned":
            h_TC = mhc_ref.contract_learned(x_TNC, self.hc_head_fn, self.hc_head_base,
                                            self.hc_head_scale, cfg.mhc.mhc_eps)
        else:
            h_TC = mhc_ref.contract_mean(x_TNC)
        return h_TC.reshape(S, B, C)

    def forward(self, h_SBC: Tensor) -> Tensor:
        h = self._forward_mhc(h_SBC) if self.cfg.mhc_on else self._forward_plain(h_SBC)
        return self.final_norm(h)
