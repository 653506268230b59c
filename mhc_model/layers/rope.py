"""Rotary position embedding with Megatron-Core's conventions
(megatron/core/models/common/embeddings/rotary_pos_embedding.py and rope_utils.py).

Megatron builds ``inv_freq = 1 / base^(arange(0, d, 2) / d)``, angles ``pos * inv_freq`` and the
non-interleaved embedding ``cat(angles, angles)``; it rotates with ``rotate_half``:
``x * cos + cat(-x2, x1) * sin`` where ``x1, x2`` are the two halves of the last dim.
MLA additionally passes ``mla_rotary_interleaved=True``, which first reorders the rope slice to
``cat(x[0::2], x[1::2])`` (DeepSeek stores the rope pairs interleaved) and keeps that order.
"""

from __future__ import annotations

import torch
from torch import Tensor


def rope_angles(seq_len: int, dim: int, base: float, device: torch.device | None = None) -> Tensor:
    """Angles ``[S, dim/2]`` (fp32) for positions ``0..S-1``."""
    inv_freq_F = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))
    pos_S = torch.arange(seq_len, dtype=torch.float32, device=device)
    return torch.outer(pos_S, inv_freq_F)


def apply_rope(x_SBHD: Tensor, angles_SF: Tensor, *, mla_interleaved: bool = False) -> Tensor:
    """Rotate the whole last dim of ``x`` ([S, B, H, D], D == 2 * F) by position.

    ``mla_interleaved`` reproduces Megatron's MLA de-interleave before the rotation; the output
    stays in the de-interleaved order, exactly as Megatron returns it (q and k get the same
    permutation, so their dot products equal DeepSeek's interleaved-pair RoPE)."""
    if mla_interleaved:
        x_SBHD = torch.cat((x_SBHD[..., 0::2], x_SBHD[..., 1::2]), dim=-1)
    emb_SD = torch.cat((angles_SF, angles_SF), dim=-1)[:, None, None, :]
    # Megatron casts cos/sin to the activation dtype before multiplying (rope_utils.py).
    cos = emb_SD.cos().to(x_SBHD.dtype)
    sin = emb_SD.sin().to(x_SBHD.dtype)
    x1, x2 = torch.chunk(x_SBHD, 2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x_SBHD * cos + rotated * sin
