"""When is dropping the hyper-connections exact? (DESIGN.md §4)

Streams that start identical stay identical, and each equals the mHC-off residual, when at every
layer: all alpha = 0 (no token-dependent mapping), H_post is one constant c for all streams, and
the mixing matrix gives every stream gain 1 (``conventions.stream_gain``: column sums of H_res
where the mix applies H^T, row sums otherwise). The aggregate's scale sum_j H_pre[j] is absorbed
by the layer's scale-invariant pre-norm, and the learned head's (with hc_head_scale = 0) by
the final norm.
A constant H_post = c != 1 is not a pure rename: it folds into the layer's output
projections (y = F(u) is linear in them), W <- c W. ``Verdict.folds`` lists those layers; the
fold is exact to the rounding of c W in the params dtype. Adam's moments cannot follow a
rescaled weight exactly (its update is scale-free), so the engine refuses optimizer state then.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from mhc_model import mhc_ref
from mhc_model.config import HybridConfig
from mhc_model.conventions import convention, stream_gain
from mhc_model.errors import ToggleError
from mhc_model.toggle.codec import hc_key, is_head_key, mhc_param_id
from mhc_model.toggle.shapes import hc_keys

GAIN_TOL = 1e-5  # |stream gain - 1|; Sinkhorn's +eps makes it ~1e-6 below 1 at the exact point
POST_TOL = 1e-6


@dataclass
class Verdict:
    """``exact``: a pure rename is exact. ``folds``: layer -> constant H_post that must be
    folded into the output projections (then exact up to that rounding); empty when none."""

    exact: bool
    reason: str = ""
    notes: list[str] = field(default_factory=list)
    folds: dict[int, float] = field(default_factory=dict)

    @property
    def exact_with_folds(self) -> bool:
        return not self.reason


def mtp_norm_keys(cfg: HybridConfig) -> list[str]:
    """The norms that stand between MTP inputs with mHC off and not with mHC on
    (``mhc_model.mtp``): the decoder's final norm (before depth 0) and each depth's
    ``final_layernorm`` but the last's (before the next depth). None without MTP."""
    if not cfg.mtp_num_depths:
        return []
    return ["decoder.final_norm.weight"] + [f"mtp.layers.{d}.final_layernorm.weight"
                                            for d in range(cfg.mtp_num_depths - 1)]


def check_mtp_norms(cfg: HybridConfig, norms: Mapping[str, Tensor]) -> str | None:
    """Why toggling mHC changes the MTP logits, or None when it does not. With mHC off an MTP
    depth reads ``hnorm(g * x / rms(x))``, with mHC on ``hnorm(x)`` (g: the weight of the norm
    before it): equal for every token iff g is one positive constant (RMSNorm is
    scale-invariant, up to its eps); no weight change can absorb a non-uniform g, whose effect
    depends on each token. The main logits are unaffected either way."""
    bad = []
    for key in mtp_norm_keys(cfg):
        g = norms[key].float()
        if not (bool((g == g[0]).all()) and g[0].item() > 0):
            bad.append(f"{key} (min {g.min().item():.4g}, max {g.max().item():.4g})")
    if not bad:
        return None
    return (f"MTP logits change: Megatron's mHC-on MTP reads the streams before the norm(s) "
            f"{', '.join(bad)} that its mHC-off MTP reads after, and they are not one positive "
            f"constant (the main logits are preserved)")


