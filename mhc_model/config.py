"""Typed configuration for the hybrid model: one frozen dataclass per concern.

The pattern string is parsed exactly once (``HybridConfig.layer_symbols``). Every check raises
``ValueError`` naming the field and the offending numbers. ``from_json`` rejects unknown fields.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal

from mhc_model.config_sections import (  # re-exported: import the sections from here
    AttentionConfig,
    CSAConfig,
    GDNConfig,
    MambaConfig,
    MLAConfig,
    MLPConfig,
    MoEConfig,
    _check_choice,
    _check_positive,
    _check_types,
)
from mhc_model.conventions import CONVENTIONS, head_eps_value
from mhc_model.dialects import ParsedPattern, split_pattern
from mhc_model.specs import LAYER_SPECS

LAYER_SYMBOLS = {sym: spec.name for sym, spec in LAYER_SPECS.items()}

DTYPES = ("float32", "bfloat16", "float16")
CONTRACTS = ("mean", "learned")  # how the n streams end before the final norm (DESIGN.md §1)


def split_layer_pattern(pattern: str) -> ParsedPattern:
    """Megatron's ``hybrid_layer_pattern`` -> main part (``|`` marks pipeline-stage boundaries
    and carries no layer), MTP part and depth count, structured as Megatron's
    ``parse_hybrid_pattern`` does (``mhc_model.dialects``), over the symbols ``mhc_model``
    implements. Which branch's grammar a checkpoint must also satisfy is checked where the
    branch is known (``targets.check_pattern_for``)."""
    parsed = split_pattern(pattern, frozenset(LAYER_SYMBOLS))
    if not parsed.main_symbols:
        raise ValueError(f"hybrid_layer_pattern={pattern!r}: no layers")
    return parsed


def parse_pattern(pattern: str) -> tuple[str, ...]:
    """The main decoder's symbols, one per layer (``split_layer_pattern``)."""
    return split_layer_pattern(pattern).main_symbols


@dataclass(frozen=True)
class MHCConfig:
    """Manifold-constrained hyper-connections (DESIGN.md §1). Field names follow Megatron
    dsv4/dev; ``megatron_args.config_from_megatron_args`` also reads the main-branch
    spellings."""

    enable_hyper_connections: bool = False
    num_residual_streams: int = 4
    mhc_sinkhorn_iterations: int = 20
    mhc_init_gating_factor: float = 0.01
    mhc_convention: str = "deepseek"  # a key of mhc_model.conventions.CONVENTIONS
    mhc_output_contract: Literal["mean", "learned"] = "mean"
    mhc_recompute_layer_num: int | None = None
    mhc_eps: float = 1e-6

    def validate(self) -> None:
        if self.num_residual_streams < 2:
            raise ValueError(
                f"mhc.num_residual_streams must be >= 2, got {self.num_residual_streams}"
            )
        _check_positive("mhc", mhc_sinkhorn_iterations=self.mhc_sinkhorn_iterations,
                        mhc_recompute_layer_num=self.mhc_recompute_layer_num, mhc_eps=self.mhc_eps)
        if self.mhc_init_gating_factor < 0:
            raise ValueError(
                f"mhc.mhc_init_gating_factor must be >= 0, got {self.mhc_init_gating_factor}"
            )
        _check_choice("mhc", "mhc_convention", self.mhc_convention, tuple(CONVENTIONS))
        _check_choice("mhc", "mhc_output_contract", self.mhc_output_contract, CONTRACTS)


# config section (named by a LayerSpec) -> its validation; sections of unused layers are not
# validated, so an mHC-only or Mamba-only config need not carry sane attention sizes
_SECTION_CHECKS: dict[str, Callable[[HybridConfig], None]] = {
    "attention": lambda c: c.attention.validate(c.hidden_size),
    "mlp": lambda c: c.mlp.validate(),
    "moe": lambda c: c.moe.validate(),
    "mamba": lambda c: c.mamba.validate(c.hidden_size),
    "gdn": lambda c: c.gdn.validate(),
    "mla": lambda c: c.mla.validate(),
    "csa": lambda c: c.csa.validate(c.mla, c.attention.num_attention_heads),
    "attention_heads": lambda c: _check_positive(
        "attention", num_attention_heads=c.attention.num_attention_heads),
}

