"""Which target an enable writes for (``mhc_model.targets``): named by ``--target``, else
proven from the source (Megatron args -> its branch; a native checkpoint -> native). The
target fixes the convention and contract unless the user names a compatible one, and the
dtype the new mHC parameters are stored in."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from mhc_convert.errors import InvalidInputError, UsageError
from mhc_model.config import HybridConfig
from mhc_model.conventions import convention as convention_record
from mhc_model.conventions import mhc_params_dtype
from mhc_model.hyper_connection import pre_bias_value
from mhc_model.targets import TARGETS, Target, check_pattern_for, target_of_args


@dataclass(frozen=True)
class Choice:
    target: Target
    cfg: HybridConfig  # the mHC-on config to write
    param_dtype: torch.dtype  # dtype of the new mHC model parameters
    notes: tuple[str, ...]


def choose(cfg: HybridConfig, args: Any, *, name: str | None, streams: int,
           convention: str | None, contract: str | None, path) -> Choice:
    notes: list[str] = []
    if name is not None:
        if name not in TARGETS:
            raise UsageError(f"--target must be one of {', '.join(TARGETS)}, got {name!r}")
        tgt = TARGETS[name]
    elif args is None:
        tgt = TARGETS["native"]
    else:
        try:
            tgt = target_of_args(args)
        except ValueError as e:
            raise InvalidInputError(str(e), path=path, key="args") from None
        why = (f"its args carry Megatron {tgt.branch}-only fields" if tgt.branch else
               "its args name no Megatron branch with the hybrid mHC wrapper (dev, dsv4)")
        notes.append(f"target {tgt.name}: {why}; pass --target to choose another")
    if tgt.branch is not None and convention not in (None, tgt.convention):
        raise UsageError(f"--target {tgt.name} computes the {tgt.convention} convention; "
                         f"--convention {convention} would not be what Megatron {tgt.branch} "
                         f"runs (use --target native for it)")
    if contract is not None and contract not in tgt.contracts:
        raise UsageError(f"--target {tgt.name} always builds decoder.hc_head_* (the learned "
                         f"contract): a --contract {contract} checkpoint would not load there; "
                         f"use --target native for it")
    if tgt.branch is not None:  # the target branch's own pattern grammar (mhc_model.dialects)
        try:
            check_pattern_for(cfg.hybrid_layer_pattern, tgt.branch)
        except ValueError as e:
            err = UsageError if name is not None else InvalidInputError
            raise err(f"--target {tgt.name}: {e}", **({} if name is not None else
                                                      {"path": path, "key": "args"})) from None
    refused = sorted(set(cfg.layer_symbols) & set(tgt.unsupported_with_mhc))
    if refused:
        notes.append(f"Megatron {tgt.branch} will not load this mHC-on checkpoint: "
                     f"{tgt.unsupported_reason} (pattern symbols {', '.join(refused)}); "
                     f"mhc_model loads and trains it")
    try:
        out = cfg.with_mhc(enable_hyper_connections=True, num_residual_streams=streams,
                           mhc_convention=convention or tgt.convention,
                           mhc_output_contract=contract or tgt.contract)
    except ValueError as e:  # an option the config refuses (MHCConfig.validate)
        raise UsageError(str(e)) from None
    dtype = getattr(torch, mhc_params_dtype(out.mhc.mhc_convention, out.params_dtype))
    if dtype != torch.float32:
        exact = pre_bias_value(out.mhc)
        held = torch.tensor(exact, dtype=torch.float32).to(dtype).item()
        n, eps = streams, out.mhc.mhc_eps if convention_record(out.mhc.mhc_convention).h_pre_eps \
            else 0.0
        total = n * (torch.sigmoid(torch.tensor(held, dtype=torch.float64)).item() + eps)
        notes.append(f"mHC parameters stored in {str(dtype).replace('torch.', '')} as "
                     f"{tgt.name} keeps them: bias_pre logit(1/n) = {exact:.6f} is held as "
                     f"{held:.6f}, so sum H_pre = {total:.6f} instead of 1 (absorbed by the "
                     f"scale-invariant pre-norms); `mhc-convert verify` measures the parity")
    return Choice(tgt, out, dtype, tuple(notes))
