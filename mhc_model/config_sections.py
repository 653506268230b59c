"""The layer-kind sections of the model configuration (one frozen dataclass per concern) and the
field checks every section and ``HybridConfig`` share. ``mhc_model.config`` re-exports them:
import from there."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from functools import cache
from typing import Any, Literal


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_ok(value: Any, hint: Any) -> bool:
    """``value`` is of the annotated type, strictly: no bool for an int, no float for an int,
    only finite floats. A config read from JSON or Megatron args carries any JSON/pickle value;
    a list where an int belongs would otherwise reach the planner (as an unhashable key) and
    ``inf`` would reach ``json.dumps(allow_nan=False)`` at write time."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        return any(type(value) is type(a) for a in typing.get_args(hint))
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return type(value) in (int, float) and math.isfinite(value)
    if hint in (bool, int, str):
        return type(value) is hint
    return isinstance(value, hint) if isinstance(hint, type) else True


def _check_types(owner: str, obj: Any) -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if not _type_ok(value, _hints(type(obj))[f.name]):
            raise ValueError(f"{owner}.{f.name} must be {f.type}, got {type(value).__name__} "
                             f"{value!r:.60}")


def _check_positive(owner: str, **values: int | float | None) -> None:
    for name, v in values.items():
        if v is not None and v <= 0:
            raise ValueError(f"{owner}.{name} must be > 0, got {v}")


def _check_choice(owner: str, name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{owner}.{name} must be one of {list(choices)}, got {value!r}")


@dataclass(frozen=True)
class AttentionConfig:
    """GQA self-attention (`*`). Head counts follow Megatron: query groups = KV heads."""

    num_attention_heads: int = 4
    num_query_groups: int | None = None  # None -> num_attention_heads (MHA)
    kv_channels: int | None = None  # head dim; None -> hidden_size // heads
    position_embedding_type: Literal["rope", "none"] = "rope"
    rotary_base: float = 10000.0
    qk_layernorm: bool = False

    def validate(self, hidden_size: int) -> None:
        _check_positive("attention", num_attention_heads=self.num_attention_heads,
                        num_query_groups=self.num_query_groups, kv_channels=self.kv_channels,
                        rotary_base=self.rotary_base)
        _check_choice("attention", "position_embedding_type", self.position_embedding_type,
                      ("rope", "none"))
        if self.num_attention_heads % self.groups != 0:
            raise ValueError(
                f"attention.num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"attention.num_query_groups={self.groups}"
            )
        if self.kv_channels is None and hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={hidden_size} is not divisible by attention.num_attention_heads="
                f"{self.num_attention_heads}; set attention.kv_channels"
            )
        if self.position_embedding_type == "rope" and self.head_dim(hidden_size) % 2:
            raise ValueError(
                f"attention head dim {self.head_dim(hidden_size)} must be even for rope"
            )

    @property
    def groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    def head_dim(self, hidden_size: int) -> int:
        return self.kv_channels or hidden_size // self.num_attention_heads


@dataclass(frozen=True)
class MLPConfig:
    """Dense MLP (`-`); the activation is shared with MoE experts."""

    ffn_hidden_size: int = 256
    activation: Literal["squared_relu", "swiglu"] = "squared_relu"

    def validate(self) -> None:
        _check_positive("mlp", ffn_hidden_size=self.ffn_hidden_size)
        _check_choice("mlp", "activation", self.activation, ("squared_relu", "swiglu"))


@dataclass(frozen=True)
class MoEConfig:
    """Token-choice top-k MoE (`E`) without capacity drop."""

    num_experts: int = 4
    router_topk: int = 2
    moe_ffn_hidden_size: int = 128
    shared_expert_ffn_hidden_size: int | None = None  # None -> no shared expert
    score_function: Literal["softmax", "sigmoid"] = "softmax"
    router_expert_bias: bool = False  # aux-loss-free balancing bias (`mlp.router.expert_bias`)

    def validate(self) -> None:
        _check_positive("moe", num_experts=self.num_experts, router_topk=self.router_topk,
                        moe_ffn_hidden_size=self.moe_ffn_hidden_size,
                        shared_expert_ffn_hidden_size=self.shared_expert_ffn_hidden_size)
        _check_choice("moe", "score_function", self.score_function, ("softmax", "sigmoid"))
        if self.router_topk > self.num_experts:
            raise ValueError(
                f"moe.router_topk={self.router_topk} exceeds moe.num_experts={self.num_experts}"
            )


@dataclass(frozen=True)
class MambaConfig:
    """Mamba2 mixer (`M`): d_inner = expand * hidden, heads = d_inner / head_dim."""

    d_state: int = 16
    head_dim: int = 16
    num_groups: int = 1
    expand: int = 2
    d_conv: int = 4
    chunk_size: int = 64

    def validate(self, hidden_size: int) -> None:
        _check_positive("mamba", d_state=self.d_state, head_dim=self.head_dim,
                        num_groups=self.num_groups, expand=self.expand, d_conv=self.d_conv,
                        chunk_size=self.chunk_size)
        d_inner = self.d_inner(hidden_size)
        if d_inner % self.head_dim:
            raise ValueError(
                f"mamba: d_inner = expand*hidden_size = {d_inner} is not divisible by "
                f"mamba.head_dim={self.head_dim}"
            )
        if self.num_heads(hidden_size) % self.num_groups:
            raise ValueError(
                f"mamba: heads={self.num_heads(hidden_size)} not divisible by "
                f"mamba.num_groups={self.num_groups}"
            )

    def d_inner(self, hidden_size: int) -> int:
        return self.expand * hidden_size

    def num_heads(self, hidden_size: int) -> int:
        return self.d_inner(hidden_size) // self.head_dim


