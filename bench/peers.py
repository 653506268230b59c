"""Peer mHC implementations for ``bench/overhead.py``, run on the same stack in the same process.

Each peer is a context manager that, while active, makes a freshly built ``HybridModel`` (mHC on)
run its mHC math through that peer; the branches (our MLP / Mamba2 / attention layers), the
embedding, expand/contract and the head stay ours, so only the mHC site differs.

  * ``mhc_reference``: our paper-exact PyTorch reference (``mhc_model.mhc_ref``), eager; only the
    mHC ops are sent to it (``MHC_KERNELS=reference`` would also switch Mamba2 to our PyTorch SSD).
  * ``mhc_reference_compiled``: the same functions under ``torch.compile`` (default mode).
  * ``megatron_sites``: Megatron-LM's own ``HyperConnectionModule`` (the tree in
    ``MHC_MEGATRON_SRC``), ``use_fused_mhc`` True (its fused Triton kernels) or False (its native
    torch.compile'd path).  Per layer: ``hc(x) -> (aggregated, h_res, h_post, residual)``, our
    branch on ``aggregated``, then ``hc.fused_h_res_h_post_bda`` (dropout 0), the call sequence of
    Megatron's own ``HyperConnectionHybridLayer``.  Its parameters are fp32, like ours.
  * ``tilekernels_sites``: DeepSeek's TileKernels (tilelang kernels; ``tile_kernels.modeling.mhc
    .functional``): per layer ``mhc_pre(x, fn, scale, base) -> (u, (post, comb))``, our branch on
    ``u``, then ``mhc_post(y, x, post, comb)``, with the layer's own mHC parameters (fn = our
    ``mapping_proj.weight``, rows pre | post | res; scale = the three alphas; base = our bias),
    the deepseek convention's constants (post multiplier 2, eps ``mhc_eps``, our Sinkhorn
    iteration count instead of TileKernels' default 10).  ``tilelang_status`` says why the row
    is skipped when tilelang or tile_kernels does not import.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
from collections.abc import Iterator

import torch
from torch import Tensor, nn

import mhc_model.kernels as kernels
from mhc_model import mhc_ref


@contextlib.contextmanager
def mhc_reference() -> Iterator[None]:
    saved = kernels.use_triton
    kernels.use_triton = lambda *tensors: False
    try:
        yield
    finally:
        kernels.use_triton = saved


_COMPILED: dict[str, object] = {}


@contextlib.contextmanager
def mhc_reference_compiled() -> Iterator[None]:
    names = ("coefficients", "aggregate", "mix_post")
    saved = {n: getattr(mhc_ref, n) for n in names}
    for n in names:
        _COMPILED.setdefault(n, torch.compile(saved[n]))
        setattr(mhc_ref, n, _COMPILED[n])
    try:
        with mhc_reference():
            yield
    finally:
        for n, fn in saved.items():
            setattr(mhc_ref, n, fn)


def megatron_tree() -> str | None:
    return os.environ.get("MHC_MEGATRON_SRC") or None


def _megatron_modules(tree: str):
    if tree not in sys.path:
        sys.path.insert(0, tree)
    hc = importlib.import_module("megatron.core.transformer.hyper_connection")
    tc = importlib.import_module("megatron.core.transformer.transformer_config")
    return hc, tc.TransformerConfig


class _MegatronSite(nn.Module):
    """x_SBNC -> Megatron's mHC site around our branch ``inner`` -> x'_SBNC."""

    def __init__(self, hc_module: nn.Module, inner: nn.Module):
        super().__init__()
        self.hc = hc_module
        self.inner = inner

    def forward(self, x_SBNC: Tensor) -> Tensor:
        S, B, N, C = x_SBNC.shape
        aggregated, h_res, h_post, residual = self.hc(x_SBNC.reshape(S, B, N * C))
        y_SBC = self.inner(aggregated)
        out = self.hc.fused_h_res_h_post_bda(h_res, residual, h_post, (y_SBC, None), 0.0,
                                             True, False)
        return out.reshape(S, B, N, C)


def megatron_sites(model: nn.Module, fused: bool) -> nn.Module:
    """Replace every mHC layer of ``model`` (ours, mHC on, on CUDA) by Megatron's site with the
    same branch; returns the model."""
    tree = megatron_tree()
    if tree is None:
        raise RuntimeError("MHC_MEGATRON_SRC is not set")
    hc_mod, TransformerConfig = _megatron_modules(tree)
    cfg = model.config
    layers = model.decoder.layers
    mcfg = TransformerConfig(num_layers=len(layers), hidden_size=cfg.hidden_size,
                             num_attention_heads=32, enable_hyper_connections=True,
                             num_residual_streams=cfg.mhc.num_residual_streams,
                             mhc_sinkhorn_iterations=cfg.mhc.mhc_sinkhorn_iterations,
                             use_fused_mhc=fused)
    dev = next(model.parameters()).device
    for i, layer in enumerate(layers):
        site = hc_mod.HyperConnectionModule(mcfg, layer_number=i + 1).to(dev)
        layers[i] = _MegatronSite(site, layer.inner_layer)
    return model


def tree_commit(tree: str) -> str:
    """The commit a source tree (Megatron's, TileKernels') was exported from, when a COMMIT /
    provenance file names it."""
    for name in ("COMMIT", "REVISION", ".commit"):
        path = os.path.join(tree, name)
        if os.path.isfile(path):
            return open(path).read().strip()
    return "unknown commit"


class _TileKernelsSite(nn.Module):
    """x_SBNC -> TileKernels' mhc_pre, our branch ``inner``, TileKernels' mhc_post -> x'_SBNC."""

    def __init__(self, fx, hc: nn.Module, inner: nn.Module, n: int, iters: int, eps: float):
        super().__init__()
        self.fx, self.inner, self.n, self.iters, self.eps = fx, inner, n, iters, eps
        with torch.no_grad():  # copies: the peer trains its own parameters
            self.fn = nn.Parameter(hc.mapping_proj.weight.detach().clone())
            self.scale = nn.Parameter(torch.cat([hc.alpha_pre, hc.alpha_post, hc.alpha_res]))
            self.base = nn.Parameter(hc.bias.detach().clone())

    def forward(self, x_SBNC: Tensor) -> Tensor:
        u_SBC, (post, comb) = self.fx.mhc_pre(
            x_SBNC, self.fn, self.scale, self.base, norm_eps=self.eps, mhc_mult=self.n,
            post_mult_value=2.0, pre_eps=self.eps, sinkhorn_eps=self.eps,
            sinkhorn_repeat=self.iters)
        return self.fx.mhc_post(self.inner(u_SBC), x_SBNC, post, comb)


