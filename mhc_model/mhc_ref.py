"""Reference mHC math (DESIGN.md §1): plain PyTorch, fp32 mapping math, every convention.

This is the oracle the fused kernels in ``mhc_model.kernels`` are tested against. Tensors are
named by shape: T tokens (flattened s*b), N streams, C hidden. Every function that depends on
the convention takes its name or its ``Convention`` record (``mhc_model.conventions``) and
branches on the record's fields.

Paper equations (arXiv 2512.24880 v2): coefficients Eq. 14-18 (RMS over the flattened n*C
vector, projection, alpha/bias, sigmoid / 2*sigmoid gates), Sinkhorn-Knopp Eq. 12/19,
aggregate F_pre = H_pre x, mix F_post,res = H_res x + H_post^T F(.).
"""

from __future__ import annotations

import torch
from torch import Tensor

from mhc_model.conventions import Convention
from mhc_model.conventions import convention as _resolve

__all__ = ["Convention", "sinkhorn", "rms_factor", "coefficients", "alpha_lanes", "mappings",
           "aggregate", "mix_post", "expand", "contract_mean", "contract_learned"]


def sinkhorn(logits_TNN: Tensor, iters: int, convention: str | Convention,
             eps: float = 1e-6) -> Tensor:
    """Project logits onto (approximately) doubly stochastic matrices, in fp32.

    sinkhorn="softmax_first" (TileKernels / DeepSeek-V4 / Megatron dev): row softmax + eps,
    a column normalisation, then (iters-1) x {row, column}.  "exp_rowmax" (Megatron dsv4):
    exp(L - rowmax), then iters x {row, column}.  Both end on a column normalisation.
    """
    conv = _resolve(convention)
    L = logits_TNN.float()
    if conv.sinkhorn == "softmax_first":
        M = torch.softmax(L, dim=-1) + eps
        M = M / (M.sum(dim=-2, keepdim=True) + eps)
        for _ in range(iters - 1):
            M = M / (M.sum(dim=-1, keepdim=True) + eps)
            M = M / (M.sum(dim=-2, keepdim=True) + eps)
        return M
    M = torch.exp(L - L.amax(dim=-1, keepdim=True))  # "exp_rowmax"
    for _ in range(iters):
        M = M / (M.sum(dim=-1, keepdim=True) + eps)
        M = M / (M.sum(dim=-2, keepdim=True) + eps)
    return M


def rms_factor(xf_TK: Tensor, convention: str | Convention, eps: float = 1e-6) -> Tensor:
    """r such that r * (x @ W^T) equals RMSNorm(x) @ W^T without gamma (paper Eq. 15-16).
    rms_factor="rsqrt_mean": rsqrt(mean(x^2) + eps); "inv_norm": 1 / (||x|| / sqrt(K) + eps)."""
    if _resolve(convention).rms_factor == "rsqrt_mean":
        return torch.rsqrt(xf_TK.square().mean(dim=-1, keepdim=True) + eps)
    rms = xf_TK.norm(dim=-1, keepdim=True) / (xf_TK.shape[-1] ** 0.5)  # "inv_norm"
    return 1.0 / (rms + eps)


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
    """(H_pre [T,N], H_post [T,N], H_res [T,N,N]) in fp32. K = N^2 + 2N, D = N*C.
    Row order of weight/bias: [pre(N) | post(N) | res(N^2) row-major]."""
    conv = _resolve(convention)
    T, N, C = x_TNC.shape
    xf_TD = x_TNC.reshape(T, N * C).float()
    proj_TK = xf_TD @ weight_KD.float().t()
    r_T1 = rms_factor(xf_TD, conv, eps)
    scale_K = alpha_lanes(alpha_pre, alpha_post, alpha_res, N)
    return mappings(r_T1 * proj_TK * scale_K + bias_K.float(), N, iters=iters, convention=conv,
                    eps=eps)


def alpha_lanes(alpha_pre: Tensor, alpha_post: Tensor, alpha_res: Tensor, N: int) -> Tensor:
    """[N^2 + 2N] fp32: each projection lane's alpha (Eq. 16), in the row order
    pre (N) | post (N) | res (N^2)."""
    a = (alpha_pre.float().reshape(1), alpha_post.float().reshape(1),
         alpha_res.float().reshape(1))
    return torch.cat([a[0].expand(N), a[1].expand(N), a[2].expand(N * N)])


def mappings(h_TK: Tensor, N: int, *, iters: int, convention: str | Convention,
             eps: float = 1e-6) -> tuple[Tensor, Tensor, Tensor]:
    """(H_pre, H_post, H_res) from the logits h = r * proj * alpha + bias [T, N^2 + 2N]
    (Eq. 17-19): the gates and Sinkhorn, elementwise on the rows."""
    conv = _resolve(convention)
    T = h_TK.shape[0]
    H_pre = torch.sigmoid(h_TK[:, :N])
    if conv.h_pre_eps:
        H_pre = H_pre + eps
    H_post = 2.0 * torch.sigmoid(h_TK[:, N : 2 * N])
    H_res = sinkhorn(h_TK[:, 2 * N :].reshape(T, N, N), iters, conv, eps)
    return H_pre, H_post, H_res


def aggregate(x_TNC: Tensor, H_pre_TN: Tensor) -> Tensor:
    """u = sum_j H_pre[j] x_j, fp32 accumulation, output in the stream dtype."""
    return torch.einsum("tn,tnc->tc", H_pre_TN.float(), x_TNC.float()).to(x_TNC.dtype)


def mix_post(
    x_TNC: Tensor, H_res_TNN: Tensor, H_post_TN: Tensor, y_TC: Tensor,
    convention: str | Convention,
) -> Tensor:
    """x'[i] = mix(H_res, x)[i] + H_post[i] * y.
    mix_transposed: mix[i] = sum_j H[j,i] x[j] (H^T);  otherwise mix[i] = sum_j H[i,j] x[j]."""
    eq = "tji,tjc->tic" if _resolve(convention).mix_transposed else "tij,tjc->tic"
    mixed = torch.einsum(eq, H_res_TNN.float(), x_TNC.float())
    out = mixed + H_post_TN.float().unsqueeze(-1) * y_TC.float().unsqueeze(1)
    return out.to(x_TNC.dtype)


def expand(h_TC: Tensor, n: int) -> Tensor:
    """Stream start: n copies of the embedding output (no 1/n)."""
    return h_TC.unsqueeze(1).expand(-1, n, -1).contiguous()


def contract_mean(x_TNC: Tensor) -> Tensor:
    return x_TNC.float().mean(dim=1).to(x_TNC.dtype)


def contract_learned(
    x_TNC: Tensor, fn_ND: Tensor, base_N: Tensor, scale_1: Tensor, eps: float = 1e-6
) -> Tensor:
    """DeepSeek-V4 "hc_head": pre = sigmoid((x fn^T) * rsqrt(mean x^2 + eps) * scale + base) + eps;
    y = sum_j pre_j x_j."""
    T, N, C = x_TNC.shape
    xf_TD = x_TNC.reshape(T, N * C).float()
    r_T1 = torch.rsqrt(xf_TD.square().mean(dim=-1, keepdim=True) + eps)
    pre_TN = torch.sigmoid((xf_TD @ fn_ND.float().t()) * r_T1 * scale_1.float() + base_N.float())
    pre_TN = pre_TN + eps
    return torch.einsum("tn,tnc->tc", pre_TN, x_TNC.float()).to(x_TNC.dtype)
