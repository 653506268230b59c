"""mHC per-layer math with a fused Triton path and the reference fallback.

``coefficients``, ``aggregate``, ``mix_post``, ``expand`` and the contracts have exactly the
signatures of ``mhc_model.mhc_ref``; ``site_pre`` / ``site_post`` are one whole site (coefficients +
aggregate, then the mix) whose fused backward writes the stream gradient once (see
``triton_site``), and on the reference path are exactly those three functions.  The Triton
kernels run when triton imports, every tensor argument is on CUDA and the environment
variable ``MHC_KERNELS`` is not ``"reference"`` (read at call time);
otherwise the reference implementation runs.  Importing this package never needs triton or
CUDA.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from torch import Tensor

from mhc_model import mhc_ref
from mhc_model.conventions import Convention

try:  # triton is optional (CPU-only machines, CI)
    from mhc_model.kernels import triton_mhc as _triton
except ImportError:  # pragma: no cover - depends on the machine
    _triton = None

__all__ = ["coefficients", "aggregate", "mix_post", "site_pre", "site_post", "expand",
           "contract_mean", "contract_learned", "triton_available", "use_triton"]


def triton_available() -> bool:
    return _triton is not None


def use_triton(*tensors: Tensor) -> bool:
    """True when the fused path applies to these tensors."""
    if _triton is None or os.environ.get("MHC_KERNELS", "") == "reference":
        return False
    # Empty batches go to the reference (a zero-size grid is not launchable).
    return all(t.is_cuda and t.numel() > 0 for t in tensors)


def coefficients(
    x_TNC: Tensor,
    weight_KD: Tensor,
    bias_K: Tensor,
    alpha_pre: Tensor,
    alpha_post: Tensor,
    alpha_res: Tensor,
    *,
    iters: int,
    convention: str | Convention,
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor, Tensor]:
    args = (x_TNC, weight_KD, bias_K, alpha_pre, alpha_post, alpha_res)
    impl = _triton if use_triton(*args) else mhc_ref
    return impl.coefficients(*args, iters=iters, convention=convention, eps=eps)


def aggregate(x_TNC: Tensor, H_pre_TN: Tensor) -> Tensor:
    impl = _triton if use_triton(x_TNC, H_pre_TN) else mhc_ref
    return impl.aggregate(x_TNC, H_pre_TN)


def expand(h_TC: Tensor, n: int) -> Tensor:
    """Stream start [T, n, C], as ``mhc_ref.expand``."""
    impl = _triton if use_triton(h_TC) else mhc_ref
    return impl.expand(h_TC, n)


def contract_mean(x_TNC: Tensor) -> Tensor:
    """Mean of the streams [T, C] in the stream dtype, as ``mhc_ref.contract_mean``."""
    impl = _triton if use_triton(x_TNC) else mhc_ref
    return impl.contract_mean(x_TNC)


def contract_learned(x_TNC: Tensor, fn_ND: Tensor, base_N: Tensor, scale_1: Tensor,
                     eps: float = 1e-6) -> Tensor:
    """Learned contract (DeepSeek-V4 "hc_head") [T, C], as ``mhc_ref.contract_learned``."""
    impl = _triton if use_triton(x_TNC, fn_ND, base_N, scale_1) else mhc_ref
    return impl.contract_learned(x_TNC, fn_ND, base_N, scale_1, eps)


def mix_post(
    x_TNC: Tensor, H_res_TNN: Tensor, H_post_TN: Tensor, y_TC: Tensor,
    convention: str | Convention,
) -> Tensor:
    impl = _triton if use_triton(x_TNC, H_res_TNN, H_post_TN, y_TC) else mhc_ref
    return impl.mix_post(x_TNC, H_res_TNN, H_post_TN, y_TC, convention)


def site_pre(
    x_TNC: Tensor,
    weight_KD: Tensor,
    bias_K: Tensor,
    alpha_pre: Tensor,
    alpha_post: Tensor,
    alpha_res: Tensor,
    *,
    iters: int,
    convention: str | Convention,
    eps: float = 1e-6,
    streams: Callable[[], Tensor] | None = None,
    done: Callable[[], None] | None = None,
) -> tuple[Tensor, Tensor, Tensor, object]:
    """(u [T,C], H_post, H_res, link) of one site; hand ``link`` to ``site_post``.  On the
    reference path link is None and this is ``coefficients`` followed by ``aggregate``.
    ``streams`` / ``done`` (fused path only): block recompute, x is fetched again in backward
    (``mhc_model.recompute``); the reference path refuses them (it would keep x)."""
    args = (x_TNC, weight_KD, bias_K, alpha_pre, alpha_post, alpha_res)
    if use_triton(*args):
        return _triton.site_pre(*args, iters=iters, convention=convention, eps=eps,
                                streams=streams, done=done)
    if streams is not None or done is not None:
        raise ValueError("site_pre: streams/done need the fused path (check use_triton); "
                         "the reference path recomputes through mhc_model.recompute")
    H_pre, H_post, H_res = mhc_ref.coefficients(*args, iters=iters, convention=convention,
                                                eps=eps)
    return mhc_ref.aggregate(x_TNC, H_pre), H_post, H_res, None


def site_post(
    x_TNC: Tensor, H_res_TNN: Tensor, H_post_TN: Tensor, y_TC: Tensor,
    convention: str | Convention, link: object,
) -> Tensor:
    """mix_post of the site ``site_pre`` returned ``link`` for (reference path: link None)."""
    if link is None:
        return mix_post(x_TNC, H_res_TNN, H_post_TN, y_TC, convention)
    return _triton.site_post(x_TNC, H_res_TNN, H_post_TN, y_TC, convention, link)
