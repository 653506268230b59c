"""Shared building blocks for the hybrid layers: RMSNorm, the fused pre-norm linear
(Megatron/TE ``LayerNormLinear``: ``layer_norm_weight`` + ``weight``), dtype helpers."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from mhc_model.config import HybridConfig
from mhc_model.errors import InvalidInputError

_INITIALISERS = ("normal_", "uniform_", "xavier_uniform_", "xavier_normal_", "kaiming_uniform_",
                 "kaiming_normal_", "trunc_normal_", "zeros_", "ones_", "constant_")


@contextlib.contextmanager
def no_initialisers() -> Iterator[None]:
    """Make ``torch.nn.init`` no-ops: on the meta device they only cost time (their reference
    decompositions import torch._dynamo, ~2 s per process)."""
    saved = {name: getattr(nn.init, name) for name in _INITIALISERS}
    try:
        for name in _INITIALISERS:
            setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)


def _largest_size_field(cfg: HybridConfig) -> tuple[str, int]:
    found: list[tuple[int, str]] = []
    for name, value in cfg.to_dict().items():
        items = value.items() if isinstance(value, dict) else [(None, value)]
        for sub, v in items:
            if isinstance(v, int) and not isinstance(v, bool):
                found.append((v, f"{name}.{sub}" if sub else name))
    value, name = max(found)
    return name, value


@contextlib.contextmanager
def allocatable(cfg: HybridConfig) -> Iterator[None]:
    """Turn torch's size-overflow errors while building modules for ``cfg`` (even on the meta
    device) into an ``InvalidInputError`` naming the largest size field of the config."""
    try:
        yield
    except RuntimeError as e:
        if "overflow" not in str(e) and "invalid" not in str(e).lower():
            raise
        name, value = _largest_size_field(cfg)
        why = str(e).splitlines()[0]
        raise InvalidInputError(f"the config's sizes cannot be allocated ({why}); largest size "
                                f"field: {name}={value}") from None


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(cfg: HybridConfig) -> torch.dtype:
    return _DTYPES[cfg.params_dtype]


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm computed in fp32, returned in x's dtype (Megatron/TE semantics)."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.square().mean(dim=-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype)


class RMSNorm(nn.Module):
    """Plain RMSNorm with a ``weight`` parameter (e.g. ``decoder.final_norm.weight``)."""

    def __init__(self, size: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


class Linear(nn.Module):
    """Bias-free linear with Megatron's key name ``weight`` [out, in]."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype, std: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype))
        self.std = std
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.std)

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.weight.t()


class LayerNormLinear(Linear):
    """RMSNorm fused into the following linear, as Transformer Engine stores it:
    keys ``layer_norm_weight`` [in] and ``weight`` [out, in]."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype, std: float,
                 eps: float):
        super().__init__(in_features, out_features, dtype, std)
        self.eps = eps
        self.layer_norm_weight = nn.Parameter(torch.ones(in_features, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.layer_norm_weight, self.eps) @ self.weight.t()


def output_std(cfg: HybridConfig) -> float:
    """Megatron's scaled init for output projections: std / sqrt(2 * num_layers)."""
    return cfg.init_std / math.sqrt(2.0 * cfg.num_layers)