def check_disable(cfg: HybridConfig, values: dict[tuple[str, int | None, str], Tensor],
                  norms: Mapping[str, Tensor] | None = None) -> Verdict:
    """``norms``: the ``mtp_norm_keys`` weights (required with MTP)."""
    n = cfg.mhc.num_residual_streams
    conv = convention(cfg.mhc.mhc_convention)
    problems: list[str] = []
    notes: list[str] = []
    pre_sums = []
    folds: dict[int, float] = {}
    for i in range(len(cfg.site_symbols)):
        alphas = [values[("hc", i, f"alpha_{g}")].float() for g in ("pre", "post", "res")]
        if any(a.abs().max().item() != 0.0 for a in alphas):
            problems.append(f"layer {i}: alpha != 0 (token-dependent mappings)")
            continue
        bias = values[("hc", i, "bias")].float()
        h_pre = torch.sigmoid(bias[:n]) + (cfg.mhc.mhc_eps if conv.h_pre_eps else 0.0)
        pre_sums.append(h_pre.sum().item())
        h_post = 2 * torch.sigmoid(bias[n:2 * n])
        if (h_post - h_post[0]).abs().max().item() > POST_TOL:
            problems.append(f"layer {i}: H_post = {h_post.tolist()} differs between streams")
        elif (h_post[0] - 1).abs().item() > POST_TOL:
            folds[i] = h_post[0].item()
        H = mhc_ref.sinkhorn(bias[2 * n:].reshape(1, n, n), cfg.mhc.mhc_sinkhorn_iterations,
                             cfg.mhc.mhc_convention, cfg.mhc.mhc_eps)[0]
        gain = stream_gain(conv, H)
        if (gain - 1).abs().max().item() > GAIN_TOL:
            problems.append(f"layer {i}: stream gains {gain.tolist()} are not 1")
    if cfg.mhc.mhc_output_contract == "learned":
        for depth in (None, *range(cfg.mtp_num_depths)):
            scale = values[("head", depth, "hc_head_scale")].float()
            if scale.abs().max().item() != 0.0:
                where = "" if depth is None else f" of MTP depth {depth}"
                problems.append(f"hc_head_scale{where} != 0 (token-dependent output contract)")
    mtp = check_mtp_norms(cfg, norms or {}) if cfg.mtp_num_depths else None
    if mtp:
        problems.append(mtp)
    if pre_sums:
        notes.append(f"sum H_pre in [{min(pre_sums):.6f}, {max(pre_sums):.6f}] (absorbed by the "
                     f"pre-norms)")
    if problems:
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        return Verdict(False, "; ".join(problems[:3]) + more, notes)
    if folds:
        notes.append(f"H_post folded into the output projections of {len(folds)} layer(s) "
                     f"(c in [{min(folds.values()):.6f}, {max(folds.values()):.6f}])")
    return Verdict(not folds, "", notes, folds)


def source_config(cfg: HybridConfig, values: Mapping[str, Tensor]) -> HybridConfig:
    """The mHC-on config a set of mHC tensors (model keys) belongs to, for an mHC-off ``cfg``:
    the stream count and contract are read off the tensors; the convention and Sinkhorn
    settings are not in a state dict, so they come from ``cfg.mhc``."""
    k = values[hc_key(0, "bias")].numel()  # bias has n^2 + 2n entries
    n = round(math.sqrt(k + 1) - 1)
    learned = any(is_head_key(key) for key in values)
    return cfg.with_mhc(enable_hyper_connections=True, num_residual_streams=n,
                        mhc_output_contract="learned" if learned else "mean")


def check_disable_exact(cfg: HybridConfig, values: Mapping[str, Tensor],
                        norms: Mapping[str, Tensor] | None = None) -> list[str]:
    """Raise ``ToggleError`` unless dropping these mHC parameters (model keys, e.g.
    ``decoder.layers.3.hyper_connection.bias``) from a model with ``cfg``'s architecture is a
    pure, exact drop (the in-process routes cannot fold H_post). Returns the verdict's notes."""
    need = [k for i in range(len(cfg.site_symbols)) for k in hc_keys(i, cfg)]
    missing = [k for k in need if k not in values]
    if missing:
        raise ToggleError(f"mHC-on state dict lacks hyper-connection parameters {missing[:3]}; "
                          "cannot decide whether disabling mHC is exact")
    src = source_config(cfg, values)
    verdict = check_disable(src, {mhc_param_id(k, src): v for k, v in values.items()}, norms)
    if not verdict.exact:
        reason = verdict.reason or ("a constant H_post != 1 must be folded into the output "
                                    "projections: `mhc-convert disable` does that offline")
        raise ToggleError(
            f"cannot load mHC parameters into an mHC-off model: disabling is not exact here "
            f"({reason}). Keep mHC on, or drop them with a measured parity loss via "
            f"`mhc-convert disable --allow-lossy`")
    return verdict.notes
