"""One mHC site as two autograd Functions whose backward writes the stream gradient once.

The plain fused path has three consumers of the site's input streams x_l [T, N, C]: the
coefficients (Eq. 14-19), the aggregate u = H_pre x (F_pre) and the mix x' = H_res x + H_post y
(F_post,res, Eq. 3).  Each backward writes its own nC-sized dx and autograd sums them: two
extra reads of 2 nC and writes of nC per site, 24 C-units of the ~55 the site's backward moves,
plus up to three nC gradients alive at once.  Here

  ``SitePre``   x -> (u, H_post, H_res): coefficients + aggregate in one Function;
  ``SitePost``  (x, H_res, H_post, y) -> x': the mix, whose backward hands its dx to the
                ``SiteLink`` of the site instead of returning it;

and SitePre's backward first reduces dH_pre = sum_c x_j du (one read of x and du), then runs
the coefficient backward with the aggregate's dx (H_pre[j] du) and the mix's dx added inside
the projection backward's single pass over x (``triton_proj_bwd._proj_bwd_kernel``): the mix
backward writes its dx and the pass adds it (EXTRA; when C is not a multiple of the tile the
aggregate's dx is added to the mix's first).  ``triton_proj.site_tiles`` picks the pass's
tiles: per stream, or GROUP (the C block of every stream: du read once); "group_mixg" has the
pass form the mix's dx sum_i Hm[i, j] g_i itself from SitePost's output gradient g (MIXG), so
the mix backward writes no dx (4 of the 32 C-units, bf16, the site's backward moves); it
measured slower on the H200 (``triton_proj.CONFIG``) and is off.
Order is guaranteed by the graph: SitePre's outputs H_post / H_res feed SitePost, so SitePost's
backward has run before SitePre's.  Same math as ``mhc_ref`` (coefficients, aggregate,
mix_post); the sums are fp32 and rounded once, where autograd rounds each partial dx.

Block recompute (paper §4.3.2, ``mhc_model.recompute``): a link made with ``streams`` (a
callable returning x again) keeps no reference to x.  Both Functions save everything else
they save without recompute (the projection lanes, the mappings, y: ~0.2 KB a token against
n C bf16 for x) and fetch x through ``streams`` in backward, so the backward is this same
fused one on bitwise-equal inputs; ``done`` runs after SitePre's backward (the block frees
its recomputed chain).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mhc_model.conventions import convention
from mhc_model.kernels.triton_coef import coef_backward, coef_forward
from mhc_model.kernels.triton_proj import agg_fold_ok, site_tiles
from mhc_model.kernels.triton_stream import agg_backward, agg_forward, mix_backward, mix_forward


class SiteLink:
    """Carries SitePost's gradient of x to SitePre's backward (one per site call).
    ``streams`` / ``done``: block recompute (see the module docstring)."""

    __slots__ = ("dx", "mix_g", "x", "streams", "done")

    def __init__(self, streams: Callable[[], torch.Tensor] | None = None,
                 done: Callable[[], None] | None = None) -> None:
        self.dx: torch.Tensor | None = None  # the mix's dx
        # MIXG instead: (g [T, D], fp32 H_res, mix_transposed), as coef_backward takes it
        self.mix_g: tuple | None = None
        self.x: torch.Tensor | None = None
        self.streams = streams
        self.done = done

    def stream_TD(self, T: int, D: int) -> torch.Tensor:
        """x [T, D] contiguous, recomputed (recompute links only)."""
        x = self.streams().reshape(T, D)
        return x if x.is_contiguous() else x.contiguous()


class SitePre(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TNC, weight_KD, bias_K, alpha_pre, alpha_post, alpha_res,
                iters, conv, eps, link: SiteLink):
        (H_pre, H_post, H_res), saved, ctx.meta = coef_forward(
            x_TNC, weight_KD, bias_K, (alpha_pre, alpha_post, alpha_res), iters, conv, eps)
        x = saved[0].view(x_TNC.shape)  # contiguous [T, N, C], the storage of saved x_TD
        u_TC = agg_forward(x, H_pre)
        link.x = x  # for SitePost.forward; a recompute link drops it there
        ctx.link = link
        if link.streams is None:
            ctx.save_for_backward(*saved, H_pre)
        else:
            ctx.save_for_backward(*saved[1:], H_pre)
        return u_TC, H_post, H_res

    @staticmethod
    def backward(ctx, du_TC, dH_post, dH_res):
        *saved, H_pre = ctx.saved_tensors
        T, N, C = ctx.meta[:3]
        link = ctx.link
        if link.streams is not None:
            saved.insert(0, link.stream_TD(T, N * C))
        dx_mix, link.dx, link.x = link.dx, None, None
        mix_g, link.mix_g = link.mix_g, None  # MIXG: the projection backward forms the mix's dx
        group = mix_g is not None or site_tiles(N, C) == "group"
        dH_pre = fold = None
        if du_TC is not None:
            du_TC = du_TC.contiguous()
            fold = group or agg_fold_ok(C)
            dx_agg, dH_pre = agg_backward(saved[0].view(T, N, C), H_pre, du_TC, not fold, True)
            if not fold:  # C tiles would straddle streams: add the aggregate's dx to the mix's
                dx_mix = dx_agg if dx_mix is None else dx_mix.add_(dx_agg)
        dx_extra = None if dx_mix is None else dx_mix.reshape(T, N * C)
        grads = coef_backward(saved, ctx.meta, dH_pre, dH_post, dH_res,
                              du_TC=du_TC if fold else None, H_pre=H_pre if fold else None,
                              dx_extra=dx_extra, mix_g=mix_g, group=group)
        if link.done is not None:
            link.done()
        return (*grads, None, None, None, None)


class SitePost(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TNC, H_res_TNN, H_post_TN, y_TC, conv, link: SiteLink):
        if link.x is None or link.x.data_ptr() != x_TNC.data_ptr():
            raise ValueError("SitePost needs the streams its SitePre was given (same link)")
        mix_t = convention(conv).mix_transposed
        x = link.x
        hr = H_res_TNN.float().contiguous()
        hp = H_post_TN.float().contiguous()
        y = y_TC.contiguous()
        ctx.link = link
        ctx.mix_t = mix_t
        out = mix_forward(x, hr, hp, y, mix_t)
        if link.streams is None:
            ctx.save_for_backward(x, hr, hp, y)
        else:
            link.x = None  # nothing of this site holds x now
            ctx.save_for_backward(hr, hp, y)
        return out

    @staticmethod
    def backward(ctx, g_TNC):
        link = ctx.link
        T, N, C = g_TNC.shape
        g = g_TNC.contiguous()
        if link.streams is None:
            x, hr, hp, y = ctx.saved_tensors
        else:
            hr, hp, y = ctx.saved_tensors
            x = link.stream_TD(T, N * C).view(T, N, C)
        need_x = ctx.needs_input_grad[0]
        mixg = need_x and site_tiles(N, C) == "group_mixg"
        dx, dhr, dhp, dy = mix_backward(x, hr, hp, y, g, ctx.mix_t,
                                        need_dx=need_x and not mixg)
        if mixg:  # SitePre's backward, which runs next for this site, forms the mix's dx
            link.mix_g = (g.view(T, N * C), hr, ctx.mix_t)
        elif need_x:
            link.dx = dx  # added in SitePre's backward
        return None, dhr, dhp, dy, None, None
