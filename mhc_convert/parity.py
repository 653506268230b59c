"""Forward parity: load any supported checkpoint into a ``HybridModel`` (merging Megatron's
factory splits) and compare two checkpoints' logits on the same tokens (``mhc-convert verify``).

The verdict is honest about precision: A and B run in the same dtype, and in bf16 B may differ
from A only as much as bf16 itself moves A (the noise floor: A in fp32 against A in bf16)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mhc_convert.adapters import ReadOptions, detect
from mhc_convert.errors import InvalidInputError, UsageError
from mhc_convert.inputs import check_device, existing
from mhc_convert.view import CheckpointView
from mhc_model.config import HybridConfig
from mhc_model.model import HybridModel, meta_model
from mhc_model.toggle import codec as K

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
FP32_LIMITS = {"max_abs": 1e-4, "top1_agreement": 1.0}
BF16_FACTOR = 2.0


def model_state_from_view(view: CheckpointView, cfg: HybridConfig) -> dict[str, torch.Tensor]:
    """Model tensors only (no optimizer, _extra_state or Megatron byte objects), under our
    names (``codec.model_sources``): factory splits concatenated back in Megatron's order,
    stacked experts unstacked, Megatron's other spellings made ours."""
    keys = [k for k, e in view.entries.items()
            if e.kind == "tensor" and not k.startswith("optimizer.") and not K.is_extra_state(k)
            and not K.MEGATRON_OPAQUE_RE.match(k)]
    for key, parts in K.merge_splits(keys, cfg).items():
        base, _, part = key.rpartition(".")
        found = K.layer_splits(cfg, base) if len(parts) == 1 else None
        if found is not None and part in dict(found[1]):
            have = sorted(k.rpartition(".")[2] for k in keys if k.rpartition(".")[0] == base)
            raise InvalidInputError(f"incomplete factory split: have {have}, need "
                                    f"{[p for p, _ in found[1]]}", path=view.path, key=base)
    try:
        sources = K.model_sources(keys, cfg)
    except InvalidInputError as e:
        raise type(e)(e.message, path=view.path, key=e.key) from None
    stacks: dict[str, torch.Tensor] = {}
    state: dict[str, torch.Tensor] = {}
    for name, src in sources.items():
        if src.index is not None:  # one row of a stacked tensor (loaded once)
            if src.parts[0] not in stacks:
                stacks[src.parts[0]] = view.load(src.parts[0])
            state[name] = stacks[src.parts[0]][src.index].clone()
        elif len(src.parts) == 1:
            state[name] = view.load(src.parts[0])
        else:
            state[name] = torch.cat([view.load(p) for p in src.parts], dim=0)
    return state


def load_model(path: str | Path, *, device: str = "cpu", dtype: str | None = None) -> HybridModel:
    """Build the model the checkpoint's config describes and load it strictly."""
    path = Path(path)
    adapter = detect(path)
    view = adapter.read(path, options=ReadOptions())
    cfg = adapter.config(view)
    if dtype is not None:
        cfg = cfg.replace(params_dtype={"fp32": "float32", "bf16": "bfloat16"}[dtype])
    try:
        model = meta_model(cfg)
    except InvalidInputError as e:  # unallocatable sizes: name the checkpoint
        raise type(e)(e.message, path=path, key=e.key) from None
    state = model_state_from_view(view, cfg)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise InvalidInputError(f"checkpoint does not match its config: missing {missing[:3]}, "
                                f"unexpected {unexpected[:3]}", path=path)
    # cast to each parameter's own dtype (mHC parameters are fp32 in every params dtype)
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True,
                          assign=True)
    return model.to(device).eval()


def load_config(path: str | Path) -> HybridConfig:
    """The config a checkpoint describes (headers and small files only)."""
    adapter = detect(Path(path))
    return adapter.config(adapter.read(Path(path), options=ReadOptions()))


