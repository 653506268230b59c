"""Distributed conversion (``torchrun -m mhc_convert enable``): the output is the single-process
output, file for file and tensor for tensor; a failing rank leaves nothing behind.

torchrun launches are slow on a small CPU box (each rank imports torch), so there are five
(native and torch_dist with K=1 and K=2, and the injected fault) and they run concurrently.
The coordination protocol itself is tested in-process against a real c10d TCPStore."""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import mhc_convert
from mhc_convert import distributed
from mhc_convert.adapters import adapter_for, detect_format
from mhc_convert.distributed import DistContext, RemoteError, split_units
from mhc_convert.errors import IOFailure
from mhc_convert.formats.torch_dist import read_metadata
from mhc_convert.hooks import Hooks
from mhc_model import HybridModel
from tests.model.helpers import tiny_config
from tests.paths import MEGATRON_FIXTURE, ROOT

MANIFEST = "mhc-manifest.json"
TD_METADATA = "iter_0001000/.metadata"  # carries a fresh DCP save_id on every save


# --------------------------------------------------------------------------------- helpers
def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _files(root: Path) -> dict[str, Path]:
    return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()}


class _Launch:
    """``torchrun --standalone --nproc-per-node K -m mhc_convert ARGS`` started now, in the
    background (the launches run concurrently: each spends most of its time importing torch)."""

    def __init__(self, log: Path, k: int, *args: str, env: dict[str, str] | None = None):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={k}", "-m", "mhc_convert", *args]
        full_env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        for var in ("MHC_FAIL_RANK", "MHC_CRASH_AT", "MHC_FAULT", "MHC_DISTRIBUTED"):
            full_env.pop(var, None)
        full_env.update(env or {})
        self.out, self.err = log.with_suffix(".out"), log.with_suffix(".err")
        with open(self.out, "w") as o, open(self.err, "w") as e:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=o, stderr=e)

    def result(self) -> tuple[int, str, str]:
        try:
            rc = self.proc.wait(timeout=240)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        return rc, self.out.read_text(), self.err.read_text()


def _assert_same_output(ref: Path, out: Path, *, volatile: tuple[str, ...] = ()) -> None:
    """Every file byte-identical (sha256) except the manifest (timestamps) and ``volatile``;
    the manifests list the same files with the same hashes, and each hash is the file's."""
    fr, fo = _files(ref), _files(out)
    assert fr.keys() == fo.keys()
    for rel in fr:
        if rel != MANIFEST and rel not in volatile:
            assert _sha(fr[rel]) == _sha(fo[rel]), rel
    manifests = [json.loads(f[MANIFEST].read_text()) for f in (fr, fo)]
    # rank 0 adopts the other ranks' write-time digests: it re-reads no more than one process
    assert manifests[1].get("hashed_at_commit") == manifests[0].get("hashed_at_commit")
    mr, mo = (m["files"] for m in manifests)
    assert mr.keys() == mo.keys() == set(fr) - {MANIFEST}
    for rel, info in mo.items():
        assert info["sha256"] == _sha(fo[rel]), rel
        if rel not in volatile:
            assert info == mr[rel], rel
    va, vb = (adapter_for(detect_format(p)).read(p) for p in (ref, out))
    assert list(va.entries) == list(vb.entries)
    for key in va.entries:
        a, b = va.load(key), vb.load(key)
        if isinstance(a, torch.Tensor):
            assert a.dtype == b.dtype and torch.equal(a, b), key
        else:
            assert a == b, key


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.suffix not in (".out", ".err"))


