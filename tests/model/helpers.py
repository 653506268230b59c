"""Small configs and state-dict helpers shared by the model tests."""

from __future__ import annotations

import re

import torch

from mhc_model import HybridConfig
from mhc_model.config import (
    AttentionConfig,
    CSAConfig,
    GDNConfig,
    MambaConfig,
    MHCConfig,
    MLAConfig,
    MLPConfig,
    MoEConfig,
)

SINGLE_SYMBOLS = ["M", "G", "*", "D", "+", "-", "E"]
PATTERNS = ["M-M*-M-", "MEMEM*EME", "GGG*GGG*", "DEDE", "*E+E"]
ALL_PATTERNS = SINGLE_SYMBOLS + PATTERNS
# DeepSeek-V4 attention: its ratio-128 layer needs >= 128 tokens to pool anything, more than the
# generic tests run, so its model tests live in test_dsv4_attention.py
DSV4_PATTERNS = ["C", "H", "W", "CEHW", "C-H-W-"]

_LAYER = re.compile(r"^(decoder\.layers\.\d+\.)(.*)$")


def tiny_config(pattern: str, *, mhc: bool = False, n: int = 4, convention: str = "deepseek",
                contract: str = "mean", dtype: str = "float32", **mhc_extra) -> HybridConfig:
    return HybridConfig(
        hybrid_layer_pattern=pattern,
        hidden_size=32,
        vocab_size=64,
        params_dtype=dtype,
        attention=AttentionConfig(num_attention_heads=4, num_query_groups=2),
        mlp=MLPConfig(ffn_hidden_size=48),
        moe=MoEConfig(num_experts=4, router_topk=2, moe_ffn_hidden_size=24,
                      shared_expert_ffn_hidden_size=16),
        mamba=MambaConfig(d_state=8, head_dim=8, num_groups=2, expand=2, chunk_size=8),
        gdn=GDNConfig(num_key_heads=2, num_value_heads=4, key_head_dim=8, value_head_dim=8,
                      chunk_size=8),
        mla=MLAConfig(q_lora_rank=16, kv_lora_rank=16, qk_head_dim=8, qk_pos_emb_head_dim=4,
                      v_head_dim=8, index_n_heads=2, index_head_dim=8, index_topk=4),
        csa=CSAConfig(window_size=4, o_groups=2, o_lora_rank=8, rotary_scaling_factor=4.0,
                      original_max_position_embeddings=64),
        mhc=MHCConfig(enable_hyper_connections=mhc, num_residual_streams=n,
                      mhc_convention=convention, mhc_output_contract=contract, **mhc_extra),
    )


def off_to_on(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """decoder.layers.N.X -> decoder.layers.N.inner_layer.X (the wrapper layout)."""
    out = {}
    for key, value in state.items():
        m = _LAYER.match(key)
        out[f"{m.group(1)}inner_layer.{m.group(2)}" if m else key] = value
    return out


@torch.no_grad()
def perturb_norms_(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial norm weights, so a missed or doubled norm cannot hide."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "norm" in name and p.dim() == 1:
            p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g).to(p.dtype))


def tokens(batch: int = 2, seq: int = 11, vocab: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def saved_stream_storages(model, ids: torch.Tensor, n: int, dim: int | None = None) -> int:
    """How many distinct storages of n-stream size (T * n * C elements; of rank ``dim`` when
    given) one forward of ``model`` saves for backward."""
    numel = ids.numel() * n * model.config.hidden_size
    seen = set()

    def pack(t):
        if t.numel() == numel and (dim is None or t.dim() == dim):
            seen.add(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids)
    return len(seen)
