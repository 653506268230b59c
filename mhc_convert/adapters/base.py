"""The one contract every checkpoint format adapter meets (the glue between the mHC-agnostic
readers/writers in ``mhc_convert.formats`` and the engine). The registry in
``mhc_convert.adapters`` lists the adapters; the engine calls exactly these methods, in this
order: ``detects`` -> ``read`` -> ``config`` -> (plan) -> ``check`` -> ``write``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from mhc_convert.view import CheckpointView, OutItem, ProgressFn
from mhc_model.config import HybridConfig

if TYPE_CHECKING:
    from mhc_convert.validate import OnePassScan
    from mhc_model.toggle.plan import Plan

MarkerWriter = Callable[[Path], None]
# Distributed runs: (unit name, bytes) list -> the names this rank writes (distributed.py).
Assign = Callable[[list[tuple[str, int]]], set[str]]


@dataclass(frozen=True)
class ReadOptions:
    """``drop_optimizer``: the engine leaves every ``optimizer.*`` key out of the plan, so an
    optimizer layout that cannot follow a parameter change is acceptable (it is not carried).
    ``describe``: read for ``inspect`` only: what a conversion would refuse is described in
    ``meta`` instead of raised."""

    drop_optimizer: bool = False
    describe: bool = False


class Adapter(Protocol):
    name: str
    # Why this format cannot fold a constant H_post into output projections on disable
    # (None: it can).
    fold_refusal: str | None

    def detects(self, path: Path) -> bool:
        """Whether ``path`` (an existing directory) is a checkpoint of this format."""

    def read(self, path: Path, *, options: ReadOptions) -> CheckpointView: ...

    def config(self, view: CheckpointView) -> HybridConfig: ...

    def check(self, view: CheckpointView, plan: Plan, cfg: HybridConfig,
              target: HybridConfig) -> None:
        """Format checks that need the plan, before anything is written (dry runs too)."""

    def write(self, tmp: Path, view: CheckpointView, items: list[OutItem], target: HybridConfig,
              *, link: str, progress: ProgressFn | None,
              assign: Assign | None = None, finite: OnePassScan | None = None) -> MarkerWriter:
        """Write the output into ``tmp``; ``finite`` (not None): hand it every source range
        copied (``ranges``) or linked (``linked``) so the NaN/Inf check runs in the copy."""


DEFAULT_READ = ReadOptions()
