"""The per-layer mHC site (DESIGN.md §1) and the function-preserving init (DESIGN.md §4).

``HyperConnection`` holds Megatron's parameters (``mapping_proj.weight [N^2+2N, N*C]``,
``bias [N^2+2N]``, ``alpha_pre/alpha_post/alpha_res [1]``) and computes the three mappings in
fp32. The exact-init values are pure functions of the config (``exact_hc_tensors``,
``exact_head_tensors``) so the converter can produce them without building a model.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from mhc_model import kernels
from mhc_model.config import HybridConfig, MHCConfig
from mhc_model.conventions import convention, head_eps_value


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


def hc_param_shapes(cfg: HybridConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of one layer's ``hyper_connection.*`` parameters (the layout table reads this)."""
    n, C = cfg.mhc.num_residual_streams, cfg.hidden_size
    k = n * n + 2 * n
    return {
        "mapping_proj.weight": (k, n * C),
        "bias": (k,),
        "alpha_pre": (1,),
        "alpha_post": (1,),
        "alpha_res": (1,),
    }


def head_param_shapes(cfg: HybridConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of the learned output contract ``decoder.hc_head_*`` (DeepSeek-V4 "hc_head")."""
    n, C = cfg.mhc.num_residual_streams, cfg.hidden_size
    return {"hc_head_fn": (n, n * C), "hc_head_base": (n,), "hc_head_scale": (1,)}


def pre_bias_value(mhc: MHCConfig) -> float:
    """Bias that makes every H_pre entry exactly 1/n, so sum_j H_pre[j] = 1 (DESIGN.md §4).
    Conventions with ``h_pre_eps`` add eps after the sigmoid, so aim the sigmoid at 1/n - eps."""
    n = mhc.num_residual_streams
    if convention(mhc.mhc_convention).h_pre_eps:
        return _logit(1.0 / n - mhc.mhc_eps)
    return _logit(1.0 / n)


def head_eps(cfg: HybridConfig) -> float:
    """eps of the learned output contract: the convention says whether it is ``mhc_eps``
    (DeepSeek-V4) or the model's ``norm_eps`` (Megatron passes ``layernorm_epsilon``)."""
    return head_eps_value(cfg.mhc.mhc_convention, mhc_eps=cfg.mhc.mhc_eps,
                          layernorm_epsilon=cfg.norm_eps)


def _xavier(shape: tuple[int, ...], seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    # on the CPU whatever the default device: a pure function of the config (the converter's
    # values), drawn from a CPU generator
    w = torch.empty(shape, dtype=torch.float32, device="cpu")
    nn.init.xavier_uniform_(w, generator=g)
    return w


def exact_hc_tensors(
    cfg: HybridConfig, layer_index: int, *, init: str = "exact"
) -> dict[str, Tensor]:
    """One layer's hyper-connection parameters (fp32) at the enable point.

    exact: alpha = 0 (the token-dependent part vanishes), bias_pre = logit(1/n) so the
    aggregate is the stream mean, bias_post = 0 so H_post = 1, bias_res = 0 so H_res is
    uniform (rows and columns sum to 1); W stays random (xavier) so dL/dalpha != 0 and training
    can leave the point. With replicated streams every stream then equals the mHC-off residual.
    megatron: Megatron's own init (alpha = mhc_init_gating_factor, bias 0): only approximate.
    """
    shapes = hc_param_shapes(cfg)
    n = cfg.mhc.num_residual_streams
    weight = _xavier(shapes["mapping_proj.weight"], seed=0x6D4843 + layer_index)
    bias = torch.zeros(shapes["bias"], dtype=torch.float32)
    if init == "exact":
        bias[:n] = pre_bias_value(cfg.mhc)
        alpha = 0.0
    elif init == "megatron":
        alpha = cfg.mhc.mhc_init_gating_factor
    else:
        raise ValueError(f"unknown init {init!r}; expected 'exact' or 'megatron'")
    a = torch.full((1,), alpha, dtype=torch.float32)
    return {
        "mapping_proj.weight": weight,
        "bias": bias,
        "alpha_pre": a.clone(),
        "alpha_post": a.clone(),
        "alpha_res": a.clone(),
    }


def exact_head_tensors(cfg: HybridConfig, depth: int | None = None) -> dict[str, Tensor]:
    """Learned contract at the enable point: scale = 0 and base = logit(1/n - eps) with the
    head's eps (``head_eps``), so pre_j = 1/n for every token and the head returns the stream
    mean. ``depth``: the head of that MTP depth (its own random ``fn``); None: the decoder's."""
    shapes = head_param_shapes(cfg)
    n, eps = cfg.mhc.num_residual_streams, head_eps(cfg)
    seed = 0x6D48_4844 + (0 if depth is None else 1 + depth)
    return {
        "hc_head_fn": _xavier(shapes["hc_head_fn"], seed=seed),
        "hc_head_base": torch.full(shapes["hc_head_base"], _logit(1.0 / n - eps)),
        "hc_head_scale": torch.zeros(shapes["hc_head_scale"]),
    }


class HyperConnection(nn.Module):
    """Computes (H_pre, H_post, H_res) for one layer from the n-stream residual."""

    def __init__(self, cfg: HybridConfig, layer_index: int, dtype: torch.dtype):
        super().__init__()
        self.mhc = cfg.mhc
        self.convention = convention(cfg.mhc.mhc_convention)  # the record, resolved once
        shapes = hc_param_shapes(cfg)
        self.mapping_proj = nn.Linear(shapes["mapping_proj.weight"][1],
                                      shapes["mapping_proj.weight"][0], bias=False, dtype=dtype)
        # Megatron's registration order (its state dict and optimizer index order: alpha_pre,
        # alpha_post, alpha_res, bias, mapping_proj.weight; dev hyper_connection.py ~250-261)
        self.alpha_pre = nn.Parameter(torch.empty(1, dtype=dtype))
        self.alpha_post = nn.Parameter(torch.empty(1, dtype=dtype))
        self.alpha_res = nn.Parameter(torch.empty(1, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(shapes["bias"], dtype=dtype))
        self.layer_index = layer_index
        self.reset_parameters(cfg, init="megatron")

    @torch.no_grad()
    def reset_parameters(self, cfg: HybridConfig, init: str) -> None:
        values = exact_hc_tensors(cfg, self.layer_index, init=init)
        self.mapping_proj.weight.copy_(values["mapping_proj.weight"])
        for name in ("bias", "alpha_pre", "alpha_post", "alpha_res"):
            getattr(self, name).copy_(values[name])

    def forward(self, x_TNC: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return kernels.coefficients(
            x_TNC,
            self.mapping_proj.weight,
            self.bias,
            self.alpha_pre,
            self.alpha_post,
            self.alpha_res,
            iters=self.mhc.mhc_sinkhorn_iterations,
            convention=self.convention,
            eps=self.mhc.mhc_eps,
        )

    def pre(self, x_TNC: Tensor) -> tuple[Tensor, Tensor, Tensor, object]:
        """(u = H_pre x, H_post, H_res, link) for ``kernels.site_post``.  The fused path runs
        the whole site as one pair of Functions (``kernels.triton_site``); the reference path
        calls this module (so its hooks see the mappings) and ``kernels.aggregate``."""
        args = (x_TNC, self.mapping_proj.weight, self.bias, self.alpha_pre, self.alpha_post,
                self.alpha_res)
        if kernels.use_triton(*args):
            return kernels.site_pre(*args, iters=self.mhc.mhc_sinkhorn_iterations,
                                    convention=self.convention, eps=self.mhc.mhc_eps)
        H_pre, H_post, H_res = self(x_TNC)
        return kernels.aggregate(x_TNC, H_pre), H_post, H_res, None