@pytest.fixture(scope="module")
def jobs(tmp_path_factory) -> dict[str, tuple[Path, Path, _Launch]]:
    """Sources, single-process references, and every torchrun launch, started together:
    name -> (source, reference output, launch); each launch writes ``<its dir>/out``."""
    root = tmp_path_factory.mktemp("dist")
    torch.manual_seed(0)
    native = root / "native"
    HybridModel(tiny_config("M-M*-M-")).save_pretrained(native, max_shard_bytes=40_000)
    assert len(list(native.glob("model-*.safetensors"))) >= 4  # several units to divide
    run = root / "run"
    shutil.copytree(MEGATRON_FIXTURE, run, copy_function=shutil.copyfile)
    for d, _, _ in os.walk(run):
        os.chmod(d, 0o755)  # the shipped fixture may be read-only
    specs = {"native1": (native, 1, ["--json"], None), "native2": (native, 2, ["--json"], None),
             "dist1": (run, 1, ["-q"], None), "dist2": (run, 2, ["-q"], None),
             "fail2": (native, 2, ["-q"], {"MHC_FAIL_RANK": "1"})}
    out = {}
    for name, (src, k, extra, env) in specs.items():
        (root / name).mkdir()
        out[name] = (src, root / name, _Launch(root / name / "torchrun", k, "enable", str(src),
                                                str(root / name / "out"), *extra, env=env))
    for src in (native, run):  # the single-process references, meanwhile
        mhc_convert.enable(src, root / f"ref-{src.name}")
    return {name: (src, root / f"ref-{src.name}", launch)
            for name, (src, _, launch) in out.items()}


def _dir(launch: _Launch) -> Path:
    return launch.out.parent


# ------------------------------------------------------------------------ torchrun launches
@pytest.mark.parametrize("k", [1, 2])
def test_native_matches_single_process(jobs, k: int) -> None:
    _, ref, launch = jobs[f"native{k}"]
    rc, stdout, stderr = launch.result()
    assert rc == 0, stderr[-3000:]
    reports = [line for line in stdout.splitlines() if line.startswith("{")]
    assert len(reports) == 1 and json.loads(reports[0])["ok"]  # only rank 0 prints
    _assert_same_output(ref, _dir(launch) / "out")
    assert _leftovers(_dir(launch)) == ["out"]  # and no temp dir


@pytest.mark.parametrize("k", [1, 2])
def test_torch_dist_matches_single_process(jobs, k: int) -> None:
    _, ref, launch = jobs[f"dist{k}"]
    rc, _, stderr = launch.result()
    assert rc == 0, stderr[-3000:]
    out = _dir(launch) / "out"
    _assert_same_output(ref, out, volatile=(TD_METADATA,))
    a, b = (read_metadata(d / "iter_0001000") for d in (ref, out))
    assert a.state_dict_metadata == b.state_dict_metadata
    assert a.storage_data == b.storage_data and a.planner_data == b.planner_data
    assert a.storage_meta.checkpoint_id == b.storage_meta.checkpoint_id


def test_failing_rank_aborts_every_rank(jobs) -> None:
    src, _, launch = jobs["fail2"]
    rc, _, err = launch.result()
    assert rc != 0
    # rank 1 reports its own fault, rank 0 the same message attributed to rank 1
    assert "mhc-convert: error: injected fault on rank 1" in err, err[-3000:]
    assert "mhc-convert: error: rank 1: injected fault on rank 1" in err, err[-3000:]
    codes = [line.split(":", 1)[1].split()[0] for line in err.splitlines()
             if line.strip().startswith("exitcode")]
    assert sorted(codes) == ["5", "5"], err[-3000:]  # both ranks: I/O failure, not a signal
    assert _leftovers(_dir(launch)) == []  # no DST, no temp dir
    assert (src / "config.json").is_file()


# ------------------------------------------------------------------- in-process protocol
def test_split_units_is_a_balanced_partition() -> None:
    units = [(f"f{i}", size) for i, size in enumerate([50, 10, 40, 0, 30, 30, 5, 0])]
    for world in (1, 2, 3, 8, 11):
        parts = split_units(units, world)
        assert parts == split_units(list(reversed(units)), world)  # order-independent
        assert set().union(*parts) == {n for n, _ in units}
        assert sum(len(p) for p in parts) == len(units)  # disjoint
    two = split_units(units, 2)
    loads = [sum(s for n, s in units if n in p) for p in two]
    assert abs(loads[0] - loads[1]) <= 10 and all(two)
    with pytest.raises(ValueError):
        split_units([("a", 1), ("a", 2)], 2)


