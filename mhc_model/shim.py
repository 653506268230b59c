"""In-process mHC toggle: ``HybridModel.load_state_dict`` accepts either layout (DESIGN.md §3, §4).

A load pre-hook, registered by ``HybridModel.__init__``, rewrites the incoming state dict into the
model's own layout before any submodule reads it:

* mHC-off source -> mHC-on model: ``decoder.layers.N.X`` -> ``decoder.layers.N.inner_layer.X``
  and every hyper-connection parameter (and the learned head) is filled with the exact,
  function-preserving init (``exact_hc_tensors``/``exact_head_tensors``, the same values
  ``mhc-convert enable`` writes, so both toggle routes give bit-identical models).
* mHC-on source -> mHC-off model: allowed only where dropping the hyper-connections is exact
  (``mhc_convert.exactness.check_disable``, the rule of DESIGN.md §4); otherwise ``ToggleError``.

Fills happen only for a real layout change (source has no wrapped key at all), so ``strict=True``
still reports a genuinely missing or unexpected key of either layout.
The same helpers map optimizer state by name for the trainer and the sharded loader.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

from mhc_model.config import HybridConfig
from mhc_model.hyper_connection import exact_hc_tensors, exact_head_tensors
from mhc_model.megatron_keys import (
    HC,
    HEAD_PREFIX,
    INNER,
    LAYER_RE,
    canonical,
    is_mhc_param,
    unwrap,
    wrap,
)


class ToggleError(RuntimeError):
    """Loading mHC parameters into an mHC-off model would change what the model computes."""


def source_is_on(keys: Iterable[str], prefix: str = "") -> bool | None:
    """Layout of a set of model keys: True (wrapped), False (plain), None (no layer keys).
    A mixture is an error: no checkpoint of either layout contains both."""
    on = off = False
    for key in keys:
        if not key.startswith(prefix):
            continue
        rel = key[len(prefix):]
        if rel.startswith(HEAD_PREFIX):
            on = True
            continue
        m = LAYER_RE.match(rel)
        if m:
            wrapped = m.group(2).startswith((INNER + ".", HC + "."))
            on, off = on or wrapped, off or not wrapped
    if on and off:
        raise ToggleError("state dict mixes the mHC-on (inner_layer/hyper_connection) and mHC-off "
                          "(plain decoder.layers.N.X) layouts")
    return True if on else (False if off else None)


def source_key(model_key: str, model_on: bool, src_on: bool | None) -> str:
    """Where a model key of this layout lives in a checkpoint of the other (or same) layout."""
    if src_on is None or src_on == model_on:
        return model_key
    return unwrap(model_key) if model_on else wrap(model_key)


def new_parameter_values(cfg: HybridConfig) -> dict[str, Tensor]:
    """Every mHC parameter of an mHC-on model at the exact enable point (fp32), by model key."""
    out: dict[str, Tensor] = {}
    for i in range(cfg.num_layers):
        for name, value in exact_hc_tensors(cfg, i, init="exact").items():
            out[f"decoder.layers.{i}.{HC}.{name}"] = value
    if cfg.mhc.mhc_output_contract == "learned":
        for name, value in exact_head_tensors(cfg).items():
            out["decoder." + name] = value
    return out


def check_disable_exact(cfg: HybridConfig, values: Mapping[str, Tensor]) -> list[str]:
    """Raise ``ToggleError`` unless dropping these mHC parameters (model keys, e.g.
    ``decoder.layers.3.hyper_connection.bias``) from a model with ``cfg``'s architecture is
    exact. ``cfg`` is the mHC-off target; the source's streams and contract are read off the
    tensors, its convention and Sinkhorn settings from ``cfg.mhc`` (they are not in a state
    dict). Returns the verdict's notes."""
    # The rule is owned by the converter; imported here (not at module import) so that the
    # model package keeps importing without mhc_convert.
    from mhc_convert.exactness import check_disable

    by_layer: dict[tuple[str, int | None, str], Tensor] = {}
    for key, value in values.items():
        if key.startswith(HEAD_PREFIX):
            by_layer[("head", None, key[len("decoder."):])] = value
            continue
        m = LAYER_RE.match(key)
        by_layer[("hc", int(m.group(1)), m.group(2)[len(HC) + 1:])] = value
    need = [f"decoder.layers.{i}.{HC}.{n}" for i in range(cfg.num_layers)
            for n in ("mapping_proj.weight", "bias", "alpha_pre", "alpha_post", "alpha_res")]
    missing = [k for k in need if k not in values]
    if missing:
        raise ToggleError(f"mHC-on state dict lacks hyper-connection parameters {missing[:3]}; "
                          "cannot decide whether disabling mHC is exact")
    k = values[need[1]].numel()  # bias has n^2 + 2n entries
    n = round(math.sqrt(k + 1) - 1)
    learned = any(key.startswith(HEAD_PREFIX) for key in values)
    src = cfg.with_mhc(enable_hyper_connections=True, num_residual_streams=n,
                       mhc_output_contract="learned" if learned else "mean")
    verdict = check_disable(src, by_layer)
    if not verdict.exact:
        reason = verdict.reason or ("a constant H_post != 1 must be folded into the output "
                                    "projections: `mhc-convert disable` does that offline")
        raise ToggleError(
            f"cannot load mHC parameters into an mHC-off model: disabling is not exact here "
            f"({reason}). Keep mHC on, or drop them with a measured parity loss via "
            f"`mhc-convert disable --allow-lossy`")
    return verdict.notes


