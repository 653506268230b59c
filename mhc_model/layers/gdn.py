"""The Gated DeltaNet hybrid layer (`G`), laid out like Megatron-Core 0.19.2's ``TransformerLayer``
with a ``GatedDeltaNet`` ``self_attention`` under the TE spec:
``decoder.layers.{i}.self_attention.*`` (pre-norm fused into ``self_attention.in_proj`` as
``layer_norm_weight``; the conv has no bias).

Forward (Megatron ``GatedDeltaNet``, tensor/context-parallel size 1):

    q, k, v, z, b, a = split(in_proj(rmsnorm(u)))   rows [query | key | value | z | beta | alpha]
    q, k, v = split(act(causal_depthwise_conv(q|k|v)))     act: the run's activation_func
    q, k    = l2norm(q), l2norm(k) per key head, then repeat_interleave to the value heads (GQA)
    g       = -exp(A_log) * softplus(a + dt_bias)        (log-space decay, fp32)
    beta    = sigmoid(b)
    o       = gated_delta_rule(q, k, v, g, beta, scale = key_head_dim ** -0.5)
    y       = rmsnorm_per_head(o) * out_norm.weight * act(z)  (SiLU with SwiGLU, else relu^2)
    out     = out_proj(y)
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mhc_model.config import HybridConfig
from mhc_model.layers.common import LayerNormLinear, Linear, RMSNorm, output_std, torch_dtype
from mhc_model.layers.delta_rule import chunk_gated_delta_rule_ref
from mhc_model.layers.mamba2 import a_log_init, causal_conv1d_silu, fast_kernels_allowed

# fla's l2norm eps (Megatron normalises q/k with fla.modules.l2norm.l2norm before the kernel).
L2NORM_EPS = 1e-6


@functools.lru_cache(maxsize=1)
def _fla_chunk_gated_delta_rule():
    """fla-core's chunked gated delta rule kernel, or None when it is not installed/usable."""
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    except Exception:  # ImportError, or a broken CUDA/triton install
        return None
    return chunk_gated_delta_rule


@functools.lru_cache(maxsize=1)
def fla_backward_refusal() -> str | None:
    """Why fla's chunked kernel cannot train here, or None. fla-core guards its own gated
    ``chunk_bwd_dqkwg``: Triton >= 3.4.0 and < 3.7.1 on Hopper gives wrong gradients, so fla
    raises there unless tilelang provides the kernel (fla ``ops/common/chunk_o.py``). We read
    fla's own flags rather than re-deriving them, so a newer fla's guard is honoured too."""
    try:
        from fla import utils as fla_utils
    except Exception:  # fla absent or broken: the reference runs anyway
        return None
    broken = (getattr(fla_utils, "IS_NVIDIA_HOPPER", False)
              and getattr(fla_utils, "TRITON_ABOVE_3_4_0", False)
              and not getattr(fla_utils, "TRITON_ABOVE_3_7_1", True))
    if not broken or importlib.util.find_spec("tilelang") is not None:
        return None
    try:
        triton_version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton_version = "< 3.7.1"
    return (f"fla's gated delta rule backward is wrong on Hopper with Triton {triton_version} "
            f"(< 3.7.1; fla refuses it): GDN layers train with the reference chunked kernel")


def _fla_allowed(*tensors: Tensor) -> bool:
    """fla's forward is always correct; its backward only where ``fla_backward_refusal`` is
    None. When a gradient will be needed and fla cannot give it, warn once, use the reference."""
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
        return True
    why = fla_backward_refusal()
    if why is not None:
        _warn_once(why)
    return why is None


