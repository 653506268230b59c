"""RoPE of the DeepSeek-V4 attention layers (`C`, `H`, `W`), Megatron dev's conventions.

deepseek_v4_hybrid_attention.py (DSv4HybridAttention.__init__): a `W` layer uses Megatron's
plain ``RotaryEmbedding`` at ``rotary_base``; `C` / `H` use ``YarnRotaryEmbedding`` at
``csa_compress_rotary_base`` with the YaRN frequency blend, its concentration factor forced to
1 ("pure rotation", the forward passes ``mscale=1.0``). Frequencies
(models/common/embeddings/yarn_rotary_pos_embedding.py ``get_emb``):
``inv = inv_inter * (1 - m) + inv_extra * m`` with ``inv_extra = base^(-2i/d)``,
``inv_inter = inv_extra / factor`` and ``m = 1 - ramp(low, high)``, the correction range of
``_yarn_find_correction_range`` rounded to integers.

The rotation acts on the LAST ``pos_dim`` dims of each head (``[nope | pe]``), on DeepSeek's
interleaved pairs, and keeps the interleaved order (rope_utils.py ``_apply_rotary_pos_emb_bshd``
with ``mla_rotary_interleaved`` and ``mla_output_remove_interleaving``): pair i = dims
(2i, 2i+1) turns by ``pos * inv[i]``. DSv4 also rotates the attention output back
(``inverse``: the sine negated) because its values carry the rope part too.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def plain_inv_freq(dim: int, base: float) -> Tensor:
    """``1 / base^(arange(0, dim, 2) / dim)`` in fp32 (RotaryEmbedding.__init__)."""
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))


def _correction_dim(rotations: float, dim: int, base: float, max_pos: int) -> float:
    return (dim * math.log(max_pos / (rotations * 2 * math.pi))) / (2 * math.log(base))


def yarn_inv_freq(dim: int, base: float, factor: float, max_pos: int, beta_fast: float,
                  beta_slow: float) -> Tensor:
    """YaRN-blended frequencies [dim/2] in fp32 (YarnRotaryEmbedding.get_emb)."""
    extra_F = plain_inv_freq(dim, base)
    inter_F = 1.0 / (factor * base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    low = max(math.floor(_correction_dim(beta_fast, dim, base, max_pos)), 0)
    high = min(math.ceil(_correction_dim(beta_slow, dim, base, max_pos)), dim - 1)
    if low == high:
        high += 0.001  # Megatron's guard against a zero-width ramp
    ramp_F = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    mask_F = 1.0 - ramp_F
    return inter_F * (1 - mask_F) + extra_F * mask_F


def angles(positions: int, inv_freq_F: Tensor, stride: int = 1,
           device: torch.device | None = None) -> Tensor:
    """Angles [P, dim/2] of positions ``0, stride, 2*stride, ...`` (fp32). A compressed entry j
    of ratio r sits at position ``j*r`` (csa.py ``_apply_rope``: the table strided by r)."""
    pos_P = torch.arange(positions, dtype=torch.float32, device=device) * stride
    return torch.outer(pos_P, inv_freq_F.to(device))


def rope_tail(x: Tensor, pos_dim: int, angles_SF: Tensor, *, inverse: bool = False) -> Tensor:
    """Rotate the last ``pos_dim`` dims of ``x`` ([S, ..., D]; angles broadcast over the middle
    dims) pairwise, interleaved order kept. cos/sin are cast to ``x``'s dtype first, as
    Megatron does."""
    nope, pe = torch.split(x, [x.shape[-1] - pos_dim, pos_dim], dim=-1)
    shape = (angles_SF.shape[0],) + (1,) * (x.dim() - 2) + (angles_SF.shape[1],)
    cos = angles_SF.cos().to(x.dtype).view(shape)
    sin = angles_SF.sin().to(x.dtype).view(shape)
    if inverse:
        sin = -sin
    even, odd = pe[..., 0::2], pe[..., 1::2]
    rot_even = even * cos - odd * sin
    rot_odd = odd * cos + even * sin
    pe = torch.stack((rot_even, rot_odd), dim=-1).flatten(start_dim=-2)
    return torch.cat((nope, pe), dim=-1)
