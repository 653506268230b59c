"""Where the bytes kept for backward live: a census of the autograd graph behind a loss.

Walks every node reachable from ``root.grad_fn`` and counts the storages its backward holds:
built-in nodes' ``_saved_*`` tensors, custom Functions' ``saved_tensors`` and the tensors their
ctx attributes reach two objects deep, through closures and bound methods too (ctx ->
``triton_site.SiteLink`` -> its ``streams`` closure -> ``recompute.BlockCache``: the streams a
recompute block keeps outside ``save_for_backward``).  Every storage is counted once,
whole (a view keeps its whole base alive), under the first node that holds it in graph order
from the root; parameters are left out (they are not activations).  ``bench/overhead.py``
prints it per token for mHC off, ours fused and fused + recompute next to the floor of
``bench/memfloor.py`` (issue 16: where each byte over the plain stack lives).
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterable, Iterator

from torch import Tensor, nn


def _flat(v, depth: int) -> Iterator[Tensor]:
    if isinstance(v, Tensor):
        yield v
    elif isinstance(v, (list, tuple)):
        for u in v:
            yield from _flat(u, depth)
    elif isinstance(v, dict):
        for u in v.values():
            yield from _flat(u, depth)
    elif isinstance(v, (nn.Module, str, bytes, int, float, bool, type(None))):
        return  # modules hold parameters, not activations
    elif hasattr(v, "__self__") and callable(v):  # a bound method: its object
        yield from _flat(v.__self__, depth)
    elif getattr(v, "__closure__", None):  # a closure: what it captured
        for cell in v.__closure__:
            yield from _flat(cell.cell_contents, depth)
    elif depth > 0:
        # an object (link, cache): its own attributes, one level further down
        names = list(getattr(v, "__dict__", {})) + list(getattr(type(v), "__slots__", ()))
        for name in names:
            yield from _flat(getattr(v, name, None), depth - 1)


def _held(node) -> Iterator[Tensor]:
    for name in dir(node):
        if name.startswith("_saved_"):
            try:
                yield from _flat(getattr(node, name), 0)
            except RuntimeError:  # freed already, or not materialisable
                continue
    if hasattr(node, "saved_tensors"):  # custom autograd Function (the node is its ctx)
        with contextlib.suppress(RuntimeError):  # freed by an earlier backward
            # None entries: optional inputs a Function saved (mamba-ssm's SSD scan does)
            yield from _flat(node.saved_tensors, 0)
        for name, v in vars(node).items() if hasattr(node, "__dict__") else ():
            if not name.startswith("_"):
                # ctx -> SiteLink -> its ``streams`` closure -> BlockCache -> the block input
                yield from _flat(v, 2)


def saved_census(root: Tensor, params: Iterable[Tensor] = ()) -> dict[str, int]:
    """Bytes held for backward by the graph behind ``root``, by node type name."""
    skip = {p.untyped_storage().data_ptr() for p in params}
    seen_nodes: set = set()
    seen: set[int] = set()
    out: dict[str, int] = defaultdict(int)
    stack = [root.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen_nodes:
            continue
        seen_nodes.add(node)
        for t in _held(node):
            st = t.untyped_storage()
            ptr = st.data_ptr()
            if ptr in skip or ptr in seen or st.nbytes() == 0:
                continue
            seen.add(ptr)
            out[type(node).__name__] += st.nbytes()
        stack.extend(fn for fn, _ in node.next_functions)
    return dict(out)


def model_census(model: nn.Module, ids: Tensor) -> dict[str, int]:
    """``saved_census`` of one forward of ``model`` on ``ids`` (the graph is freed after)."""
    loss = model(ids).float().mean()
    out = saved_census(loss, model.parameters())
    del loss
    return out


def describe(per_label: dict[str, dict[str, int]], tokens: int, top: int = 6) -> str:
    """One line: total bytes per token for each label and, for every label after the first,
    the node types that account for its difference from the first."""
    labels = list(per_label)
    base = per_label[labels[0]]
    parts = []
    for label in labels:
        c = per_label[label]
        part = f"{label} {sum(c.values()) / tokens:.0f} B/token"
        if label != labels[0]:
            diff = {k: c.get(k, 0) - base.get(k, 0) for k in set(c) | set(base)}
            keys = sorted(diff, key=lambda k: -abs(diff[k]))[:top]
            part += " (" + ", ".join(f"{k} {diff[k] / tokens:+.0f}" for k in keys
                                     if diff[k]) + ")"
        parts.append(part)
    return "; ".join(parts)
