"""The Mamba2 hybrid layer (`M`), laid out like Megatron-Core 0.19.2's ``MambaLayer`` with the
Transformer-Engine spec: ``decoder.layers.{i}.mixer.*`` (the layer's own pre-norm is fused into
``mixer.in_proj`` as ``layer_norm_weight``; ``MambaLayer.norm`` is an identity there).

Forward (Megatron ``MambaMixer``; ``rmsnorm=True``, ``norm_before_gate=False``,
``D_has_hdim=False``):

    z, xBC, dt = split(in_proj(rmsnorm(u)))          rows [z | x | B | C | dt]
    x, B, C    = split(silu(causal_depthwise_conv(xBC) + bias))
    y          = SSD(x, dt, A=-exp(A_log), B, C, D, dt_bias, dt softplus)
    y          = grouped_rmsnorm(y * silu(z)) * norm.weight      (group = d_inner / ngroups)
    out        = out_proj(y)
"""

from __future__ import annotations

import functools
import math
import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mhc_model.config import HybridConfig
from mhc_model.layers.common import LayerNormLinear, Linear, output_std, torch_dtype
from mhc_model.layers.ssd import ssd_chunk_scan

# MambaMixer builds its gated norm with a fixed eps (not layernorm_epsilon).
GATED_NORM_EPS = 1e-5
# Megatron/Mamba defaults for the SSM parameter init.
A_INIT_RANGE = (1.0, 16.0)
DT_MIN, DT_MAX, DT_INIT_FLOOR = 1e-3, 1e-1, 1e-4


def fast_kernels_allowed(t: Tensor) -> bool:
    """GPU kernels are used only on CUDA and unless ``MHC_KERNELS=reference`` forces the
    PyTorch reference path (e.g. for parity checks)."""
    return t.is_cuda and os.environ.get("MHC_KERNELS", "").strip().lower() != "reference"


@functools.lru_cache(maxsize=1)
def _mamba_chunk_scan_combined():
    """``mamba_ssm``'s fused SSD kernel, or None when it is not installed/usable."""
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except Exception:  # ImportError, or a broken CUDA/triton install
        return None
    return mamba_chunk_scan_combined


def causal_conv1d_silu(x_BSD: Tensor, weight_D1W: Tensor, bias_D: Tensor | None,
                       act=F.silu) -> Tensor:
    """Causal depthwise conv over the sequence + ``act`` (SiLU unless given), in fp32, returned
    in x's dtype. Left-padding by W-1 makes output t see only inputs t-W+1..t."""
    W = weight_D1W.shape[-1]
    xf_BDS = F.pad(x_BSD.float().transpose(1, 2), (W - 1, 0))
    bias = None if bias_D is None else bias_D.float()
    y_BDS = F.conv1d(xf_BDS, weight_D1W.float(), bias, groups=weight_D1W.shape[0])
    return act(y_BDS).transpose(1, 2).to(x_BSD.dtype)


def dt_bias_init(num_heads: int) -> Tensor:
    """Mamba's dt init: dt log-uniform in [DT_MIN, DT_MAX], stored as softplus^{-1}(dt) so that
    softplus(dt_bias) starts in that range. Drawn in fp32."""
    if torch.empty(0).is_meta:  # shapes-only build (mhc_model.model.meta_model): draw nothing
        return torch.empty(num_heads)
    dt = torch.exp(
        torch.rand(num_heads) * (math.log(DT_MAX) - math.log(DT_MIN)) + math.log(DT_MIN)
    ).clamp(min=DT_INIT_FLOOR)
    return dt + torch.log(-torch.expm1(-dt))  # inverse softplus


def a_log_init(num_heads: int) -> Tensor:
    """A uniform in A_INIT_RANGE, stored as log(A); the dynamics use -exp(A_log) < 0."""
    if torch.empty(0).is_meta:  # shapes-only build: draw nothing
        return torch.empty(num_heads)
    return torch.empty(num_heads).uniform_(*A_INIT_RANGE).log()


class GatedRMSNorm(nn.Module):
    """mamba_ssm ``RMSNormGated`` with ``norm_before_gate=False``: RMS-normalise ``y * silu(z)``
    over groups of ``group_size`` channels, then scale by ``weight``. fp32 math, y's dtype out."""

    def __init__(self, size: int, group_size: int, eps: float, dtype: torch.dtype):
        super().__init__()
        if size % group_size:
            raise ValueError(f"GatedRMSNorm: size={size} not divisible by group {group_size}")
        self.group_size = group_size
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype))

    def forward(self, y: Tensor, z: Tensor) -> Tensor:
        h = y.float() * F.silu(z.float())
        h_grouped = h.unflatten(-1, (-1, self.group_size))
        h_grouped = h_grouped * torch.rsqrt(h_grouped.square().mean(-1, keepdim=True) + self.eps)
        return (h_grouped.flatten(-2) * self.weight.float()).to(y.dtype)


