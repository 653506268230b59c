"""Shared pieces of the attention / MLA / DSA / MLP / MoE layer tests: a tiny config, a
builder with randomised norm weights, and independent references (RMSNorm, RoPE as a complex
rotation, causal softmax attention)."""

from __future__ import annotations

import torch

from mhc_model.config import AttentionConfig, HybridConfig, MLAConfig

S, B, C = 12, 2, 64
EPS = 1e-5


def make_cfg(**kw) -> HybridConfig:
    base = dict(hybrid_layer_pattern="*+D-E", hidden_size=C,
                attention=AttentionConfig(num_attention_heads=4, num_query_groups=2))
    base.update(kw)
    return HybridConfig(**base)


def qk_cfg(qk_layernorm, q_lora=32, **mla):
    return make_cfg(attention=AttentionConfig(num_attention_heads=4, qk_layernorm=qk_layernorm),
                    mla=MLAConfig(q_lora_rank=q_lora, **mla))


def build(cls, cfg, seed=0):
    torch.manual_seed(seed)
    layer = cls(cfg)
    # Norm weights start at 1 and biases at 0; randomise them so tests see their placement.
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.5 * torch.randn_like(p.float()))
    return layer


def shapes(layer) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in layer.state_dict().items()}


def rms(x, w):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * w


def rope_complex(x_SD, pos_S, base, interleaved):
    """Reference RoPE as complex rotation. Non-interleaved pairs (i, i + D/2); interleaved
    pairs (2i, 2i+1) (DeepSeek). Output keeps the input's pair layout."""
    D = x_SD.shape[-1]
    theta = pos_S[:, None].float() / base ** (torch.arange(0, D, 2).float() / D)
    if interleaved:
        z = torch.complex(x_SD[..., 0::2], x_SD[..., 1::2]) * torch.polar(torch.ones_like(theta),
                                                                          theta)
        return torch.stack([z.real, z.imag], -1).flatten(-2)
    z = torch.complex(x_SD[..., : D // 2], x_SD[..., D // 2:]) * torch.polar(
        torch.ones_like(theta), theta)
    return torch.cat([z.real, z.imag], -1)


def causal_softmax_attend(q_SD, k_SD, v_SD, scale, allowed_SS=None):
    s = q_SD @ k_SD.t() * scale
    mask = torch.ones(s.shape, dtype=torch.bool).tril() if allowed_SS is None else allowed_SS
    return torch.softmax(s.masked_fill(~mask, float("-inf")), -1) @ v_SD
