"""In-process mHC toggle: ``HybridModel.load_state_dict`` accepts either layout (DESIGN.md §3, §4).

A load pre-hook, registered by ``HybridModel.__init__``, rewrites the incoming state dict into the
model's own layout before any submodule reads it, by applying the toggle plan
(``mhc_model.toggle``) the converter applies too:

* mHC-off source -> mHC-on model: ``decoder.layers.N.X`` -> ``decoder.layers.N.inner_layer.X``
  and every hyper-connection parameter (and the learned head) is filled with the exact,
  function-preserving init (``toggle.values``: the values ``mhc-convert enable`` writes, so
  both toggle routes give bit-identical models).
* mHC-on source -> mHC-off model: allowed only where dropping the hyper-connections is exact
  (``toggle.verdict``, the rule of DESIGN.md §4); otherwise ``ToggleError``.

Fills happen only for a real layout change (source has no wrapped key at all), so ``strict=True``
still reports a genuinely missing or unexpected key of either layout.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from mhc_model.config import HybridConfig
from mhc_model.errors import ToggleError
from mhc_model.toggle import codec as K
from mhc_model.toggle.plan import plan_for_model
from mhc_model.toggle.values import reshape_values, values_for
from mhc_model.toggle.verdict import check_disable_exact, check_mtp_norms, mtp_norm_keys

__all__ = ["ToggleError", "carried_and_new", "register_layout_shim", "source_is_on"]


def source_is_on(keys: Iterable[str], prefix: str = "") -> bool | None:
    """Layout of a set of model keys: True (wrapped), False (plain), None (no layer keys)."""
    return K.layout_of(keys, prefix)


def _pre_hook(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict,
              strict: bool, missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
    """Rewrite ``state_dict`` (torch passes a shallow copy, so the caller's dict is untouched)
    into the layout of ``module.config``."""
    cfg: HybridConfig = module.config
    mine = {k[len(prefix):]: k for k in state_dict if k.startswith(prefix)}
    for rel, k in mine.items():  # Megatron's other spellings (LayerSpec.aliases) -> ours
        if K.canonical_key(cfg, rel) != rel:
            state_dict[prefix + K.canonical_key(cfg, rel)] = state_dict.pop(k)
    mine = {K.canonical_key(cfg, rel): prefix + K.canonical_key(cfg, rel) for rel in mine}
    plan = plan_for_model({rel: None for rel in mine}, cfg)
    if plan is None:
        return
    norms = {k: state_dict[mine[k]] for k in mtp_norm_keys(cfg) if k in mine}
    if plan.drops:  # disable: only at a point where the streams provably stay identical
        check_disable_exact(cfg, {src: state_dict[mine[src]] for src in plan.model_drops()},
                            norms)
    elif cfg.mtp_num_depths and len(norms) == len(mtp_norm_keys(cfg)):
        why = check_mtp_norms(cfg, norms)
        if why:  # the in-process enable is the exact one, or none
            raise ToggleError(f"cannot load an mHC-off state dict into this mHC-on model "
                              f"exactly: {why}")
    values = {r.src: state_dict.pop(mine[r.src]) for r in plan.renames}
    reshaped: dict[str, torch.Tensor] = {}
    for rs in plan.reshapes:
        reshaped.update(reshape_values(rs, [state_dict.pop(mine[s]) for s in rs.srcs]))
    for d in plan.drops:
        del state_dict[mine[d.src]]
    for r in plan.renames:
        state_dict[prefix + r.dst] = values[r.src]
    state_dict.update({prefix + k: v for k, v in reshaped.items()})
    for dst, value in values_for(plan.adds, cfg).items():
        state_dict.setdefault(prefix + dst, value)


def register_layout_shim(model: nn.Module) -> None:
    """Called from ``HybridModel.__init__``; ``model.config`` decides the target layout."""
    model.register_load_state_dict_pre_hook(_pre_hook)


@torch.no_grad()
def carried_and_new(model: nn.Module, ckpt_keys: Iterable[str]) -> tuple[dict[str, str], list[str]]:
    """For each model parameter, its key in a checkpoint holding ``ckpt_keys`` (model space),
    or, for the mHC parameters a toggle-on adds, membership in the ``new`` list."""
    keys = list(ckpt_keys)
    plan = plan_for_model(dict.fromkeys(keys), model.config)
    source_of = {r.dst: r.src for r in plan.renames} if plan else {k: k for k in keys}
    added = {a.dst for a in plan.adds} if plan else set()
    reshaped = {d for r in plan.reshapes for d in r.dsts} if plan else set()
    carried, new = {}, []
    for name, _ in model.named_parameters():
        if name in reshaped:  # a new tensor made from old ones: no one key holds its state
            raise ToggleError(f"{name} is made from other checkpoint tensors when toggling "
                              f"mHC (MTP input projection); toggle the checkpoint with "
                              f"mhc-convert first")
        if name in source_of:
            carried[name] = source_of[name]
        elif name in added:
            new.append(name)
        else:
            raise KeyError(f"checkpoint has no value for parameter {name!r}")
    return carried, new
