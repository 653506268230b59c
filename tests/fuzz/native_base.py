"""Native fuzz bases built once per session: the ``nemotron_h_tiny`` fixture as one file and
split into two shards with an index (``total_size`` = tensor bytes)."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from safetensors.torch import load_file, save_file

from tests.paths import NEMOTRON_H_TINY

INDEX = "model.safetensors.index.json"
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
WORK = Path(tempfile.mkdtemp(prefix="mhc-fuzz-native-"))


def single() -> Path:
    src = WORK / "single"
    if not src.exists():
        shutil.copytree(NEMOTRON_H_TINY, src)
    return src


def sharded() -> tuple[Path, dict]:
    """(directory, its index document)."""
    src = WORK / "sharded"
    state = load_file(str(NEMOTRON_H_TINY / "model.safetensors"))
    keys = list(state)
    halves = (keys[: len(keys) // 2], keys[len(keys) // 2:])
    wm = {k: name for name, part in zip(SHARDS, halves) for k in part}
    if not src.exists():
        src.mkdir()
        shutil.copyfile(NEMOTRON_H_TINY / "config.json", src / "config.json")
        for name, part in zip(SHARDS, halves):
            save_file({k: state[k] for k in part}, str(src / name), metadata={"format": "pt"})
    total = sum(t.numel() * t.element_size() for t in state.values())
    doc = {"metadata": {"total_size": total}, "weight_map": wm}
    (src / INDEX).write_text(json.dumps(doc))
    return src, doc
