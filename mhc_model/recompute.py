"""Block recompute of the mHC streams (paper §4.3.2, DESIGN.md §1 "Recompute").

With ``mhc_recompute_layer_num = L_r`` the layers are grouped in blocks of L_r. Per block only
the block input x_{l0} [T, n, C] is kept; per layer only the branch output y_l [T, C] (which the
paper also stores) and the tiny mappings H_post/H_res. The streams x_l inside the block are not
saved: the first backward that needs one recomputes the whole block's chain
``x_{l+1} = mix(H_res(x_l), x_l) + H_post(x_l) * y_l`` from x_{l0} and the stored y's (no inner
layer is re-run), and the chain is freed once the block's first layer has finished backward.
The block's last output is not dropped: it is the next block's x_{l0}.

The chain reuses the mappings H_res / H_post the mix saved anyway, so recomputing x_{l+1} is
one mix forward (no coefficient recompute).

Fused path (``kernels.use_triton``): each layer is the fused site (``kernels.site_pre`` /
``site_post``) with a recompute link: it saves everything it saves without recompute except
x_l, and its backward, the same fused kernels, gets x_l from ``BlockCache.stream``. Gradients
are bitwise those of the fused path without recompute (same kernels, bitwise-equal inputs).

Reference path: two autograd functions per layer replace the aggregate and the mix: ``_Pre``
(coefficients + aggregate) and ``_Post`` (mix + post). Both compute their forward without
saving x_l and, in backward, re-run their own math under autograd on the recomputed x_l;
gradients are therefore those of the plain path (the recomputed values are bitwise the
forward's: same kernels, same inputs, deterministic).
"""

from __future__ import annotations

import torch
from torch import Tensor

from mhc_model import kernels


class BlockCache:
    """State of one recompute block for one forward pass."""

    def __init__(self, layers: list, x0_TNC: Tensor):
        self.layers = layers  # HybridLayer modules of this block, in order
        self.x0 = x0_TNC.detach()
        self.ys: dict[int, Tensor] = {}  # branch outputs y_l (saved by the mix anyway)
        self.hs: dict[int, tuple[Tensor, Tensor]] = {}  # (H_res, H_post), idem
        self._xs: list[Tensor] | None = None

    def keep(self, idx: int, y_TC: Tensor, H_res: Tensor, H_post: Tensor) -> None:
        self.ys[idx] = y_TC.detach()
        self.hs[idx] = (H_res.detach(), H_post.detach())

    @torch.no_grad()
    def stream(self, idx: int) -> Tensor:
        if idx == 0:
            return self.x0
        if self._xs is None:
            xs = [self.x0]
            for j, layer in enumerate(self.layers[:-1]):
                H_res, H_post = self.hs[j]
                xs.append(kernels.mix_post(xs[-1], H_res, H_post, self.ys[j], layer.convention)
                          .to(layer.branch_dtype))
            self._xs = xs
        return self._xs[idx]

    def release(self) -> None:
        self._xs = None


def _params(hc) -> tuple[Tensor, ...]:
    return (hc.mapping_proj.weight, hc.bias, hc.alpha_pre, hc.alpha_post, hc.alpha_res)


class _Pre(torch.autograd.Function):
    """(x_l, mHC params) -> (u_l, H_post, H_res) without saving x_l."""

    @staticmethod
    def forward(ctx, x_TNC, W, b, a_pre, a_post, a_res, cache: BlockCache, idx: int):
        hc = cache.layers[idx].hyper_connection
        H_pre, H_post, H_res = hc(x_TNC)
        u_TC = kernels.aggregate(x_TNC, H_pre)
        ctx.cache, ctx.idx = cache, idx
        ctx.save_for_backward(W, b, a_pre, a_post, a_res)  # parameters: no extra memory
        return u_TC, H_post, H_res

    @staticmethod
    def backward(ctx, g_u, g_post, g_res):
        cache, idx = ctx.cache, ctx.idx
        layer = cache.layers[idx]
        x = cache.stream(idx).detach().requires_grad_(True)
        params = tuple(p.detach().requires_grad_(True) for p in ctx.saved_tensors)
        hc = layer.hyper_connection
        with torch.enable_grad():
            H_pre, H_post, H_res = kernels.coefficients(
                x, *params, iters=hc.mhc.mhc_sinkhorn_iterations,
                convention=hc.convention, eps=hc.mhc.mhc_eps)
            u = kernels.aggregate(x, H_pre)
        outs, grads = [], []
        for o, g in ((u, g_u), (H_post, g_post), (H_res, g_res)):
            if g is not None:
                outs.append(o)
                grads.append(g)
        gx, *gp = torch.autograd.grad(outs, (x, *params), grads, allow_unused=True)
        if idx == 0:
            cache.release()  # the block's last backward: drop the recomputed chain
        return (gx, *gp, None, None)


class _Post(torch.autograd.Function):
    """(x_l, H_res, H_post, y_l) -> x_{l+1} without saving x_l."""

    @staticmethod
    def forward(ctx, x_TNC, H_res, H_post, y_TC, cache: BlockCache, idx: int):
        layer = cache.layers[idx]
        out = kernels.mix_post(x_TNC, H_res, H_post, y_TC, layer.convention)
        cache.keep(idx, y_TC, H_res, H_post)
        ctx.cache, ctx.idx = cache, idx
        ctx.save_for_backward(H_res, H_post, y_TC)
        return out.to(layer.branch_dtype)

    @staticmethod
    def backward(ctx, g_out):
        cache, idx = ctx.cache, ctx.idx
        layer = cache.layers[idx]
        H_res, H_post, y = (t.detach().requires_grad_(True) for t in ctx.saved_tensors)
        x = cache.stream(idx).detach().requires_grad_(True)
        with torch.enable_grad():
            out = kernels.mix_post(x, H_res, H_post, y, layer.convention).to(layer.branch_dtype)
        gx, g_res, g_post, g_y = torch.autograd.grad(out, (x, H_res, H_post, y), g_out)
        return gx, g_res, g_post, g_y, None, None


def _fused_layer_forward(layer, x_TNC: Tensor, S: int, B: int, cache: BlockCache,
                         idx: int) -> Tensor:
    hc = layer.hyper_connection
    u_TC, H_post, H_res, link = kernels.site_pre(
        x_TNC, *_params(hc), iters=hc.mhc.mhc_sinkhorn_iterations, convention=hc.convention,
        eps=hc.mhc.mhc_eps, streams=lambda: cache.stream(idx),
        done=cache.release if idx == 0 else None)
    C = x_TNC.shape[2]
    y_TC = layer.branch(u_TC.reshape(S, B, C)).reshape(S * B, C)
    out = kernels.site_post(x_TNC, H_res, H_post, y_TC, layer.convention, link)
    cache.keep(idx, y_TC, H_res, H_post)
    return out.to(layer.branch_dtype)


def layer_forward(layer, x_TNC: Tensor, S: int, B: int, cache: BlockCache, idx: int) -> Tensor:
    """One HybridLayer under block recompute; same math as ``HybridLayer.forward``."""
    hc = layer.hyper_connection
    if kernels.use_triton(x_TNC, *_params(hc)):
        return _fused_layer_forward(layer, x_TNC, S, B, cache, idx)
    u_TC, H_post, H_res = _Pre.apply(x_TNC, *_params(hc), cache, idx)
    N, C = x_TNC.shape[1:]
    y_SBC = layer.branch(u_TC.reshape(S, B, C))
    return _Post.apply(x_TNC, H_res, H_post, y_SBC.reshape(S * B, C), cache, idx)