@functools.cache
def _warn_once(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def _squared_relu(x: Tensor) -> Tensor:
    return F.relu(x).square()


def l2norm(x: Tensor, eps: float = L2NORM_EPS) -> Tensor:
    """x / sqrt(sum(x^2) + eps) over the last dim, fp32 (fla's l2norm convention)."""
    xf = x.float()
    return xf * torch.rsqrt(xf.square().sum(-1, keepdim=True) + eps)


class GatedDeltaNet(nn.Module):
    """Megatron's ``GatedDeltaNet`` parameters and math (tensor/context-parallel size 1)."""

    def __init__(self, cfg: HybridConfig):
        super().__init__()
        g = cfg.gdn
        dtype = torch_dtype(cfg)
        C = cfg.hidden_size
        if g.num_value_heads % g.num_key_heads:
            raise ValueError(
                f"gdn.num_value_heads={g.num_value_heads} is not a multiple of "
                f"gdn.num_key_heads={g.num_key_heads}"
            )
        self.num_key_heads = g.num_key_heads
        self.num_value_heads = g.num_value_heads
        self.key_head_dim = g.key_head_dim
        self.value_head_dim = g.value_head_dim
        self.chunk_size = g.chunk_size
        self.qk_dim = g.num_key_heads * g.key_head_dim
        self.v_dim = g.num_value_heads * g.value_head_dim
        self.conv_dim = 2 * self.qk_dim + self.v_dim  # conv channels: query | key | value
        Hv = g.num_value_heads

        # Registration order follows Megatron: in_proj, conv1d, dt_bias, A_log, out_norm, out_proj.
        self.in_proj = LayerNormLinear(C, 2 * self.qk_dim + 2 * self.v_dim + 2 * Hv, dtype,
                                       std=cfg.init_std, eps=cfg.norm_eps)
        # Megatron builds GDN's conv with conv_bias=False and nn.Conv1d's default init.
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, g.conv_kernel,
                                groups=self.conv_dim, bias=False, dtype=dtype)
        # GDN's reset_parameters: dt_bias = 1, A ~ U(1, 16) stored as log(A).
        self.dt_bias = nn.Parameter(torch.ones(Hv, dtype=dtype))
        self.A_log = nn.Parameter(a_log_init(Hv).to(dtype))
        self.out_norm = RMSNorm(self.value_head_dim, cfg.norm_eps, dtype)
        self.out_proj = Linear(self.v_dim, C, dtype, std=output_std(cfg))
        # Megatron's GDN applies ``config.activation_func`` to the conv output and the output
        # gate (dev ``ssm/gated_delta_net/gdn.py`` ~493, ``common.py`` ~389): SiLU in a SwiGLU
        # run, squared ReLU in a squared-ReLU run (arguments.py ~2240-2248).
        self.act = F.silu if cfg.mlp.activation == "swiglu" else _squared_relu

    def _delta_rule(self, q_BSHK: Tensor, k_BSHK: Tensor, v_BSHV: Tensor, g_BSH: Tensor,
                    beta_BSH: Tensor, dtype: torch.dtype) -> Tensor:
        if fast_kernels_allowed(q_BSHK) and dtype != torch.float32:
            kernel = _fla_chunk_gated_delta_rule()
            if kernel is not None and _fla_allowed(q_BSHK, k_BSHK, v_BSHV, g_BSH, beta_BSH):
                # fla refuses fp32 q/k/v; it runs in the params dtype
                o_BSHV, _ = kernel(q_BSHK.to(dtype), k_BSHK.to(dtype), v_BSHV.to(dtype),
                                   g=g_BSH, beta=beta_BSH.to(dtype), initial_state=None,
                                   output_final_state=False, use_qk_l2norm_in_kernel=False)
                return o_BSHV
        o_BSHV, _ = chunk_gated_delta_rule_ref(q_BSHK, k_BSHK, v_BSHV, g_BSH, beta_BSH,
                                               chunk_size=self.chunk_size)
        return o_BSHV

    def forward(self, u_SBC: Tensor) -> Tensor:
        dtype = self.in_proj.weight.dtype
        Hk, Hv = self.num_key_heads, self.num_value_heads
        proj_BSD = self.in_proj(u_SBC.to(dtype)).transpose(0, 1)
        qkv_BSD, z_BSV, b_BSH, a_BSH = torch.split(
            proj_BSD, [self.conv_dim, self.v_dim, Hv, Hv], dim=-1
        )
        qkv_BSD = causal_conv1d_silu(qkv_BSD, self.conv1d.weight, None, act=self.act)
        q_BSD, k_BSD, v_BSV = torch.split(qkv_BSD, [self.qk_dim, self.qk_dim, self.v_dim], dim=-1)

        # Unit-norm q and k per key head keep the delta rule's (I - beta k k^T) a contraction.
        q_BSHK = l2norm(q_BSD.unflatten(-1, (Hk, self.key_head_dim)))
        k_BSHK = l2norm(k_BSD.unflatten(-1, (Hk, self.key_head_dim)))
        if Hv > Hk:  # value head j reads key head j // (Hv / Hk)
            q_BSHK = q_BSHK.repeat_interleave(Hv // Hk, dim=2)
            k_BSHK = k_BSHK.repeat_interleave(Hv // Hk, dim=2)
        v_BSHV = v_BSV.unflatten(-1, (Hv, self.value_head_dim))

        g_BSH = -torch.exp(self.A_log.float()) * F.softplus(a_BSH.float() + self.dt_bias.float())
        beta_BSH = torch.sigmoid(b_BSH.float())
        o_BSHV = self._delta_rule(q_BSHK, k_BSHK, v_BSHV, g_BSH, beta_BSH, dtype)

        # Per-head RMSNorm (out_norm, hidden = value_head_dim), then the output gate.
        z_BSHV = z_BSV.unflatten(-1, (Hv, self.value_head_dim)).float()
        y_BSHV = self.out_norm(o_BSHV.float()) * self.act(z_BSHV)
        y_SBV = y_BSHV.flatten(-2).to(dtype).transpose(0, 1)
        return self.out_proj(y_SBV).to(u_SBC.dtype)


class GDNLayer(nn.Module):
    """The `G` hybrid layer: ``self_attention`` only (pre-norm fused into its ``in_proj``).
    ``forward`` returns the branch output (no residual) with the input's shape and dtype."""

    def __init__(self, cfg: HybridConfig):
        super().__init__()
        self.self_attention = GatedDeltaNet(cfg)

    def forward(self, u_SBC: Tensor) -> Tensor:
        return self.self_attention(u_SBC)
