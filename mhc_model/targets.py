"""Where a converted checkpoint is meant to run, as data (DESIGN.md §1 table, §4;
research/megatron-interop.md §1-§2): a ``Target`` fixes the mHC convention, the output
contract, and so (through the ``Convention`` record) the learned head's eps and the dtype the
mHC parameters are stored in.

Megatron dev and dsv4 always build ``decoder.hc_head_*`` with mHC on (dev ``hybrid_block.py``
~746-756, dsv4 ~382-392), so their targets use the learned contract and refuse the mean one.
Which branch wrote a checkpoint is read off its ``args``: each branch's args carry fields the
other's lack (dev builds args from its ``TransformerConfig`` fields, dsv4 adds its CSA flags).
Args carrying neither come from a Megatron without the hybrid mHC wrapper (main, the
megatron-core releases); only ``mhc_model`` runs mHC on those, so their target is ``native``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mhc_model.config import CONTRACTS
from mhc_model.conventions import CONVENTIONS
from mhc_model.dialects import ParsedPattern, parse_for_branch


@dataclass(frozen=True)
class Target:
    name: str
    convention: str
    contract: str  # the default output contract
    contracts: tuple[str, ...]  # the contracts a checkpoint for this target may use
    branch: str | None  # the Megatron branch whose code loads it (None: mhc_model)
    markers: tuple[str, ...] = ()  # args fields only this branch writes
    # pattern symbols this branch's TransformerConfig refuses together with mHC, and why
    unsupported_with_mhc: tuple[str, ...] = ()
    unsupported_reason: str = ""

    def __post_init__(self) -> None:
        assert self.convention in CONVENTIONS and set(self.contracts) <= set(CONTRACTS)


TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("native", "deepseek", "mean", CONTRACTS, None),
    Target("megatron-dev", "megatron_dev", "learned", ("learned",), "dev",
           markers=("dsa_indexer_rope_interleaved", "linear_attention_type",
                    "moe_n_hash_layers")),
    Target("megatron-dsv4", "megatron_dsv4", "learned", ("learned",), "dsv4",
           markers=("csa_compress_ratio_for_c", "csa_compress_ratio_for_h"),
           # dsv4 transformer_config.py: "enable_hyper_connections is not yet supported with
           # MoE layers" (research/megatron-interop.md §1)
           unsupported_with_mhc=("E",), unsupported_reason="its TransformerConfig refuses "
           "enable_hyper_connections with MoE layers"),
)}


def target(name: str) -> Target:
    if name not in TARGETS:
        raise ValueError(f"unknown target {name!r}; expected one of {', '.join(TARGETS)}")
    return TARGETS[name]


def target_of_args(args: Any) -> Target:
    """The target a Megatron run's args prove (see the module docstring). Markers of two
    branches at once are a contradiction, not a choice."""
    found = [t for t in TARGETS.values() if any(hasattr(args, m) for m in t.markers)]
    if len(found) > 1:
        raise ValueError(f"megatron args carry fields of several branches "
                         f"({', '.join(t.name for t in found)}); pass --target")
    return found[0] if found else TARGETS["native"]


def dialect_of_args(args: Any) -> str:
    """The Megatron branch whose pattern grammar (``mhc_model.dialects``) a run's ``args``
    were written under: the branch its fields prove, else ``main`` (args without dev/dsv4
    fields come from main or a megatron-core release, which share main's grammar)."""
    return target_of_args(args).branch or "main"


def check_pattern_for(pattern: str, branch: str) -> ParsedPattern:
    """``pattern`` read by Megatron ``branch``'s parser; ``ValueError`` naming the branch
    where that parser refuses it (e.g. ``W`` for dsv4, ``+`` for dev)."""
    try:
        return parse_for_branch(pattern, branch)
    except ValueError as e:
        raise ValueError(f"Megatron {branch}'s pattern grammar refuses it: {e}") from None