def logit_metrics(ref: torch.Tensor, out: torch.Tensor) -> dict[str, float]:
    """How far ``out`` logits are from ``ref`` logits ([B, S, V]), computed in fp64. KL(ref||out)
    is >= 0 in exact arithmetic; a rounding residue below zero is reported as 0."""
    ref, out = ref.double(), out.double()
    diff = (ref - out).abs()
    logp, logq = ref.log_softmax(-1), out.log_softmax(-1)
    kl = (logp.exp() * (logp - logq)).sum(-1).mean().item()
    return {"max_abs": diff.max().item(), "mean_abs": diff.mean().item(), "kl": max(kl, 0.0),
            "top1_agreement": (ref.argmax(-1) == out.argmax(-1)).double().mean().item()}


def thresholds(dtype: str, floor: dict[str, float] | None) -> dict[str, float]:
    """fp32: fixed (the conversion is exact up to fp32 reassociation). bf16: relative to the
    source's own bf16-vs-fp32 noise floor: two independent bf16 roundings may each move the
    logits that far, so amplitudes may reach ``BF16_FACTOR`` x the floor and KL (quadratic in
    the amplitude) ``BF16_FACTOR**2`` x; never below the fp32 limits. Top-1 agreement is
    reported, not gated, in bf16: near-ties flip under bf16 rounding alone."""
    if dtype == "fp32" or floor is None:
        return dict(FP32_LIMITS)
    f = BF16_FACTOR
    return {"max_abs": max(f * floor["max_abs"], FP32_LIMITS["max_abs"]),
            "mean_abs": max(f * floor["mean_abs"], FP32_LIMITS["max_abs"] / 10),
            "kl": max(f * f * floor["kl"], 1e-9)}


def passes(metrics: dict[str, float], limits: dict[str, float]) -> bool:
    return all(metrics[k] >= v if k == "top1_agreement" else metrics[k] <= v
               for k, v in limits.items())


@torch.no_grad()
def compare_checkpoints(a: str | Path, b: str | Path, *, device: str = "cpu", dtype: str = "fp32",
                        batch: int = 2, seq: int = 64, seed: int = 0, noise_floor: bool = True,
                        status: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the same random tokens through A (the source) and B (the conversion), both in
    ``dtype``, and compare B's logits with A's. ``noise_floor`` also runs A in the other
    precision: the source's own bf16-vs-fp32 difference, which the bf16 verdict is measured
    against (a bf16 comparison is never held to an fp32 standard). The models are loaded one
    at a time, so the peak memory is one model. Returns the metrics, ``noise_floor``,
    ``thresholds`` and ``ok``; ``status`` is told each step (a spinner)."""
    t0 = time.perf_counter()
    if dtype not in DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if batch < 1 or seq < 1:
        raise UsageError(f"--batch and --seq must be positive, got {batch} and {seq}")
    a, b = existing(a), existing(b)
    check_device(device)
    step = status or (lambda _: None)
    cfg_a, cfg_b = load_config(a), load_config(b)
    if cfg_a.vocab_size != cfg_b.vocab_size:
        raise InvalidInputError(f"vocab sizes differ: {cfg_a.vocab_size} in {a}, "
                                f"{cfg_b.vocab_size} here", path=b)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg_a.vocab_size, (batch, seq), generator=g).to(device)

    def logits(path: Path, dt: str) -> torch.Tensor:
        step(f"loading {path} ({dt}, {device})")
        model = load_model(path, device=device, dtype=dt)
        step(f"forward pass of {path} ({dt}, {batch}x{seq} tokens)")
        out = model(ids).double()
        del model
        return out

    la = logits(a, dtype)
    res: dict[str, Any] = logit_metrics(la, logits(b, dtype))
    floor = None
    if noise_floor or dtype != "fp32":
        other = logits(a, "bf16" if dtype == "fp32" else "fp32")
        floor = logit_metrics(la, other) if dtype == "fp32" else logit_metrics(other, la)
    limits = thresholds(dtype, floor)
    return {**res, "ok": passes(res, limits), "thresholds": limits, "noise_floor": floor,
            "seconds": time.perf_counter() - t0, "device": device, "dtype": dtype,
            "batch": batch, "seq": seq, "seed": seed}
