"""I/O faults and concurrency (research/reliability.md F5, F6, F11), plus the hash-while-writing
manifest: ENOSPC/EACCES from the fault hooks and from real small/read-only filesystems exit 5
with one line and leave nothing behind; two conversions to one DST: one wins, one is "locked";
digests computed while writing equal a fresh hash in both copy modes; linked files are recorded
without being read and ``verify`` checks what it promises for them."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mhc_convert import hashcopy
from mhc_convert.cli import app
from mhc_convert.hooks import Hooks
from mhc_convert.manifest import verify_manifest
from mhc_model.model import HybridModel
from tests.model.helpers import perturb_norms_, tiny_config
from tests.paths import MEGATRON_FIXTURE, ROOT

runner = CliRunner()


def tree_sha(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def ours(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".mhc-" in p.name)


@pytest.fixture
def native(tmp_path) -> Path:
    torch.manual_seed(0)
    model = HybridModel(tiny_config("M-M*-M-"))
    perturb_norms_(model, 0)
    model.save_pretrained(tmp_path / "src", max_shard_bytes=60_000)
    return tmp_path / "src"


@pytest.fixture
def dist(tmp_path) -> Path:
    shutil.copytree(MEGATRON_FIXTURE, tmp_path / "dist", copy_function=shutil.copyfile)
    return tmp_path / "dist"


def convert(src: Path, dst: Path, *extra: str, env: dict[str, str] | None = None):
    """The CLI in-process; ``env``: the hook variables ``main`` would read (hooks.py)."""
    r = runner.invoke(app, ["enable", str(src), str(dst), "--quiet", *extra],
                      obj=Hooks.from_env(env or {}))
    errors = [line for line in r.output.splitlines() if line.startswith("mhc-convert: error")]
    return r.exit_code, errors, r.output


def assert_failed_cleanly(src: Path, sha: dict, dst: Path, code: int, errors: list[str],
                          output: str) -> str:
    assert code == 5, output
    assert len(errors) == 1, output  # exactly one line
    assert not dst.exists() and ours(dst.parent) == []
    assert tree_sha(src) == sha
    return errors[0]


# ------------------------------------------------------------------------------ fault hooks
@pytest.mark.parametrize("offset", [10, 70_000, 150_000])
def test_enospc_mid_write_exit5_need_vs_free_and_temp_removed(native, tmp_path, offset):
    sha = tree_sha(native)
    code, errors, out = convert(native, tmp_path / "out", env={"MHC_FAULT": f"enospc@{offset}"})
    msg = assert_failed_cleanly(native, sha, tmp_path / "out", code, errors, out)
    assert "ENOSPC" in msg and "temporary output removed" in msg
    m = re.search(r"need (\d+) bytes .* have (\d+) bytes .* free", msg)
    assert m, msg
    source_bytes = sum(p.stat().st_size for p in native.glob("*.safetensors"))
    assert 0.95 * source_bytes < int(m[1]) < 2 * source_bytes, msg  # + the new mHC params
    assert convert(native, tmp_path / "out")[0] == 0  # nothing stale blocks the re-run


def test_enospc_preflight_fault(native, tmp_path):
    sha = tree_sha(native)
    code, errors, out = convert(native, tmp_path / "out", env={"MHC_FAULT": "enospc"})
    msg = assert_failed_cleanly(native, sha, tmp_path / "out", code, errors, out)
    assert "need" in msg and "have 0 bytes free" in msg, msg


@pytest.mark.parametrize("fault", ["eacces", "eacces@50000"])
def test_eacces_fault_exit5_and_temp_removed(native, tmp_path, fault):
    sha = tree_sha(native)
    code, errors, out = convert(native, tmp_path / "out", env={"MHC_FAULT": fault})
    msg = assert_failed_cleanly(native, sha, tmp_path / "out", code, errors, out)
    assert "EACCES" in msg, msg


def test_fault_through_the_real_cli(native, tmp_path):
    """The same through ``python -m mhc_convert`` (stderr is exactly one line)."""
    sha = tree_sha(native)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MHC_FAULT": "enospc@70000"}
    r = subprocess.run([sys.executable, "-m", "mhc_convert", "enable", str(native),
                        str(tmp_path / "out"), "--quiet"], env=env, capture_output=True,
                       text=True)
    assert r.returncode == 5, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "ENOSPC" in r.stderr, r.stderr
    assert not (tmp_path / "out").exists() and ours(tmp_path) == [] and tree_sha(native) == sha


# ------------------------------------------------------------------------------ real filesystems
@contextlib.contextmanager
def tmpfs(path: Path, *opts: str):
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(opts), "tmpfs", str(path)],
                       capture_output=True, text=True)
    if r.returncode != 0:  # a failure, not a skip: these are the only real-filesystem checks
        pytest.fail(f"cannot mount a tmpfs at {path} (run the tests as root or with "
                    f"CAP_SYS_ADMIN): {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_real_1m_tmpfs_refuses_bigger_checkpoint(dist, tmp_path):
    sha = tree_sha(dist)
    assert sum(p.stat().st_size for p in dist.rglob("*") if p.is_file()) > 1 << 20
    with tmpfs(tmp_path / "small", "size=1m") as mnt:
        code, errors, out = convert(dist, mnt / "out")
        msg = assert_failed_cleanly(dist, sha, mnt / "out", code, errors, out)
        assert "ENOSPC" in msg and "need" in msg and "free" in msg, msg
        assert list(mnt.iterdir()) == []


def test_real_enospc_mid_write_on_tmpfs(dist, tmp_path):
    """The free-space preflight counts tensor bytes (+5%); torch_dist's zip framing makes the
    output bigger, so a tmpfs sized in between passes preflight and fills up mid-write."""
    sha = tree_sha(dist)
    with tmpfs(tmp_path / "mid", "size=2700k") as mnt:
        code, errors, out = convert(dist, mnt / "out")
        msg = assert_failed_cleanly(dist, sha, mnt / "out", code, errors, out)
        assert "ENOSPC" in msg and "need 2453095 bytes" in msg and "free" in msg, msg
        assert list(mnt.iterdir()) == []


def _unprivileged(cmd: list[str]) -> list[str]:
    """``cmd`` as an ordinary user. Root ignores permission bits, so as root it runs through
    ``setpriv`` as nobody (no supplementary groups, no capabilities)."""
    if os.geteuid() != 0:
        return cmd
    setpriv = shutil.which("setpriv")
    assert setpriv, "running as root: this test needs setpriv (util-linux) to drop privileges"
    return [setpriv, f"--reuid={NOBODY.pw_uid}", f"--regid={NOBODY.pw_gid}", "--clear-groups",
            *cmd]


NOBODY = pwd.getpwnam("nobody")


def test_readonly_parent_chmod(native):
    """A real EACCES: the destination's parent belongs to the converting user but is mode 0555.
    As root the conversion runs as nobody (``_unprivileged``), so this runs either way; its
    files live in a world-readable temp dir (pytest's tmp_path is root-only)."""
    with tempfile.TemporaryDirectory(prefix="mhc-eacces-") as d:
        base = Path(d)
        base.chmod(0o755)
        src = Path(shutil.copytree(native, base / "src"))
        for p in [src, *src.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)
        parent = base / "ro"
        parent.mkdir()
        if os.geteuid() == 0:
            os.chown(parent, NOBODY.pw_uid, NOBODY.pw_gid)  # nobody owns it, and may not write
        parent.chmod(0o555)
        sha = tree_sha(src)
        env = {**os.environ, "PYTHONPATH": str(ROOT), "HOME": d, "PYTHONDONTWRITEBYTECODE": "1"}
        try:
            r = subprocess.run(_unprivileged([sys.executable, "-m", "mhc_convert", "enable",
                                              str(src), str(parent / "out"), "--quiet"]),
                               env=env, capture_output=True, text=True, timeout=300)
            errors = [line for line in r.stderr.splitlines()
                      if line.startswith("mhc-convert: error")]
            assert r.returncode == 5 and len(errors) == 1 and "EACCES" in errors[0], r.stderr
            assert len(r.stderr.strip().splitlines()) == 1, r.stderr
            assert list(parent.iterdir()) == [] and tree_sha(src) == sha
        finally:
            parent.chmod(0o755)


def test_readonly_parent_ro_mount(native, tmp_path):
    sha = tree_sha(native)
    with tmpfs(tmp_path / "romnt", "size=4m", "ro") as mnt:
        code, errors, out = convert(native, mnt / "out")
        assert code == 5 and len(errors) == 1, out
        assert "not writable" in errors[0] or "EROFS" in errors[0], errors
        assert list(mnt.iterdir()) == [] and tree_sha(native) == sha


# ------------------------------------------------------------------------------ concurrency
def test_two_conversions_same_dst_one_wins_other_locked(native, tmp_path):
    dst, hold = tmp_path / "out", tmp_path / "hold"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "mhc_convert", "enable", str(native), str(dst), "--quiet"]
    a = subprocess.Popen(cmd, env={**env, "MHC_HOLD_AT": "after-tmpdir",
                                   "MHC_HOLD_FILE": str(hold)}, stderr=subprocess.PIPE,
                         text=True)
    try:
        deadline = time.monotonic() + 120
        while not hold.exists():  # A holds the lock and has its temp dir
            assert a.poll() is None and time.monotonic() < deadline, a.stderr.read()
            time.sleep(0.01)
        b = subprocess.run(cmd, env=env, capture_output=True, text=True)
    finally:
        hold.unlink(missing_ok=True)
        _, a_err = a.communicate(timeout=120)
    assert a.returncode == 0, a_err
    assert b.returncode == 5 and "locked" in b.stderr, b.stderr
    assert len(b.stderr.strip().splitlines()) == 1
    assert verify_manifest(dst) == [] and ours(tmp_path) == []


