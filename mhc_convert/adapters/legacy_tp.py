"""Tensor-parallel slices in Megatron legacy rank files (``mp_rank_TT[_PPP]``): a TP-sharded
tensor has no single global shape on disk, so each copy is checked against the configured one
(replicated: the full shape; sharded: the slices concatenate to it along one dim), and model
loading merges the slices back (``merge_tp``).

A dim-0 shard is one contiguous block of rows, except for tensors made of row blocks that are
sharded one by one (Mamba ``in_proj`` [z|x|B|C|dt], GDN's, a gated fc1 [gate|up]): the table
of those is ``LayerSpec.tp_parts``, read through ``codec.tp_parts``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mhc_convert.errors import InvalidInputError
from mhc_convert.view import CheckpointView
from mhc_model.config import HybridConfig
from mhc_model.toggle import codec as K
from mhc_model.toggle.shapes import stored_shape

Shape = tuple[int, ...]


def tp_dim(shapes: Sequence[Shape], want: Shape) -> int | None:
    """None when every copy is the full tensor (replicated), else the dim the slices split;
    ValueError when they form the configured shape along no dim."""
    if all(s == want for s in shapes):
        return None
    for d in range(len(want)):
        if all(len(s) == len(want) and s[:d] + s[d + 1:] == want[:d] + want[d + 1:]
               for s in shapes) and sum(s[d] for s in shapes) == want[d]:
            return d
    raise ValueError(f"TP slices {[list(s) for s in shapes]} do not form the configured "
                     f"shape {list(want)}")


def check_tp_shapes(view: CheckpointView, cfg: HybridConfig) -> None:
    """Every tensor's TP copies form its configured shape (unknown keys: the planner's)."""
    payloads = view.meta["payloads"]
    for key, e in view.entries.items():
        want = stored_shape(cfg, key) if e.kind == "tensor" else None
        if want is None:
            continue
        shapes = [tuple(payloads[c.rank]["model"][c.key].shape) for c in e.locator]
        try:
            tp_dim(shapes, want)
        except ValueError as err:
            raise InvalidInputError(str(err), path=view.path, key=key) from None


def merge_tp(cfg: HybridConfig, key: str, values: Sequence[torch.Tensor], *,
             path) -> torch.Tensor:
    """One tensor from the copies of ``key`` held by the TP ranks of its stage, in rank order."""
    want = stored_shape(cfg, key)
    if want is None:
        raise InvalidInputError("not a key of the configured model: its TP copies cannot be "
                                "merged", path=path, key=key)
    try:
        d = tp_dim([tuple(v.shape) for v in values], want)
    except ValueError as err:
        raise InvalidInputError(str(err), path=path, key=key) from None
    if d is None:
        if any(not torch.equal(v, values[0]) for v in values[1:]):
            raise InvalidInputError(f"the {len(values)} TP ranks hold different values of a "
                                    f"replicated tensor", path=path, key=key)
        return values[0]
    parts = K.tp_parts(cfg, key) if d == 0 else None
    if not parts:
        return torch.cat(list(values), dim=d)
    tp = len(values)
    if any(rows % tp for _, rows in parts):
        raise InvalidInputError(f"row blocks {list(parts)} do not divide over {tp} TP ranks",
                                path=path, key=key)
    blocks, start = [], 0
    for _, rows in parts:
        blocks += [v.narrow(0, start, rows // tp) for v in values]
        start += rows // tp
    return torch.cat(blocks, dim=0)


__all__ = ["check_tp_shapes", "merge_tp", "tp_dim"]
