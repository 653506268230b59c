"""HybridLayer (the mHC wrapper) and HybridStack (the decoder), Megatron key layout.

mHC off: ``decoder.layers.{i}.<suffix>`` and x <- x + F(x) (pre-norm residual).
mHC on:  ``decoder.layers.{i}.inner_layer.<suffix>`` + ``decoder.layers.{i}.hyper_connection.*``;
streams start as n copies of the embedding and end through the mean or the learned head.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mhc_model import kernels, recompute
from mhc_model.config import HybridConfig
from mhc_model.conventions import convention
from mhc_model.hyper_connection import (
    HyperConnection,
    exact_head_tensors,
    head_eps,
    head_param_shapes,
)
from mhc_model.layers import build_layer
from mhc_model.layers.common import RMSNorm, torch_dtype


def block_end_plan(num_layers: int, block: int | None) -> tuple[bool, ...]:
    """end[l] = l is last or (l+1) % L_r == 0; computed once per stack (DESIGN.md §1)."""
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
        self.convention = convention(cfg.mhc.mhc_convention)  # the record, resolved once
        self.branch_dtype = torch_dtype(cfg)

    def branch(self, u_SBC: Tensor) -> Tensor:
        """y = F(u). fp32_residual_connection: the branch runs in its params dtype; u is cast
        up front, never recovered by subtraction."""
        y_SBC = self.inner_layer(u_SBC.to(self.branch_dtype))
        if y_SBC.shape != u_SBC.shape:
            raise RuntimeError(f"branch output shape {tuple(y_SBC.shape)} != input "
                               f"{tuple(u_SBC.shape)}")
        return y_SBC

    def forward(self, x_SBNC: Tensor) -> Tensor:
        S, B, N, C = x_SBNC.shape
        x_TNC = x_SBNC.reshape(S * B, N, C)
        u_TC, H_post, H_res, link = self.hyper_connection.pre(x_TNC)
        y_SBC = self.branch(u_TC.reshape(S, B, C))
        out_TNC = kernels.site_post(x_TNC, H_res, H_post, y_SBC.reshape(S * B, C),
                                    self.convention, link)
        # cast back so fp32 streams never leak into later layers (DESIGN.md §1)
        return out_TNC.reshape(S, B, N, C).to(self.branch_dtype)


class HybridStack(nn.Module):
    """Megatron's ``decoder``: layers, optional learned contract head, final norm.

    ``symbols``/``site_offset``/``inner``: the stack inside an MTP depth (Megatron builds it
    as a ``HybridStack`` with ``is_mtp_layer=True`` and ``post_layer_norm=False``: no final
    norm, no head, streams in and out; dev ``multi_token_prediction.py`` ~2027-2039,
    ``hybrid_block.py`` ~742-746, 885-889, 1020-1031). ``site_offset``: the global index of its
    first layer (``HybridConfig.site_symbols``), which seeds the layers' mHC init."""

    def __init__(self, cfg: HybridConfig, symbols: tuple[str, ...] | None = None, *,
                 site_offset: int = 0, inner: bool = False):
        super().__init__()
        self.cfg = cfg
        dtype = torch_dtype(cfg)
        symbols = cfg.layer_symbols if symbols is None else symbols
        inner_layers = [build_layer(sym, cfg) for sym in symbols]
        if cfg.mhc_on:
            self.layers = nn.ModuleList(
                HybridLayer(cfg, site_offset + i, layer) for i, layer in enumerate(inner_layers)
            )
            if cfg.mhc.mhc_output_contract == "learned" and not inner:
                register_head(self, cfg, None)
        else:
            self.layers = nn.ModuleList(inner_layers)
        if not inner:
            self.final_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, dtype)
        self._block_ends = block_end_plan(len(symbols), cfg.mhc.mhc_recompute_layer_num)

    # ---- mHC off: plain pre-norm residual layers -------------------------------------------
    def run_plain(self, h_SBC: Tensor) -> Tensor:
        dtype = torch_dtype(self.cfg)
        resid = h_SBC.float() if self.cfg.fp32_residual_connection else h_SBC
        for layer in self.layers:
            y = layer(resid.to(dtype))
            resid = resid + y.to(resid.dtype)
        return resid.to(dtype)

    # ---- mHC on --------------------------------------------------------------------------
    def _run_block_recompute(self, x_SBNC: Tensor, start: int, stop: int) -> Tensor:
        S, B, N, C = x_SBNC.shape
        layers = list(self.layers[start:stop])
        x_TNC = x_SBNC.reshape(S * B, N, C)
        cache = recompute.BlockCache(layers, x_TNC)
        for idx, layer in enumerate(layers):
            x_TNC = recompute.layer_forward(layer, x_TNC, S, B, cache, idx)
        return x_TNC.reshape(S, B, N, C)

    def run_streams(self, x_SBNC: Tensor) -> Tensor:
        """The n-stream residual through every layer (mHC on)."""
        use_recompute = (self.cfg.mhc.mhc_recompute_layer_num is not None
                         and torch.is_grad_enabled())
        start = 0
        for l, end in enumerate(self._block_ends):
            if not end:
                continue
            if use_recompute:
                x_SBNC = self._run_block_recompute(x_SBNC, start, l + 1)
            else:
                for layer in self.layers[start:l + 1]:
                    x_SBNC = layer(x_SBNC)
            start = l + 1
        return x_SBNC

    def forward_streams(self, h_SBC: Tensor) -> tuple[Tensor, Tensor | None]:
        """(final-normed hidden [S, B, C], the pre-contraction streams [S, B, n, C] or None
        with mHC off): Megatron hands the streams to MTP (dev ``hybrid_block.py`` ~1029-1053)."""
        if not self.cfg.mhc_on:
            return self.final_norm(self.run_plain(h_SBC)), None
        n = self.cfg.mhc.num_residual_streams
        S, B, C = h_SBC.shape
        x_SBNC = kernels.expand(h_SBC.reshape(S * B, C), n).reshape(S, B, n, C)
        x_SBNC = self.run_streams(x_SBNC)
        return self.final_norm(contract(self, self.cfg, x_SBNC)), x_SBNC

    def forward(self, h_SBC: Tensor) -> Tensor:
        return self.forward_streams(h_SBC)[0]


def register_head(module: nn.Module, cfg: HybridConfig, depth: int | None) -> None:
    """The learned contract's ``hc_head_{fn,base,scale}`` as bare parameters of ``module``
    (Megatron: ``decoder.hc_head_*``, ``mtp.layers.{d}.hc_head_*``), at the exact point."""
    init = exact_head_tensors(cfg, depth)
    for name, shape in head_param_shapes(cfg).items():
        module.register_parameter(name, nn.Parameter(init[name].float().reshape(shape)))


def contract(module: nn.Module, cfg: HybridConfig, x_SBNC: Tensor) -> Tensor:
    """The n streams -> one [S, B, C] (mean, or the learned head held by ``module``)."""
    S, B, n, C = x_SBNC.shape
    x_TNC = x_SBNC.reshape(S * B, n, C)
    if cfg.mhc.mhc_output_contract == "learned":
        h_TC = kernels.contract_learned(x_TNC, module.hc_head_fn, module.hc_head_base,
                                        module.hc_head_scale, head_eps(cfg))
    else:
        h_TC = kernels.contract_mean(x_TNC)
    return h_TC.reshape(S, B, C)
