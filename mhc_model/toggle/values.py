"""The values of the parameters an enable adds (DESIGN.md §4, §5): one function for the
converter and both in-process routes, so every route writes the same bits.

A layer's init tensors are drawn once (``exact_hc_tensors`` is seeded by the layer index) and
shared by its model key and its ``fp32_param``; Adam moments start at zero. mHC parameters are
fp32 whatever the params dtype (see ``HybridLayer``).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from mhc_model.config import HybridConfig
from mhc_model.hyper_connection import exact_hc_tensors, exact_head_tensors
from mhc_model.toggle.plan import NEW_PARAM_OPT_STATE, Add, ParamId


class NewValues:
    """``values(add)`` -> the tensor for one planned ``Add`` of ``target``'s mHC parameters.
    ``param_dtype``: the dtype of the model values (fp32 in ``mhc_model``; a target that keeps
    mHC parameters in the params dtype gets them rounded); optimizer states are fp32."""

    def __init__(self, target: HybridConfig, init: str = "exact",
                 param_dtype: torch.dtype = torch.float32):
        self.target, self.init, self.param_dtype = target, init, param_dtype
        self._drawn: dict[tuple[str, int | None], dict[str, Tensor]] = {}

    def param(self, what: ParamId) -> Tensor:
        kind, layer, name = what
        if (kind, layer) not in self._drawn:
            self._drawn[kind, layer] = (
                exact_hc_tensors(self.target, layer, init=self.init) if kind == "hc"
                else exact_head_tensors(self.target))
        return self._drawn[kind, layer][name]

    def __call__(self, add: Add) -> Tensor:
        if add.opt_state is None:
            return self.param(add.what).to(self.param_dtype).contiguous()
        if NEW_PARAM_OPT_STATE[add.opt_state] == "value":  # the fp32 master copy
            return self.param(add.what).float().contiguous()
        return torch.zeros(add.shape, dtype=torch.float32)  # fresh Adam moments


def values_for(adds: Iterable[Add], target: HybridConfig, init: str = "exact") -> dict[str, Tensor]:
    """Destination key -> value for every add (model values and optimizer states)."""
    values = NewValues(target, init)
    return {a.dst: values(a) for a in adds}