def _canonical_spellings(state_dict: dict, prefix: str) -> None:
    """Megatron's other spellings of a layer key (``mixer.conv1d_weight`` in megatron-core 0.19
    module state dicts) -> our names (``KEY_ALIASES``)."""
    for k in [k for k in state_dict if k.startswith(prefix)]:
        m = LAYER_RE.match(k[len(prefix):])
        if not m:
            continue
        inner = INNER + "." if m.group(2).startswith(INNER + ".") else ""
        suffix = m.group(2)[len(inner):]
        if canonical(suffix) != suffix:
            new = f"{prefix}decoder.layers.{m.group(1)}.{inner}{canonical(suffix)}"
            state_dict[new] = state_dict.pop(k)


def _pre_hook(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict,
              strict: bool, missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
    """Rewrite ``state_dict`` (torch passes a shallow copy, so the caller's dict is untouched)
    into the layout of ``module.config``."""
    cfg: HybridConfig = module.config
    _canonical_spellings(state_dict, prefix)
    src_on = source_is_on(state_dict.keys(), prefix)
    if src_on is None or src_on == cfg.mhc_on:
        return
    keys = [k for k in state_dict if k.startswith(prefix)]
    if cfg.mhc_on:  # enable: rename, then fill the new parameters at the exact point
        for k in keys:
            rel = k[len(prefix):]
            if LAYER_RE.match(rel):
                state_dict[prefix + wrap(rel)] = state_dict.pop(k)
        for rel, value in new_parameter_values(cfg).items():
            state_dict.setdefault(prefix + rel, value)
        return
    # disable: only at a point where the streams provably stay identical
    hc = {k[len(prefix):]: state_dict[k] for k in keys if is_mhc_param(k[len(prefix):])}
    check_disable_exact(cfg, hc)
    for k in keys:
        rel = k[len(prefix):]
        if is_mhc_param(rel):
            del state_dict[k]
        elif LAYER_RE.match(rel):
            state_dict[prefix + unwrap(rel)] = state_dict.pop(k)


def register_layout_shim(model: nn.Module) -> None:
    """Called from ``HybridModel.__init__``; ``model.config`` decides the target layout."""
    model.register_load_state_dict_pre_hook(_pre_hook)


@torch.no_grad()
def carried_and_new(model: nn.Module, ckpt_keys: Iterable[str]) -> tuple[dict[str, str], list[str]]:
    """For each model parameter, its key in a checkpoint holding ``ckpt_keys`` (model space),
    or, for the mHC parameters a toggle-on adds, membership in the ``new`` list."""
    keys = list(ckpt_keys)
    src_on = source_is_on(keys)
    have = set(keys)
    carried, new = {}, []
    for name, _ in model.named_parameters():
        k = source_key(name, model.config.mhc_on, src_on)
        if k in have:
            carried[name] = k
        elif model.config.mhc_on and src_on is False and is_mhc_param(name):
            new.append(name)
        else:
            raise KeyError(f"checkpoint has no value for parameter {name!r} (looked for {k!r})")
    return carried, new