@pytest.mark.parametrize("at", ["after-lock", "after-tmpdir"])
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)],
                         ids=["SIGTERM", "SIGINT"])
def test_signal_right_after_lock_or_tmpdir_cleans_up(native, tmp_path, at, sig, code):
    """The real CLI, held just after it took the lock (or made its temp dir), gets SIGTERM or
    SIGINT: it exits 143 / 130 (DESIGN.md §6) with one error line and leaves no lock, no temp
    dir and no output (the SIGTERM handler must be in place before anything is created)."""
    parent, hold = tmp_path / "p", tmp_path / "hold"
    parent.mkdir()
    sha = tree_sha(native)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MHC_HOLD_AT": at, "MHC_HOLD_FILE": str(hold)}
    proc = subprocess.Popen([sys.executable, "-m", "mhc_convert", "enable", str(native),
                             str(parent / "out"), "--quiet"], env=env, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 120
        while not hold.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.01)
        assert any(p.name.endswith(".mhc-lock") for p in parent.iterdir())  # held right there
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        hold.unlink(missing_ok=True)
        if proc.poll() is None:
            proc.kill()
    assert sorted(p.name for p in parent.iterdir()) == [], err  # no lock, temp dir, output
    assert proc.returncode == code, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("mhc-convert: error:"), err
    assert tree_sha(native) == sha


