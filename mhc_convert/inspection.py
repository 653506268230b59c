"""``mhc-convert inspect``: what a checkpoint is (format, layout, pattern, streams, iteration,
optimizer, sizes) and, with ``verify``, whether every file still matches ``mhc-manifest.json``.
Reads headers and small files only; a native checkpoint is inspected without importing torch."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mhc_convert import commit
from mhc_convert.adapters import ReadOptions, open_checkpoint
from mhc_convert.errors import MixedLayoutError
from mhc_convert.inputs import local_path
from mhc_convert.view import CheckpointView
from mhc_model.targets import dialect_of_args
from mhc_model.toggle import codec as K


def iteration_of(view: CheckpointView) -> int | str | None:
    """The iteration a checkpoint records (``'release'``, an int, or None)."""
    it = view.meta.get("iteration")
    if it == "release":
        return it
    return int(it) if isinstance(it, int | float) and not math.isnan(it) else None


@dataclass
class InspectReport:
    path: str
    format: str
    layout: str
    pattern: str
    num_layers: int
    streams: int | None
    convention: str | None
    contract: str | None
    iteration: int | None
    optimizer: str
    tensors: int
    bytes: int
    manifest: str
    mtp_depths: int = 0  # multi-token-prediction depths (the parts after '/' in the pattern)
    # the Megatron branch whose pattern grammar the run's args prove (mhc_model.dialects);
    # None without Megatron args (a native checkpoint)
    dialect: str | None = None
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def inspect(path: str | Path, *, verify: bool = False,
            iteration: int | None = None) -> InspectReport:
    path = local_path(path, role="source")
    adapter, view, note = open_checkpoint(path, iteration=iteration,
                                          options=ReadOptions(describe=True))
    fmt, cfg, notes = adapter.name, adapter.config(view), [note] if note else []
    keys = list(view.entries)
    problems: list[str] = []
    try:
        wrapped = bool(K.layout_of(keys))
    except MixedLayoutError as e:  # inspect reports what it sees; converting refuses it
        wrapped = True
        problems.append(e.message)
    opt_states = sorted({k.split(".")[2] for k in keys if k.startswith("optimizer.state.")})
    optimizer = view.meta.get("optimizer_sharding") or ("model-space " + ",".join(opt_states)
                                                       if opt_states else "none")
    manifest = "absent"
    root = view.meta.get("run_dir") or view.path
    if (Path(root) / "mhc-manifest.json").exists():
        manifest = "present"
        if verify:
            mismatches = commit.verify_manifest(Path(root))
            problems += mismatches
            manifest = "verified" if not mismatches else "MISMATCH"
    return InspectReport(
        str(path), fmt, "mhc-on" if wrapped else "mhc-off", cfg.hybrid_layer_pattern,
        cfg.num_layers, cfg.mhc.num_residual_streams if wrapped else None,
        cfg.mhc.mhc_convention if wrapped else None,
        cfg.mhc.mhc_output_contract if wrapped else None,
        iteration_of(view), optimizer, len(keys), view.total_bytes, manifest,
        mtp_depths=cfg.mtp_num_depths, dialect=_dialect(view), problems=problems, notes=notes)


def _dialect(view: CheckpointView) -> str | None:
    args = view.meta.get("megatron_args")
    return None if args is None else dialect_of_args(args)