class Mamba2Mixer(nn.Module):
    """Megatron's ``MambaMixer`` parameters and math (tensor-parallel size 1)."""

    def __init__(self, cfg: HybridConfig):
        super().__init__()
        m = cfg.mamba
        dtype = torch_dtype(cfg)
        C = cfg.hidden_size
        self.d_inner = m.d_inner(C)
        self.num_heads = m.num_heads(C)
        self.head_dim = m.head_dim
        self.ngroups = m.num_groups
        self.d_state = m.d_state
        self.chunk_size = m.chunk_size
        if self.d_inner != self.num_heads * self.head_dim or self.num_heads % self.ngroups:
            raise ValueError(
                f"mamba: d_inner={self.d_inner}, head_dim={self.head_dim}, "
                f"heads={self.num_heads}, groups={self.ngroups} are inconsistent"
            )
        GN = self.ngroups * self.d_state
        self.conv_dim = self.d_inner + 2 * GN  # conv channels: x | B | C

        # Rows z | x | B | C | dt.
        self.in_proj = LayerNormLinear(C, 2 * self.d_inner + 2 * GN + self.num_heads, dtype,
                                       std=cfg.init_std, eps=cfg.norm_eps)
        # Depthwise conv, nn.Conv1d's default (kaiming-uniform) init as in Megatron. Only its
        # parameters are used; the padding is applied causally in causal_conv1d_silu.
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, m.d_conv, groups=self.conv_dim,
                                bias=True, dtype=dtype)
        # megatron-core keeps A_log, D and dt_bias in fp32 whatever the params dtype (its
        # checkpoints store them as fp32: see the 0.19.2 fixture); so do we.
        self.dt_bias = nn.Parameter(dt_bias_init(self.num_heads))
        self.A_log = nn.Parameter(a_log_init(self.num_heads))
        self.D = nn.Parameter(torch.ones(self.num_heads, dtype=torch.float32))
        self.norm = GatedRMSNorm(self.d_inner, self.d_inner // self.ngroups, GATED_NORM_EPS, dtype)
        self.out_proj = Linear(self.d_inner, C, dtype, std=output_std(cfg))

    def _scan(self, x_BSHP: Tensor, dt_BSH: Tensor, B_BSGN: Tensor, C_BSGN: Tensor) -> Tensor:
        A_H = -torch.exp(self.A_log.float())
        if fast_kernels_allowed(x_BSHP):
            kernel = _mamba_chunk_scan_combined()
            if kernel is not None:
                return kernel(x_BSHP, dt_BSH, A_H, B_BSGN, C_BSGN, self.chunk_size, D=self.D,
                              z=None, dt_bias=self.dt_bias.float(), dt_softplus=True)
        return ssd_chunk_scan(x_BSHP, dt_BSH, A_H, B_BSGN, C_BSGN, self.chunk_size, D_H=self.D,
                              dt_bias_H=self.dt_bias, dt_softplus=True)

    def forward(self, u_SBC: Tensor) -> Tensor:
        GN = self.ngroups * self.d_state
        dtype = self.in_proj.weight.dtype
        zxbcdt_BSD = self.in_proj(u_SBC.to(dtype)).transpose(0, 1)
        z_BSI, xBC_BSD, dt_BSH = torch.split(
            zxbcdt_BSD, [self.d_inner, self.conv_dim, self.num_heads], dim=-1
        )
        xBC_BSD = causal_conv1d_silu(xBC_BSD, self.conv1d.weight, self.conv1d.bias)
        x_BSI, B_BSD, C_BSD = torch.split(xBC_BSD, [self.d_inner, GN, GN], dim=-1)
        y_BSHP = self._scan(
            x_BSI.unflatten(-1, (self.num_heads, self.head_dim)),
            dt_BSH,
            B_BSD.unflatten(-1, (self.ngroups, self.d_state)),
            C_BSD.unflatten(-1, (self.ngroups, self.d_state)),
        )
        y_BSI = self.norm(y_BSHP.flatten(-2).to(dtype), z_BSI)
        return self.out_proj(y_BSI.transpose(0, 1)).to(u_SBC.dtype)


class Mamba2Layer(nn.Module):
    """The `M` hybrid layer: ``mixer`` only (pre-norm fused into ``mixer.in_proj``).
    ``forward`` returns the branch output (no residual) with the input's shape and dtype."""

    def __init__(self, cfg: HybridConfig):
        super().__init__()
        self.mixer = Mamba2Mixer(cfg)

    def forward(self, u_SBC: Tensor) -> Tensor:
        return self.mixer(u_SBC)