@pytest.fixture
def store():
    s = dist.TCPStore("127.0.0.1", 0, 1, True, timeout=datetime.timedelta(seconds=10))
    return dist.PrefixStore(f"t{time.monotonic_ns()}/", s)


def _in_threads(*fns):
    out, errs = [None] * len(fns), [None] * len(fns)

    def run(i):
        try:
            out[i] = fns[i]()
        except BaseException as e:  # noqa: BLE001
            errs[i] = e

    ts = [threading.Thread(target=run, args=(i,)) for i in range(len(fns))]
    for t in ts:
        t.start()
    for t in ts:
        t.join(10)
    assert not any(t.is_alive() for t in ts), "a rank is still waiting"
    return out, errs


def test_agree_broadcast_and_close(store) -> None:
    c0, c1 = DistContext(store, 0, 2), DistContext(store.clone(), 1, 2)
    out, errs = _in_threads(lambda: (c0.broadcast_obj("/tmp/x", "tmp"), c0.agree("p", 0),
                                     c0.close()),
                            lambda: (c1.broadcast_obj(None, "tmp"), c1.agree("p", 1),
                                     c1.close()))
    assert errs == [None, None]
    assert out[0][:2] == out[1][:2] == ("/tmp/x", [0, 1])


def test_failure_on_one_rank_is_raised_on_the_others(store) -> None:
    c0, c1 = DistContext(store, 0, 2), DistContext(store.clone(), 1, 2)
    c1.fail(IOFailure("disk full", path="/o/x.safetensors"))
    _, (e,) = _in_threads(lambda: c0.barrier("written"))  # bounded: a hang fails the test
    assert isinstance(e, RemoteError), e
    assert e.exit_code == 5 and e.rank == 1
    assert e.one_line() == "rank 1: /o/x.safetensors: disk full"
    c0.fail(e)  # not re-posted: the first failure stays the one everybody reports
    with pytest.raises(RemoteError, match="rank 1: "):
        c1.check()
    _in_threads(c0.close, c1.close)


def test_dead_rank_is_detected_not_waited_for(store) -> None:
    store.add("hb/1", 1)  # rank 1 joined once, then died: its heartbeat never moves again
    c0 = DistContext(store, 0, 2, dead_after=0.6, join_timeout=0.6)
    _, (e,) = _in_threads(lambda: c0.barrier("written"))
    assert isinstance(e, IOFailure) and "rank 1 stopped responding" in str(e), e
    c0.close()  # returns: nobody left to wait for


def test_activation_needs_torchrun_or_opt_in(monkeypatch) -> None:
    def hooks() -> Hooks:  # what the CLI entry reads (MHC_DISTRIBUTED -> Hooks.distributed)
        return Hooks.from_env(os.environ)

    for var, val in zip(distributed.ENV, ("1", "2", "1", "127.0.0.1", "29500")):
        monkeypatch.setenv(var, val)
    monkeypatch.delenv("MHC_DISTRIBUTED", raising=False)
    # pytest's parent is not torchrun: a subprocess of a torchrun-launched trainer is not a rank
    assert not distributed.wanted(hooks()) and distributed.launched_rank(hooks()) is None
    monkeypatch.setenv("MHC_DISTRIBUTED", "1")
    assert distributed.wanted(hooks()) and distributed.launched_rank(hooks()) == 1
    monkeypatch.setenv("MHC_DISTRIBUTED", "0")
    assert not distributed.wanted(hooks())
    monkeypatch.delenv("MASTER_PORT")
    monkeypatch.setenv("MHC_DISTRIBUTED", "1")
    assert not distributed.wanted(hooks())
