"""The values of the parameters an enable adds (DESIGN.md §4, §5): one function for the
converter and both in-process routes, so every route writes the same bits.

A layer's init tensors are drawn once (``exact_hc_tensors`` is seeded by the layer index) and
shared by its model key and its ``fp32_param``; Adam moments start at zero. mHC parameters are
fp32 whatever the params dtype (see ``HybridLayer``).
"""

from __future__ import annotations

import io
from collections.abc import Iterable

import torch
from torch import Tensor

from mhc_model.config import HybridConfig
from mhc_model.errors import InvalidInputError
from mhc_model.hyper_connection import exact_hc_tensors, exact_head_tensors
from mhc_model.toggle import codec as K
from mhc_model.toggle.plan import NEW_PARAM_OPT_STATE, Add, ParamId, Reshape


class NewValues:
    """``values(add)`` -> the tensor for one planned ``Add`` of ``target``'s mHC parameters.
    ``param_dtype``: the dtype of the model values (fp32 in ``mhc_model``; a target that keeps
    mHC parameters in the params dtype gets them rounded); optimizer states are fp32."""

    def __init__(self, target: HybridConfig, init: str = "exact",
                 param_dtype: torch.dtype = torch.float32):
        self.target, self.init, self.param_dtype = target, init, param_dtype
        self._drawn: dict[tuple[str, int | None], dict[str, Tensor]] = {}

    def param(self, what: ParamId) -> Tensor:
        kind, layer, name = what  # layer: the site, or for a head its MTP depth (None: decoder)
        if (kind, layer) not in self._drawn:
            self._drawn[kind, layer] = (
                exact_hc_tensors(self.target, layer, init=self.init) if kind == "hc"
                else exact_head_tensors(self.target, layer))
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


def reshape_values(reshape: Reshape, srcs: list[Tensor]) -> dict[str, Tensor]:
    """The planned ``Reshape`` on its source tensors (in ``reshape.srcs`` order): eh_proj's
    columns [:C] are e_proj (they multiply enorm(e), the first half of the concatenation in
    Megatron's ``_concat_embeddings``), [C:] h_proj; disable concatenates them back. Copies of
    the same bits, so enable then disable is bitwise the identity.
    A linear's ``_extra_state`` (``extra_state_sources``) is copied, not split."""
    if K.is_extra_state(reshape.srcs[0]):
        return {d: srcs[reshape.srcs.index(s)] for d, s in
                extra_state_sources(reshape, srcs).items()}
    if len(srcs) == 1:  # enable: [C, 2C] -> two [C, C]
        (w,) = srcs
        C = w.shape[0]
        if w.shape != (C, 2 * C):
            raise ValueError(f"{reshape.srcs[0]}: shape {list(w.shape)} is not [C, 2C]")
        return {reshape.dsts[0]: w[:, :C].contiguous(), reshape.dsts[1]: w[:, C:].contiguous()}
    e, h = srcs
    if e.shape != h.shape or e.dtype != h.dtype:
        raise ValueError(f"{reshape.srcs[0]} and {reshape.srcs[1]} differ in shape or dtype")
    return {reshape.dsts[0]: torch.cat((e, h), dim=1).contiguous()}


def extra_state_sources(reshape: Reshape, srcs: list[object]) -> dict[str, str]:
    """Destination -> the source key whose stored object it copies, for the ``_extra_state``
    of an MTP input projection's linears (Megatron's local linears: the same empty state, a
    torch_dist byte object or a legacy ``None``, in eh_proj, e_proj and h_proj of its own
    saves): enable copies eh_proj's to both halves; disable keeps e_proj's, only when h_proj
    holds the same (else one eh_proj could not stand for both)."""
    if len(srcs) == 1:
        return {d: reshape.srcs[0] for d in reshape.dsts}
    if not _same_object(*srcs):
        raise InvalidInputError(f"{reshape.srcs[1]} differs from {reshape.srcs[0]}: one "
                                f"{reshape.dsts[0]} cannot hold both", key=reshape.srcs[1])
    return {reshape.dsts[0]: reshape.srcs[0]}


def _same_object(a: object, b: object) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return (isinstance(a, Tensor) and isinstance(b, Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and torch.equal(a, b))
    if isinstance(a, io.BytesIO) and isinstance(b, io.BytesIO):
        return a.getvalue() == b.getvalue()
    return type(a) is type(b) and a == b
