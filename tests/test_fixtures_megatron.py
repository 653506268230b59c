"""The checkpoints written by Megatron-LM's own code (fixtures/megatron/make.py) are intact.

Every committed file matches its branch's SHA256SUMS, nothing is missing or unlisted, and each
fixture holds what Megatron needs to load it: the tracker, the iteration directory and, for
torch_dist, `.metadata`, `metadata.json`, the data files and the common state (`common.pt`
before megatron-core 0.19, a `common_state` entry in `.metadata` from then on); for the legacy
format one `model_optim_rng.pt` per (TP, PP) rank. No skips: a missing file fails.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXTERNAL = ROOT / "fixtures" / "external"
# Branch directories the project ships (megatron-<branch>-<commit[:8]>) and their full commits.
BRANCHES = {
    "megatron-dev-d48bd6be": "d48bd6be0a85cc0d6d3cc71e8750cf357cc6bdb1",
    "megatron-dsv4-26b830a6": "26b830a67d25d8850e4a48d494708243f781bf1c",
}
# 3 MiB of model fixtures, ~1.2 MB of distributed-optimizer ones (optim_*, make_optim.py) and
# 0.62 MiB for the DeepSeek-V4 C/H/W pair (most of it DCP's per-entry overhead), plus 0.87 MiB
# for the DeepSeek-V4-like MTP fixtures dsv4_mtp_* (C-W-/C-: torch_dist mHC off and on, legacy
# off; issue 14)
MAX_BRANCH_BYTES = 5 * 1024 * 1024 + 896 * 1024


def _sums(bdir: Path) -> dict[str, str]:
    sums = {}
    for line in (bdir / "SHA256SUMS").read_text().splitlines():
        digest, rel = line.split(maxsplit=1)
        assert rel not in sums, f"{rel} listed twice"
        sums[rel] = digest
    return sums


def _fixtures(bdir: Path) -> list[Path]:
    found = sorted(p.parent for p in bdir.glob("*/keys.json"))
    assert found, f"no fixtures in {bdir}"
    return found


ALL = [(b, f.name) for b in BRANCHES for f in _fixtures(EXTERNAL / b)] if all(
    (EXTERNAL / b / "SHA256SUMS").is_file() for b in BRANCHES) else []


@pytest.mark.parametrize("branch", sorted(BRANCHES))
def test_checksums(branch: str):
    bdir = EXTERNAL / branch
    assert (bdir / "SHA256SUMS").is_file(), f"{bdir}/SHA256SUMS missing"
    sums = _sums(bdir)
    for rel, digest in sums.items():
        path = bdir / rel
        assert path.is_file(), f"{branch}: {rel} is listed in SHA256SUMS but missing"
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digest, f"{branch}: {rel} changed"
    on_disk = {p.relative_to(bdir).as_posix() for p in bdir.rglob("*") if p.is_file()}
    assert on_disk - {"SHA256SUMS"} == set(sums), "files not in SHA256SUMS: " + str(
        sorted(on_disk - {"SHA256SUMS"} - set(sums)))
    assert sum((bdir / r).stat().st_size for r in sums) < MAX_BRANCH_BYTES


@pytest.mark.parametrize("branch", sorted(BRANCHES))
def test_readme_names_the_commit(branch: str):
    readme = (EXTERNAL / branch / "README.md").read_text()
    assert BRANCHES[branch] in readme
    assert "fixtures/megatron/make.py" in readme


def test_every_branch_has_fixtures():
    assert {b for b, _ in ALL} == set(BRANCHES)


@pytest.mark.parametrize(("branch", "name"), ALL)
def test_checkpoint_layout(branch: str, name: str):
    fdir = EXTERNAL / branch / name
    info = json.loads((fdir / "keys.json").read_text())
    tracker = fdir / "latest_checkpointed_iteration.txt"
    assert tracker.is_file(), f"{name}: no tracker"
    iteration = int(tracker.read_text().strip())
    assert iteration == info["iteration"]
    idir = fdir / f"iter_{iteration:07d}"
    assert idir.is_dir(), f"{name}: no {idir.name}/"
    tp, pp = info["tp"], info["pp"]
    if info["format"] == "torch_dist":
        assert (idir / ".metadata").is_file(), f"{name}: no .metadata"
        meta = json.loads((idir / "metadata.json").read_text())
        assert meta["sharded_backend"] == "torch_dist"
        assert sorted(p.name for p in idir.glob("__*_*.distcp")) == [
            f"__{r}_0.distcp" for r in range(tp * pp)]
        has_common_pt = (idir / "common.pt").is_file()
        has_common_state = any(k.startswith("common_state/") for k in info["other"])
        assert has_common_pt != has_common_state, f"{name}: common.pt xor common_state expected"
        assert set(info["common"]) >= {"args", "checkpoint_version", "iteration"}
        assert info["keys"], f"{name}: no model keys"
    else:
        assert info["format"] == "torch"
        if pp == 1:
            want = {f"mp_rank_{t:02d}" for t in range(tp)}
        else:
            want = {f"mp_rank_{t:02d}_{p:03d}" for t in range(tp) for p in range(pp)}
        assert {p.name for p in idir.iterdir()} == want, f"{name}: rank directories"
        for rank in want:
            rel = f"iter_{iteration:07d}/{rank}/model_optim_rng.pt"
            assert (fdir / rel).is_file(), f"{name}: no {rel}"
            assert info["files"][rel], f"{name}: {rel} has no model keys"
            assert {"args", "checkpoint_version", "iteration"} <= set(info["other"][rel])


@pytest.mark.parametrize(("branch", "name"), ALL)
def test_mhc_keys_match_flag(branch: str, name: str):
    """mHC-on fixtures carry the wrapper layout and the learned head; mHC-off ones do not."""
    info = json.loads((EXTERNAL / branch / name / "keys.json").read_text())
    assert info["args"]["enable_hyper_connections"] is info["mhc"]
    every = set(info["keys"]) if "keys" in info else set().union(
        *(set(v) for v in info["files"].values()))
    layer_keys = {k for k in every if k.startswith("decoder.layers.")}
    if info["mhc"]:
        assert all(".inner_layer." in k or ".hyper_connection." in k for k in layer_keys)
        assert any(k.endswith("hyper_connection.alpha_res") for k in layer_keys)
        assert {"decoder.hc_head_fn", "decoder.hc_head_base", "decoder.hc_head_scale"} <= every
    else:
        assert not any(".inner_layer." in k or "hyper_connection" in k or "hc_head" in k
                       for k in every)