# ------------------------------------------------------------------------------ manifest
def manifest(d: Path) -> dict:
    return json.loads((d / "mhc-manifest.json").read_text())


@pytest.mark.parametrize("mode", ["user", "kernel", "kernel-refused"])
def test_digests_written_in_one_pass_match_fresh_hashes(native, tmp_path, monkeypatch, mode):
    if mode == "kernel-refused":  # e.g. cross-device on old kernels: falls back to user copy
        import errno

        def refuse(*a, **k):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        monkeypatch.setattr(os, "copy_file_range", refuse)
    monkeypatch.setattr(hashcopy, "CHUNK", 4096)  # many chunks: buffer rotation is exercised
    out = tmp_path / f"out-{mode}"
    assert convert(native, out, env={"MHC_COPY_MODE": mode.split("-")[0]})[0] == 0
    m = manifest(out)
    assert m["version"] == 2 and m["hashed_at_commit"] == 0  # nothing re-read at commit
    for rel, rec in m["files"].items():
        assert rec["sha256"] == hashlib.sha256((out / rel).read_bytes()).hexdigest(), rel
    monkeypatch.undo()
    ref = tmp_path / "ref"
    assert convert(native, ref)[0] == 0  # default mode, default chunk size
    got, want = tree_sha(out), tree_sha(ref)
    got.pop("mhc-manifest.json"), want.pop("mhc-manifest.json")  # timestamps, pid
    assert got == want  # every mode writes identical bytes
    assert manifest(out)["files"] == manifest(ref)["files"]
    shard = sorted(out.glob("model-*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    assert any(shard.name in p and "sha256" in p for p in verify_manifest(out))


def test_hardlinked_files_recorded_without_reading(dist, tmp_path):
    out = tmp_path / "hl"
    assert convert(dist, out, "--link", "hardlink")[0] == 0
    m = manifest(out)
    data = "iter_0001000/__0_0.distcp"
    rec = m["files"][data]
    assert rec["link"] == "hardlink" and rec["sha256"] is None
    assert m["hashed_at_commit"] < 4096  # only the small marker files, never linked data
    assert os.path.samefile(out / data, dist / data)
    assert verify_manifest(out) == []
    r = runner.invoke(app, ["inspect", str(out), "--verify"])
    assert r.exit_code == 0, r.output
    copied = tmp_path / "copied"  # new inodes: size is all that can be checked
    shutil.copytree(out, copied)
    assert verify_manifest(copied) == []
    with open(dist / data, "r+b") as f:  # an in-place write to the shared inode
        f.seek(100)
        f.write(b"\xff")
    os.utime(dist / data, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert any("modified after the conversion" in p for p in verify_manifest(out))
    with open(copied / data, "ab") as f:
        f.write(b"x")
    assert any("size" in p for p in verify_manifest(copied))
