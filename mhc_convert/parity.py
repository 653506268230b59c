"""Forward parity: load any supported checkpoint into a ``HybridModel`` (merging Megatron's
factory splits) and compare two checkpoints' logits on the same tokens (``mhc-convert verify``)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from mhc_convert.adapters import ReadOptions, detect
from mhc_convert.errors import InvalidInputError
from mhc_convert.view import CheckpointView
from mhc_model.config import HybridConfig
from mhc_model.model import HybridModel, meta_model
from mhc_model.toggle import codec as K

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


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


@torch.no_grad()
def compare_checkpoints(a: str | Path, b: str | Path, *, device: str = "cpu", dtype: str = "fp32",
                        batch: int = 2, seq: int = 64, seed: int = 0) -> dict[str, Any]:
    t0 = time.perf_counter()
    ma = load_model(a, device=device, dtype=dtype)
    mb = load_model(b, device=device, dtype=dtype)
    if ma.config.vocab_size != mb.config.vocab_size:
        raise InvalidInputError("vocab sizes differ", path=b)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, ma.config.vocab_size, (batch, seq), generator=g).to(device)
    la, lb = ma(ids).float(), mb(ids).float()
    diff = (la - lb).abs()
    logp_a, logp_b = la.log_softmax(-1), lb.log_softmax(-1)
    kl = (logp_a.exp() * (logp_a - logp_b)).sum(-1).mean().item()
    top1 = (la.argmax(-1) == lb.argmax(-1)).float().mean().item()
    return {"max_abs": diff.max().item(), "mean_abs": diff.mean().item(), "kl": kl,
            "top1_agreement": top1, "seconds": time.perf_counter() - t0,
            "device": device, "dtype": dtype, "batch": batch, "seq": seq, "seed": seed}
