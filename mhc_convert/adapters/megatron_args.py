"""The one mHC-aware change to Megatron's metadata: the args flags in the common state (or in
every legacy rank file), and reading the model config out of args."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from mhc_convert.errors import InvalidInputError
from mhc_model.config import HybridConfig
from mhc_model.megatron_args import (
    MHC_FLAG_SPELLINGS,
    MHC_META_FIELDS,
    MHC_META_KEY,
    config_from_megatron_args,
    mhc_flag_values,
)
from mhc_model.toggle.codec import head_key


def flip_args(args: Any, target: HybridConfig) -> Any:
    """A copy of Megatron's args with the mHC flags set for ``target``, under every spelling
    the args already use (dsv4/dev first when none is present)."""
    new = copy.copy(args)
    for field, value in mhc_flag_values(target).items():
        names = [n for n in MHC_FLAG_SPELLINGS[field] if hasattr(args, n)]
        if not names and value is None:
            continue  # never invent an unset optional flag (disable(enable(x)) must be x)
        for name in names or [MHC_FLAG_SPELLINGS[field][0]]:
            setattr(new, name, value)
    # Megatron rejects these without mHC (dev transformer_config.py ~2295 and ~2399)
    if not target.mhc_on:
        if getattr(new, "use_fused_mhc", False):
            new.use_fused_mhc = False
        modules = getattr(new, "recompute_modules", None)
        if modules and "mhc" in modules:
            new.recompute_modules = [m for m in modules if m != "mhc"]
    if not target.mhc_on:  # written into args by versions before 0.2; not Megatron fields
        for name in MHC_META_FIELDS:
            if hasattr(new, name):
                delattr(new, name)
    return new


def with_mhc_meta(state: dict, target: HybridConfig) -> dict:
    """A copy of a Megatron common state / legacy rank payload with our mHC metadata (the
    convention and contract Megatron's args cannot hold) set for an mHC-on ``target``, or
    removed for an mHC-off one, so that disable(enable(x)) is x."""
    out = dict(state)
    if target.mhc_on:
        out[MHC_META_KEY] = {name: getattr(target.mhc, name) for name in MHC_META_FIELDS}
    else:
        out.pop(MHC_META_KEY, None)
    return out


def megatron_config(args: Any, where: Path, keys=(), meta: Any = None) -> HybridConfig:
    """The model config Megatron's args (and our metadata beside them) describe. Megatron
    records no output contract; the learned head's keys do."""
    try:
        cfg = config_from_megatron_args(args, meta)
    except (ValueError, TypeError, AttributeError) as e:
        raise InvalidInputError(f"cannot derive the model config from args: {e}", path=where) from e
    if cfg.mhc_on and head_key("hc_head_fn") in keys:
        return cfg.with_mhc(mhc_output_contract="learned")
    return cfg
