"""Forward parity: load any supported checkpoint into a ``HybridModel`` (merging Megatron's
factory splits) and compare two checkpoints' logits on the same tokens (``mhc-convert verify``)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from mhc_convert import layout as L
from mhc_convert.adapters import adapter_for, detect_format
from mhc_convert.errors import InvalidInputError
from mhc_convert.view import CheckpointView
from mhc_model.config import HybridConfig
from mhc_model.model import HybridModel, meta_model

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def model_state_from_view(view: CheckpointView, cfg: HybridConfig) -> dict[str, torch.Tensor]:
    """Model tensors only (no optimizer, _extra_state or Megatron byte objects), with factory
    splits concatenated back in Megatron's order."""
    state: dict[str, torch.Tensor] = {}
    split_parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, entry in view.entries.items():
        if entry.kind != "tensor" or key.startswith("optimizer.") or L.EXTRA_STATE in key:
            continue
        if L.MEGATRON_OPAQUE_RE.match(key):
            continue
        m = L.LAYER_RE.match(key)
        if m:
            i = int(m.group(1))
            rel = m.group(2)
            wrapper = ""
            if rel.startswith(L.INNER + "."):
                wrapper, rel = L.INNER + ".", rel[len(L.INNER) + 1:]
            base, _, part = rel.rpartition(".")
            splits = (L.split_table(cfg, cfg.layer_symbols[i]).get(base)
                      if i < cfg.num_layers else None)
            if splits and part in dict(splits):
                full = f"decoder.layers.{i}.{wrapper}{base}"
                split_parts.setdefault(full, {})[part] = view.load(key)
                continue
            key = f"decoder.layers.{i}.{wrapper}{L.canonical(rel)}"  # e.g. conv1d_weight
        state[key] = view.load(entry.key)
    for full, parts in split_parts.items():
        i = int(L.LAYER_RE.match(full).group(1))
        base = full.split(".", 3)[3].removeprefix(L.INNER + ".")
        order = [p for p, _ in L.split_table(cfg, cfg.layer_symbols[i])[base]]
        if set(parts) != set(order):
            raise InvalidInputError(f"incomplete factory split: have {sorted(parts)}, need {order}",
                                    path=view.path, key=full)
        state[full] = torch.cat([parts[p] for p in order], dim=0)
    return state


def load_model(path: str | Path, *, device: str = "cpu", dtype: str | None = None) -> HybridModel:
    """Build the model the checkpoint's config describes and load it strictly."""
    path = Path(path)
    adapter = adapter_for(detect_format(path))
    view = adapter.read(path)
    cfg = adapter.config(view)
    if dtype is not None:
        cfg = cfg.replace(params_dtype={"fp32": "float32", "bf16": "bfloat16"}[dtype])
    model = meta_model(cfg)
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
