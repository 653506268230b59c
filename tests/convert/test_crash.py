"""Crash consistency of ``mhc-convert enable`` (research/reliability.md F3): the real CLI
(``python -m mhc_convert enable SRC DST``) is SIGKILLed at named phase hooks (``MHC_CRASH_AT``,
``name:N`` = its N-th call) and at seeded-random times inside its write window. Every time:

* the source is unchanged (sha256 of every file),
* DST is absent, or complete and valid: ``mhc-convert inspect DST --verify`` exits 0 and
  ``parity.load_model(DST)`` loads it; which of the two is fixed by where a named kill landed
  (absent before the rename, present from the rename on),
* ``mhc-convert clean PARENT`` leaves none of our temp/lock entries behind, and
* a re-run of the conversion succeeds and verifies.

Kill points are enumerated, not guessed: one in-process conversion per checkpoint with a
phase log (``Hooks.phase_log``, what ``MHC_PHASE_LOG`` sets) lists every ``name:N`` the writer
passes. Kills run 3 at a time (a thread pool of subprocesses); the checks run in this process
meanwhile. ``MHC_CRASH_KILLS`` scales the number of kills per format (default 20: native = 10
single-file + 10 sharded, torch_dist 20, legacy 20).
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mhc_convert import engine
from mhc_convert.cli import app
from mhc_convert.hooks import Hooks
from mhc_convert.parity import load_model
from mhc_model.model import HybridModel
from tests.model.helpers import perturb_norms_, tiny_config
from tests.paths import MEGATRON_FIXTURE, ROOT

KILLS = int(os.environ.get("MHC_CRASH_KILLS", "20"))
RANDOM_SHARE = 0.25  # of each format's kills are at random times, the rest at named points
# Kills at these phases (or later ones) find DST published; before them DST must be absent.
PUBLISHED_FROM = ("before-parent-fsync", "after-rename")
# commit phases, most telling first (the two sides of the rename, then the rest)
COMMIT_ORDER = ("before-rename", "after-rename", "after-lock", "after-tmpdir", "after-manifest",
                "after-marker", "before-manifest", "before-parent-fsync", "commit-start",
                "after-staging")
runner = CliRunner()


def tree_sha(root: Path) -> dict[str, str]:
    out = {}
    for dirpath, _, names in os.walk(root):
        for n in names:
            p = Path(dirpath) / n
            out[p.relative_to(root).as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def ours(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".mhc-" in p.name)


# ------------------------------------------------------------------------------ checkpoints
def make_native(root: Path, sharded: bool) -> Path:
    torch.manual_seed(0)
    model = HybridModel(tiny_config("M-M*-M-"))
    perturb_norms_(model, 0)
    model.save_pretrained(root, **({"max_shard_bytes": 40_000} if sharded else {}))
    return root


def make_dist(root: Path) -> Path:
    shutil.copytree(MEGATRON_FIXTURE, root, copy_function=shutil.copyfile)
    return root


def make_legacy(root: Path) -> Path:
    from fixtures.legacy_writer import make_rank_payload, write_legacy_checkpoint
    from tests.convert.test_legacy_engine import CFG, _args

    torch.manual_seed(0)
    model = HybridModel(CFG)
    perturb_norms_(model, 0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(0, CFG.vocab_size, (2, 8))).square().mean().backward()
    opt.step()
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    payload = make_rank_payload(sd, optimizer=None, args_overrides=_args(CFG))
    payload["optimizer"] = opt.state_dict()
    write_legacy_checkpoint(root, 100, {(0, 0): payload})
    return root


@dataclass
class Variant:
    name: str
    make: object
    kills: int
    priority: str  # which kill points are taken first: "commit" or "writer"


VARIANTS = [Variant("native-single", lambda p: make_native(p, False), KILLS // 2, "commit"),
            Variant("native-sharded", lambda p: make_native(p, True), KILLS - KILLS // 2,
                    "writer"),
            Variant("torch_dist", make_dist, KILLS, "commit"),
            Variant("legacy", make_legacy, KILLS, "writer")]


# ------------------------------------------------------------------------------ kill points
def calibrate(src: Path, work: Path) -> tuple[list[str], float]:
    """Every ``name:N`` point an in-process conversion passes, in order, and the seconds from
    taking the lock to publishing (the window random kills aim at)."""
    log = work / "phases.log"
    engine.enable(src, work / "calibration-out", hooks=Hooks.from_env({"MHC_PHASE_LOG": str(log)}))
    rows = [line.split() for line in log.read_text().splitlines()]
    points = [r[0] for r in rows]
    assert points[0] == "after-lock:1" and points[-1] == "after-rename:1", points
    return points, float(rows[-1][1]) - float(rows[0][1])


def pick(points: list[str], n: int, priority: str, rng: random.Random) -> list[str]:
    """``n`` distinct points: the priority class first (every commit phase, or the first/last
    file and copy points of the writer), then a seeded sample of the rest."""
    commit_pts = sorted((p for p in points if p.split(":")[0] in COMMIT_ORDER),
                        key=lambda p: COMMIT_ORDER.index(p.split(":")[0]))
    writer_pts = [p for p in points if p not in commit_pts]
    edge = sorted({writer_pts[0], writer_pts[-1], writer_pts[len(writer_pts) // 2],
                   *[p for p in writer_pts if p.startswith("file-done")][-1:]},
                  key=points.index)
    first = commit_pts + edge if priority == "commit" else edge + commit_pts
    rest = [p for p in points if p not in first]
    chosen = (first + rng.sample(rest, min(len(rest), n)))[:n]
    assert len(set(chosen)) == len(chosen) == n, (n, len(points))
    return chosen


def expect_published(point: str, points: list[str]) -> bool:
    first_pub = min(i for i, p in enumerate(points) if p.split(":")[0] in PUBLISHED_FROM)
    return points.index(point) >= first_pub


# ------------------------------------------------------------------------------ one kill
def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "mhc_convert", *args]


def kill_run(src: Path, dst: Path, point: str | None, delay: float | None) -> int:
    """The real CLI converting src -> dst, killed at ``point`` (named) or ``delay`` seconds
    after it took its lock (random). Returns the exit status (-9 = killed)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("MHC_PHASE_LOG", None)
    if point is not None:
        env["MHC_CRASH_AT"] = point
    proc = subprocess.Popen(cli("enable", str(src), str(dst), "--quiet"), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if delay is not None:
        lock = dst.parent / f".{dst.name}.mhc-lock"
        while proc.poll() is None and not lock.exists():
            time.sleep(0.001)
        time.sleep(delay)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=300)
    if point is not None and proc.returncode != -signal.SIGKILL:
        raise AssertionError(f"{point}: not reached (exit {proc.returncode}): {err.decode()}")
    return proc.returncode


