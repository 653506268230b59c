"""The activation-memory floor of an mHC stack: the plain stack's measured peak plus the bytes
mHC must keep for backward, counted per token (DESIGN.md section 7, issue 16 item 2).

What the plain pre-norm stack keeps per layer (its norm's fp32 copy of the input, the branch's
own saved tensors) is the same with mHC, whose branch input u = H_pre x is not saved either (the
norm keeps its fp32 copy, as in the plain stack); so the floor adds only what mHC needs:

  streams   the n-stream input x_l of every site, n*C (bf16): the coefficient, aggregate and
            mix backward all read it.  With block recompute (``mhc_recompute_layer_num`` L_r):
            the block inputs, ceil(L / L_r) of them, plus the L_r - 1 streams of the one block
            whose chain is recomputed at the backward's peak.
  y         the branch output of every site, C (bf16): dH_post = sum_c g y needs it, and the
            plain stack keeps none (its residual add saves nothing).
  mappings  H_pre, H_post, H_res (N^2 + 2N fp32) and, unless recomputed, the K + 1 projection
            lanes (the coefficients + sum of squares) the gate / Sinkhorn backward restarts from.
  params    the mHC parameters' gradients (fp32), per layer K * n * C + K + 3 values.

Not in the floor, printed beside it: the stream gradient in backward is n*C where the plain
stack's is C, (n - 1) C more at any moment (whether that moment is the peak depends on the
branch's own transients, so it is not counted as kept).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

GIB = 2**30


@dataclass(frozen=True)
class Floor:
    plain_gib: float
    terms: dict[str, float]  # bytes over the whole run (all tokens, all layers)
    per_token: dict[str, float]  # bytes per token, for the note
    transient: float  # (n - 1) C stream-gradient bytes over all tokens, not in the floor

    @property
    def total_gib(self) -> float:
        return self.plain_gib + sum(self.terms.values()) / GIB

    def describe(self) -> str:
        parts = ", ".join(f"{k} {v / GIB:.3f}" + (f" ({self.per_token[k]:.0f} B/token)"
                                                  if self.per_token[k] else "")
                          for k, v in self.terms.items())
        return (f"floor {self.total_gib:.2f} GiB = plain {self.plain_gib:.2f} + {parts} (GiB); "
                f"not counted: stream-gradient transient {self.transient / GIB:.3f} GiB")


def floor(cfg, n: int, tokens: int, plain_gib: float, recompute: int | None) -> Floor:
    L, C = cfg.num_layers, cfg.hidden_size
    K = n * n + 2 * n
    if recompute is None:
        kept = L
        mappings = L * (K + K + 1) * 4
    else:
        kept = math.ceil(L / recompute) + recompute - 1
        mappings = L * (n * n + n) * 4  # H_res, H_post kept by the mix; the rest recomputed
    per_token = {
        "streams": kept * n * C * 2,
        "y": L * C * 2,
        "mappings": mappings,
    }
    terms = {k: v * tokens for k, v in per_token.items()}
    terms["params"] = L * (K * n * C + K + 3) * 4
    per_token["params"] = 0.0
    return Floor(plain_gib, terms, per_token, (n - 1) * C * 2 * tokens)