_SUBCONFIGS: dict[str, type] = {
    "attention": AttentionConfig,
    "mlp": MLPConfig,
    "moe": MoEConfig,
    "mamba": MambaConfig,
    "gdn": GDNConfig,
    "mla": MLAConfig,
    "csa": CSAConfig,
    "mhc": MHCConfig,
}


@dataclass(frozen=True)
class HybridConfig:
    """The whole model. ``layer_symbols`` is the parsed pattern (one symbol per layer)."""

    hybrid_layer_pattern: str = "M-M*-M-"
    hidden_size: int = 64
    vocab_size: int = 256
    norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    params_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    fp32_residual_connection: bool = False
    init_std: float = 0.02
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    mlp: MLPConfig = field(default_factory=MLPConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    mamba: MambaConfig = field(default_factory=MambaConfig)
    gdn: GDNConfig = field(default_factory=GDNConfig)
    mla: MLAConfig = field(default_factory=MLAConfig)
    csa: CSAConfig = field(default_factory=CSAConfig)
    mhc: MHCConfig = field(default_factory=MHCConfig)

    def __post_init__(self) -> None:
        _check_types("config", self)  # sub-configs: their class (then their fields below)
        for name in _SUBCONFIGS:
            _check_types(name, getattr(self, name))
        _check_positive("config", hidden_size=self.hidden_size, vocab_size=self.vocab_size,
                        norm_eps=self.norm_eps, init_std=self.init_std)
        _check_choice("config", "params_dtype", self.params_dtype, DTYPES)
        used = {s for sym in set(self.site_symbols) for s in LAYER_SPECS[sym].sections}
        for section, check in _SECTION_CHECKS.items():  # fixed order: the first error wins
            if section in used:
                check(self)
        self.mhc.validate()
        # the exact enable point is logit(1/n - eps) for the pre gates and the learned head
        # (DESIGN.md §4): defined only for eps < 1/n
        n = self.mhc.num_residual_streams
        eps = max(self.mhc.mhc_eps, head_eps_value(self.mhc.mhc_convention,
                                                   mhc_eps=self.mhc.mhc_eps,
                                                   layernorm_epsilon=self.norm_eps))
        if eps >= 1.0 / n:
            raise ValueError(f"mhc: eps {eps} (mhc_eps or, as the head's eps, norm_eps) must be "
                             f"< 1/num_residual_streams = {1.0 / n:.4g}")

    @cached_property
    def parsed_pattern(self) -> ParsedPattern:
        return split_layer_pattern(self.hybrid_layer_pattern)

    @property
    def layer_symbols(self) -> tuple[str, ...]:
        """The main decoder's layers."""
        return self.parsed_pattern.main_symbols

    @property
    def mtp_symbols(self) -> tuple[str, ...]:
        """One MTP depth's inner layers (empty without MTP)."""
        return self.parsed_pattern.mtp_symbols

    @property
    def mtp_num_depths(self) -> int:
        return self.parsed_pattern.mtp_depths

    @property
    def site_symbols(self) -> tuple[str, ...]:
        """Every layer of the model in site order: the decoder's, then depth 0's MTP layers,
        depth 1's, ... (one mHC site each; ``toggle.codec.site_prefix``)."""
        return self.layer_symbols + self.mtp_symbols * self.mtp_num_depths

    @property
    def num_layers(self) -> int:
        return len(self.layer_symbols)

    @property
    def mhc_on(self) -> bool:
        return self.mhc.enable_hyper_connections

    def replace(self, **changes: Any) -> HybridConfig:
        return dataclasses.replace(self, **changes)

    def with_mhc(self, **changes: Any) -> HybridConfig:
        return dataclasses.replace(self, mhc=dataclasses.replace(self.mhc, **changes))

    # ---- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HybridConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"HybridConfig: unknown field(s) {unknown}")
        kwargs: dict[str, Any] = {}
        for name, value in data.items():
            sub = _SUBCONFIGS.get(name)
            if sub is not None:
                if not isinstance(value, dict):
                    raise ValueError(f"HybridConfig.{name} must be an object, got {type(value)}")
                sub_known = {f.name for f in dataclasses.fields(sub)}
                sub_unknown = sorted(set(value) - sub_known)
                if sub_unknown:
                    raise ValueError(f"HybridConfig.{name}: unknown field(s) {sub_unknown}")
                kwargs[name] = sub(**value)
            else:
                kwargs[name] = value
        return cls(**kwargs)

    @classmethod
    def from_json(cls, text: str) -> HybridConfig:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("HybridConfig JSON must be an object")
        return cls.from_dict(data)
