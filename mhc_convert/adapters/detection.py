"""Which format a directory holds, from file names alone (no reads, no torch): the adapters'
``detects`` and the registry's detection both use these, so that finding the format of a
native checkpoint (``mhc-convert inspect``) never imports the Megatron readers or torch."""

from __future__ import annotations

from pathlib import Path

from mhc_model.megatron_files import MARKER, METADATA, candidates

CONFIG_NAME = "config.json"  # the native format's marker (formats.native)


def is_native(path: Path) -> bool:
    return (path / CONFIG_NAME).exists()


def is_torch_dist(path: Path) -> bool:
    return any((c / METADATA).exists() or (c / MARKER).exists() for c in candidates(path))


def is_torch_legacy(path: Path) -> bool:
    return any(any(c.glob("mp_rank_*")) for c in candidates(path))