@dataclass(frozen=True)
class GDNConfig:
    """Gated DeltaNet (`G`), Megatron's `linear_*` arguments."""

    num_key_heads: int = 2
    num_value_heads: int = 4
    key_head_dim: int = 16
    value_head_dim: int = 16
    conv_kernel: int = 4
    chunk_size: int = 64

    def validate(self) -> None:
        _check_positive("gdn", num_key_heads=self.num_key_heads,
                        num_value_heads=self.num_value_heads, key_head_dim=self.key_head_dim,
                        value_head_dim=self.value_head_dim, conv_kernel=self.conv_kernel,
                        chunk_size=self.chunk_size)
        if self.num_value_heads % self.num_key_heads:
            raise ValueError(
                f"gdn.num_value_heads={self.num_value_heads} is not a multiple of "
                f"gdn.num_key_heads={self.num_key_heads}"
            )


@dataclass(frozen=True)
class MLAConfig:
    """Multi-latent attention (`+`) and DeepSeek sparse attention (`D` = MLA + indexer).
    Uses ``attention.num_attention_heads`` for the head count."""

    q_lora_rank: int | None = 32  # None -> no query down-projection
    kv_lora_rank: int = 32
    qk_head_dim: int = 16
    qk_pos_emb_head_dim: int = 8
    v_head_dim: int = 16
    rotary_base: float = 10000.0
    index_n_heads: int = 2
    index_head_dim: int = 16
    index_topk: int = 8

    def validate(self) -> None:
        _check_positive("mla", q_lora_rank=self.q_lora_rank, kv_lora_rank=self.kv_lora_rank,
                        qk_head_dim=self.qk_head_dim, qk_pos_emb_head_dim=self.qk_pos_emb_head_dim,
                        v_head_dim=self.v_head_dim, index_n_heads=self.index_n_heads,
                        index_head_dim=self.index_head_dim, index_topk=self.index_topk)
        if self.qk_pos_emb_head_dim % 2:
            raise ValueError(f"mla.qk_pos_emb_head_dim={self.qk_pos_emb_head_dim} must be even")


@dataclass(frozen=True)
class CSAConfig:
    """DeepSeek-V4 attention (`C` compressed sparse, ratio 4 + indexer; `H` heavily compressed,
    ratio 128; `W` sliding window only): Megatron dev's ``csa_*``, ``o_*`` and YaRN fields
    (``transformer_config.py`` MLATransformerConfig; CLI defaults of ``arguments.py``). The
    projection sizes come from ``mla`` (q_lora_rank, v_head_dim = head dim, qk_pos_emb_head_dim,
    the indexer's index_*) and ``attention.num_attention_heads``; ``mla.rotary_base`` is the
    window layer's rope base."""

    window_size: int = 128  # csa_window_size
    compress_rotary_base: float = 40000.0  # csa_compress_rotary_base (C, H: YaRN rope)
    dense_mode: bool = False  # csa_dense_mode: C attends every compressed entry, no indexer
    o_groups: int = 8
    o_lora_rank: int = 1024
    rotary_scaling_factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0

    def validate(self, mla: MLAConfig, heads: int) -> None:
        _check_positive("csa", window_size=self.window_size, o_groups=self.o_groups,
                        o_lora_rank=self.o_lora_rank,
                        compress_rotary_base=self.compress_rotary_base,
                        rotary_scaling_factor=self.rotary_scaling_factor,
                        original_max_position_embeddings=self.original_max_position_embeddings,
                        beta_fast=self.beta_fast, beta_slow=self.beta_slow)
        if mla.q_lora_rank is None:
            raise ValueError("DeepSeek-V4 attention (C/H/W) needs mla.q_lora_rank (its q is "
                             "always down-projected)")
        if mla.v_head_dim <= mla.qk_pos_emb_head_dim:
            raise ValueError(f"DeepSeek-V4 attention: mla.v_head_dim={mla.v_head_dim} must exceed "
                             f"mla.qk_pos_emb_head_dim={mla.qk_pos_emb_head_dim}")
        if mla.index_head_dim < mla.qk_pos_emb_head_dim:
            raise ValueError(f"DeepSeek-V4 attention: mla.index_head_dim={mla.index_head_dim} "
                             f"must be >= mla.qk_pos_emb_head_dim={mla.qk_pos_emb_head_dim}")
        if heads * mla.v_head_dim % self.o_groups:
            raise ValueError(f"DeepSeek-V4 attention: heads*v_head_dim={heads * mla.v_head_dim} "
                             f"is not divisible by csa.o_groups={self.o_groups}")
