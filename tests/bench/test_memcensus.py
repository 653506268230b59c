"""bench/memcensus.py: the census of bytes an autograd graph keeps for backward."""

from __future__ import annotations

import sys

import torch
from torch import nn

from tests.paths import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import memcensus  # noqa: E402


def test_counts_each_saved_storage_once_under_its_first_holder():
    x = torch.randn(5, 7, requires_grad=True)
    y = torch.sin(x * 2.0)  # SinBackward0 keeps x * 2.0; MulBackward0 the scalar (0-dim f64)
    z = y.exp()  # ExpBackward0 keeps its result
    out = memcensus.saved_census(z.sum())
    assert out == {"ExpBackward0": 35 * 4, "SinBackward0": 35 * 4, "MulBackward0": 8}


def test_shared_storage_and_parameters_are_not_double_counted():
    x = torch.randn(4, 6, requires_grad=True)
    w = nn.Parameter(torch.randn(6, 3))
    loss = (x.sin() + x.cos() + (x @ w).sum()).sum()  # x kept by sin, cos and mm: once
    out = memcensus.saved_census(loss, [w])
    assert sum(out.values()) == 24 * 4
    assert memcensus.saved_census(loss)  # without the exclusion the weight counts too
    assert sum(memcensus.saved_census(loss).values()) == 24 * 4 + 18 * 4


class _Keep:
    def __init__(self, t):
        self.t = t


class _Hold(torch.autograd.Function):
    """Saves its input (and a None) through save_for_backward; ``attach(ctx)`` hangs further
    tensors on ctx the way the site Functions do (objects, slotted links, closures)."""

    @staticmethod
    def forward(ctx, a, attach):
        ctx.save_for_backward(a, None)  # an optional input that was not given
        attach(ctx)
        return a * 1.0

    @staticmethod
    def backward(ctx, g):
        return g, None


def test_custom_function_saved_tensors_and_ctx_objects():
    a = torch.randn(3, requires_grad=True)
    b = torch.randn(10)

    def keep(ctx):
        ctx.keep = _Keep(b)

    out = memcensus.saved_census(_Hold.apply(a, keep).sum())
    assert out == {"_HoldBackward": 3 * 4 + 10 * 4}


def test_model_census_orders_off_fused_and_recompute():
    from mhc_model import HybridModel
    from tests.model.helpers import tiny_config, tokens

    ids = tokens()
    totals = {}
    for label, cfg in (("off", tiny_config("M-*-")), ("on", tiny_config("M-*-", mhc=True)),
                       ("rc", tiny_config("M-*-", mhc=True, mhc_recompute_layer_num=2))):
        torch.manual_seed(0)
        totals[label] = sum(memcensus.model_census(HybridModel(cfg), ids).values())
    # the reference path keeps every site's streams and mapping intermediates; block recompute
    # keeps the block inputs, y and the mix's mappings only
    n, C, L = 4, 32, 4
    assert totals["on"] - totals["off"] >= L * n * C * 4 * ids.numel()
    assert totals["off"] < totals["rc"] < totals["on"]
    line = memcensus.describe({"off": {"A": 10}, "on": {"A": 10, "B": 22}}, 2)
    assert line == "off 5 B/token; on 16 B/token (B +11)"


class _Cache:
    def __init__(self, t):
        self.t = t

    def get(self):
        return self.t


class _Link:
    __slots__ = ("streams", "done")

    def __init__(self, streams, done):
        self.streams, self.done = streams, done


def test_tensors_behind_closures_and_bound_methods_count():
    a = torch.randn(3, requires_grad=True)
    cache = _Cache(torch.randn(6))

    def link(ctx):  # as the fused site's recompute link reaches its block cache
        ctx.link = _Link(lambda: cache.get(), cache.get)

    assert memcensus.saved_census(_Hold.apply(a, link).sum()) == {"_HoldBackward": 3 * 4 + 24}