def tilekernels_sites(model: nn.Module, fx=None) -> nn.Module:
    """Replace every mHC layer of ``model`` (ours, mHC on, deepseek convention, on CUDA) by
    TileKernels' site around the same branch; returns the model.  First compares layer 0's
    output with ours on one random input without grad (T 512; there TileKernels' ``mhc_pre``
    runs its fused inference kernel, the timed training steps its four ops): max |theirs -
    ours| / max |ours| is left on the model as ``tilekernels_parity`` (bench/overhead.py
    prints it next to the row)."""
    fx = fx or importlib.import_module("tile_kernels.modeling.mhc.functional")
    mhc = model.config.mhc
    if mhc.mhc_convention != "deepseek":
        raise ValueError(f"TileKernels computes the deepseek convention, not {mhc.mhc_convention}")
    layers = model.decoder.layers
    parity = float("nan")  # no layer, nothing compared
    for i, layer in enumerate(layers):
        site = _TileKernelsSite(fx, layer.hyper_connection, layer.inner_layer,
                                mhc.num_residual_streams, mhc.mhc_sinkhorn_iterations,
                                mhc.mhc_eps)
        if i == 0:
            dev, C = site.fn.device, model.config.hidden_size
            x = torch.randn(512, 1, mhc.num_residual_streams, C, device=dev,
                            generator=torch.Generator(device=dev).manual_seed(0))
            x = x.to(layer.branch_dtype)  # the streams' dtype (TileKernels takes bf16)
            with torch.no_grad():
                ours, theirs = layer(x).float(), site(x).float()
            parity = ((theirs - ours).abs().max() / ours.abs().max()).item()
        layers[i] = site
    model.tilekernels_parity = parity
    return model


def tilekernels_provenance() -> str:
    """'tree <dir> (<its commit>) with tilelang <version>[, module alias ...]'; call after
    ``tilelang_status()`` returned None (both packages imported)."""
    tk, tl = sys.modules["tile_kernels"], sys.modules["tilelang"]
    tree = os.path.dirname(os.path.dirname(os.path.abspath(tk.__file__)))
    aliased = [f"{old} -> {new}" for old, new in TILELANG_ALIASES.items()
               if getattr(sys.modules.get(old), "__name__", old) == new]
    alias = f", module alias {', '.join(aliased)}" if aliased else ""
    return (f"tree {tree} ({tree_commit(tree)}) with tilelang "
            f"{getattr(tl, '__version__', 'unknown version')}{alias}")


# tilelang moved ``utils.target`` to ``backend.target`` after TileKernels 36d9e45d (2026-04-23)
# was written against it (tilelang 0.1.15 has only the latter); TileKernels imports the old path
# in one place (tile_kernels/quant/common.py), so the old name is aliased to the new module
TILELANG_ALIASES = {"tilelang.utils.target": "tilelang.backend.target"}


def tilelang_status() -> str | None:
    """None when tilelang and DeepSeek's tile_kernels import, else why not."""
    try:
        importlib.import_module("tilelang")
    except Exception as e:  # ImportError or a broken install: the row says which
        return f"tilelang not importable ({type(e).__name__})"
    for old, new in TILELANG_ALIASES.items():
        if importlib.util.find_spec(old) is None and old not in sys.modules:
            sys.modules[old] = importlib.import_module(new)
    try:
        importlib.import_module("tile_kernels")
    except Exception as e:
        return f"tile_kernels not importable ({type(e).__name__}: {str(e)[:120]})"
    return None