def assert_valid_output(dst: Path) -> None:
    r = runner.invoke(app, ["inspect", str(dst), "--verify", "--json"])
    assert r.exit_code == 0, r.output
    model = load_model(dst)
    assert any(".inner_layer." in k for k in model.state_dict())


def check_after_kill(src: Path, src_sha: dict, dst: Path, published: bool | None) -> str:
    assert tree_sha(src) == src_sha, "source changed"
    parent = dst.parent
    if dst.exists():
        assert published in (None, True), f"{dst} published before the rename phase"
        assert_valid_output(dst)
        outcome = "published"
    else:
        assert published in (None, False), f"{dst} absent after the rename"
        outcome = "absent+tmp" if any(".mhc-tmp-" in n for n in ours(parent)) else "absent"
    r = runner.invoke(app, ["clean", str(parent), "--json"])
    assert r.exit_code == 0, r.output
    assert ours(parent) == [], ours(parent)
    args = ["enable", str(src), str(dst), "--quiet"] + (["--overwrite"] if dst.exists() else [])
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert_valid_output(dst)
    assert ours(parent) == [] and tree_sha(src) == src_sha
    return outcome


# ------------------------------------------------------------------------------ the test
def test_sigkill_anywhere_leaves_source_intact_and_output_absent_or_valid(tmp_path):
    t0 = time.perf_counter()
    rng = random.Random(20261126)
    cases = []
    for v in VARIANTS:
        work = tmp_path / v.name
        work.mkdir()
        src = v.make(work / "src")
        points, window = calibrate(src, work)
        n_random = max(1, round(v.kills * RANDOM_SHARE))
        for i, point in enumerate(pick(points, v.kills - n_random, v.priority, rng)):
            cases.append((v.name, src, work / f"k{i}" / "out", point, None,
                          expect_published(point, points)))
        for i in range(n_random):
            cases.append((v.name, src, work / f"r{i}" / "out", None,
                          rng.uniform(0, 1.3 * window), None))
    shas = {src: tree_sha(src) for _, src, *_ in cases}
    for _, _, dst, *_ in cases:
        dst.parent.mkdir()
    outcomes: dict[str, dict[str, int]] = {}
    with ThreadPoolExecutor(3) as pool:
        futs = {pool.submit(kill_run, src, dst, point, delay): (name, src, dst, point, pub)
                for name, src, dst, point, delay, pub in cases}
        for fut in as_completed(futs):
            name, src, dst, point, pub = futs[fut]
            rc = fut.result()
            try:
                outcome = check_after_kill(src, shas[src], dst, pub)
            except AssertionError as e:
                raise AssertionError(f"{name} {point or 'random'} (exit {rc}): {e}") from e
            key = f"{outcome}{'' if rc == -9 else ' (finished first)'}"
            per = outcomes.setdefault(name, {})
            per[key] = per.get(key, 0) + 1
    per_format = {"native": sum(v.kills for v in VARIANTS[:2]),
                  "torch_dist": VARIANTS[2].kills, "legacy": VARIANTS[3].kills}
    print(f"\ncrash test: {len(cases)} kills {per_format} in {time.perf_counter() - t0:.1f} s;"
          f" outcomes {outcomes}")
    assert all(n >= KILLS for n in per_format.values())
    assert len(cases) == sum(v.kills for v in VARIANTS)


@pytest.mark.parametrize("point", ["after-tmpdir", "mid-copy:2", "before-rename"])
def test_clean_removes_only_our_dead_temp_dirs(tmp_path, point):
    """After a kill, ``clean`` removes the killed run's temp dir and lock but never a user's
    directory that merely looks similar, nor a live conversion's temp dir."""
    src = make_native(tmp_path / "src", sharded=False)
    parent = tmp_path / "p"
    parent.mkdir()
    assert kill_run(src, parent / "out", point, None) == -9
    left = ours(parent)
    assert any(".mhc-tmp-" in n for n in left), left
    user = parent / ".out.mhc-tmp-notours"  # not our name pattern (hex)
    user.mkdir()
    unmarked = parent / ".x.mhc-tmp-0123456789abcdef"  # our pattern, but no marker/manifest
    (unmarked / "data.bin").parent.mkdir()
    (unmarked / "data.bin").write_bytes(b"user data")
    r = runner.invoke(app, ["clean", str(parent)])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in parent.iterdir()) == sorted([user.name, unmarked.name])
