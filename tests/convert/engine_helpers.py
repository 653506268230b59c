"""Shared helpers of the engine tests (``test_engine.py``, ``test_engine_refusals.py``) and the
Megatron fixture tests: tiny native checkpoints, the copied torch_dist fixture, tree digests,
bitwise comparisons and logits parity."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from mhc_convert.formats.torch_dist import read_torch_dist
from mhc_convert.parity import load_model
from mhc_model.model import HybridModel
from tests.model.helpers import perturb_norms_, tiny_config, tokens
from tests.paths import MEGATRON_FIXTURE

FIXTURE = MEGATRON_FIXTURE  # committed in the repository: a missing copy fails, never skips
ITER = "iter_0001000"
HC_NAMES = ("mapping_proj.weight", "bias", "alpha_pre", "alpha_post", "alpha_res")
MHC_ARG_FLAGS = ("enable_hyper_connections", "num_residual_streams")
PARITY_TOL = 1e-5  # fp32 CPU, DESIGN.md §4


# ------------------------------------------------------------------------------------ helpers
def make_native(root: Path, pattern: str = "M-M*-M-", *, shard_bytes: int | None = None,
                seed: int = 0, **cfg_kw) -> Path:
    torch.manual_seed(seed)
    model = HybridModel(tiny_config(pattern, **cfg_kw))
    perturb_norms_(model, seed)
    if shard_bytes is None:
        model.save_pretrained(root)
    else:
        model.save_pretrained(root, max_shard_bytes=shard_bytes)
    return root


def copy_fixture(tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(FIXTURE, dst, copy_function=shutil.copyfile)
    for d, _, _ in os.walk(dst):
        os.chmod(d, 0o755)
    return dst


def tree_sha(root: Path) -> dict[str, str]:
    """sha256 of every file (hidden ones included) under root, plus the set of directories; a
    symlink counts as its target string (never followed: hostile inputs plant them)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root) + "/"] = "dir"
        for name in filenames:
            p = Path(dirpath) / name
            data = os.readlink(p).encode() if p.is_symlink() else p.read_bytes()
            out[p.relative_to(root).as_posix()] = hashlib.sha256(data).hexdigest()
    return out


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if "mhc-tmp" in p.name or "mhc-lock" in p.name
                  or "mhc-old" in p.name)


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, same shape, same bits (torch.equal alone calls -0.0 == 0.0)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8),
                       b.contiguous().reshape(-1).view(torch.uint8))


def native_state(root: Path) -> dict[str, torch.Tensor]:
    index = root / "model.safetensors.index.json"
    if index.exists():
        state: dict[str, torch.Tensor] = {}
        for name in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            state.update(load_file(str(root / name)))
        return state
    return load_file(str(root / "model.safetensors"))


def wrap(key: str) -> str:
    if key.startswith("decoder.layers."):
        i, rest = key[len("decoder.layers."):].split(".", 1)
        return f"decoder.layers.{i}.inner_layer.{rest}"
    return key


def logits_diff(a: Path, b: Path, seed: int = 0) -> float:
    ma, mb = load_model(a, dtype="fp32"), load_model(b, dtype="fp32")
    ids = tokens(2, 13, ma.config.vocab_size, seed)
    with torch.no_grad():
        return (ma(ids).float() - mb(ids).float()).abs().max().item()


def assert_dist_views_equal(a: Path, b: Path, *, flags_changed: bool = False) -> None:
    """Two torch_dist checkpoints hold the same keys, tensors (bitwise), byte objects and common
    state. ``flags_changed``: the args mHC flags may differ (compared by the caller)."""
    va, vb = read_torch_dist(a), read_torch_dist(b)
    assert list(va.entries) and set(va.entries) == set(vb.entries)
    for key, ea in va.entries.items():
        eb = vb.entries[key]
        assert (ea.kind, ea.dtype, ea.shape) == (eb.kind, eb.dtype, eb.shape), key
        if key == "common_state/shard_0_1":
            continue  # re-encoded with the args rewritten: compared decoded below
        if ea.kind == "tensor":
            assert bits_equal(va.load(key), vb.load(key)), key
        else:
            assert va.load(key) == vb.load(key), key
    ca, cb = va.meta["common_state"], vb.meta["common_state"]
    assert set(ca) == set(cb)
    for k in ca:
        if k != "args":
            assert ca[k] == cb[k], k
    aa, ab = vars(ca["args"]), vars(cb["args"])
    skip = set(MHC_ARG_FLAGS) if flags_changed else set()
    assert {k: v for k, v in aa.items() if k not in skip} == \
        {k: v for k, v in ab.items() if k not in skip}
    assert va.meta["iteration"] == vb.meta["iteration"] == ca["iteration"]
    assert va.meta["tracker"] == vb.meta["tracker"]


# ------------------------------------------------------------------------- bitwise round trip
