"""Fused Triton mHC kernels: public entry points with the reference signatures.

Kernels and autograd Functions live in ``triton_coef`` (Eq. 14-19: projection, RMS,
gates, Sinkhorn; projection kernels in ``triton_proj``), ``triton_sinkhorn`` (register-tile
Sinkhorn fwd/bwd), ``triton_stream`` (aggregate F_pre and mix+post F_post,res) and
``triton_site`` (one site whose backward writes the stream gradient once) and ``triton_head``
(the learned output contract, DeepSeek-V4 "hc_head").  Import requires
triton; use the dispatching ``mhc_model.kernels`` package instead of importing this module directly.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from mhc_model.conventions import Convention
from mhc_model.conventions import convention as convention_record
from mhc_model.kernels.triton_coef import Coefficients
from mhc_model.kernels.triton_head import LearnedHead
from mhc_model.kernels.triton_site import SiteLink, SitePost, SitePre
from mhc_model.kernels.triton_stream import Aggregate, ContractMean, ExpandStreams, MixPost


def coefficients(x_TNC: Tensor, weight_KD: Tensor, bias_K: Tensor, alpha_pre: Tensor,
                 alpha_post: Tensor, alpha_res: Tensor, *, iters: int,
                 convention: str | Convention,
                 eps: float = 1e-6) -> tuple[Tensor, Tensor, Tensor]:
    """(H_pre [T,N], H_post [T,N], H_res [T,N,N]) fp32, as ``mhc_ref.coefficients``."""
    return Coefficients.apply(x_TNC, weight_KD, bias_K, alpha_pre, alpha_post, alpha_res,
                              int(iters), convention_record(convention), float(eps))


def aggregate(x_TNC: Tensor, H_pre_TN: Tensor) -> Tensor:
    """u [T,C] = sum_j H_pre[j] x_j in the stream dtype, as ``mhc_ref.aggregate``."""
    return Aggregate.apply(x_TNC, H_pre_TN)


def expand(h_TC: Tensor, n: int) -> Tensor:
    """[T, n, C] copies of h, as ``mhc_ref.expand``; the backward sums the streams in one pass."""
    return ExpandStreams.apply(h_TC, int(n))


def contract_mean(x_TNC: Tensor) -> Tensor:
    """Mean of the streams in one pass, as ``mhc_ref.contract_mean`` (no fp32 copy of x)."""
    return ContractMean.apply(x_TNC)


def contract_learned(x_TNC: Tensor, fn_ND: Tensor, base_N: Tensor, scale_1: Tensor,
                     eps: float = 1e-6) -> Tensor:
    """Learned contract [T, C] in the stream dtype, as ``mhc_ref.contract_learned`` (no fp32
    copy of x kept for backward)."""
    return LearnedHead.apply(x_TNC, fn_ND, base_N, scale_1, float(eps))


def mix_post(x_TNC: Tensor, H_res_TNN: Tensor, H_post_TN: Tensor, y_TC: Tensor,
             convention: str | Convention) -> Tensor:
    """x' [T,N,C] = mix(H_res, x) + H_post * y, as ``mhc_ref.mix_post``."""
    return MixPost.apply(x_TNC, H_res_TNN, H_post_TN, y_TC,
                         convention_record(convention))


def site_pre(x_TNC: Tensor, weight_KD: Tensor, bias_K: Tensor, alpha_pre: Tensor,
             alpha_post: Tensor, alpha_res: Tensor, *, iters: int,
             convention: str | Convention, eps: float = 1e-6,
             streams: Callable[[], Tensor] | None = None,
             done: Callable[[], None] | None = None) -> tuple[Tensor, Tensor, Tensor, SiteLink]:
    """(u [T,C], H_post, H_res, link): coefficients + aggregate of one site; pass ``link`` to
    ``site_post`` with the same streams.  ``streams``/``done``: block recompute (the site keeps
    no reference to x and asks ``streams()`` for it in backward; see ``triton_site``)."""
    link = SiteLink(streams, done)
    u, H_post, H_res = SitePre.apply(x_TNC, weight_KD, bias_K, alpha_pre, alpha_post,
                                     alpha_res, int(iters), convention_record(convention),
                                     float(eps), link)
    return u, H_post, H_res, link


def site_post(x_TNC: Tensor, H_res_TNN: Tensor, H_post_TN: Tensor, y_TC: Tensor,
              convention: str | Convention, link: SiteLink) -> Tensor:
    """x' = mix(H_res, x) + H_post * y of the site ``link`` came from."""
    return SitePost.apply(x_TNC, H_res_TNN, H_post_TN, y_TC, convention_record(convention),
                          link)
