"""The atomic-commit protocol: aliasing refusals, locking, cleanup on failure, overwrite order,
manifests, stale-dir cleanup, fault injection and SIGKILL at named phases."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mhc_convert import commit as C
from mhc_convert.errors import Interrupted, InvalidInputError, IOFailure, UsageError
from mhc_convert.hooks import Hooks

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def src(tmp_path):
    s = tmp_path / "src"
    s.mkdir()
    (s / "config.json").write_text('{"a": 1}')
    (s / "model.safetensors").write_bytes(b"x" * 100)
    return s


def _ao(dst, source, **kw):
    return C.AtomicOutput(dst, fingerprint=C.source_fingerprint(source), direction="enable",
                          tool_version="test", **kw)


def _marker(text="{}"):
    def write(d: Path) -> None:
        (d / "config.json").write_text(text)
    return write


def _commit(dst, src, payload=b"new", **kw):
    ao = _ao(dst, src, **kw)
    with ao as tmp:
        (tmp / "model.safetensors").write_bytes(payload)
        ao.commit(_marker())
    return dst


def _leftovers(parent):
    return sorted(p.name for p in parent.iterdir() if ".mhc-" in p.name)


# ---------------------------------------------------------------------------------- preflight

def test_preflight_ok_returns_resolved_paths(tmp_path, src):
    s, d = C.preflight(src / "." / ".." / "src", tmp_path / "out", overwrite=False)
    assert s == src.resolve() and d == (tmp_path / "out").resolve()


ALIASES = {"same": "is the source", "dotdot_same": "is the source", "inside": "inside the source",
           "src_inside_dst": "source is inside the destination",
           "symlink_to_src": "symlink to the source", "symlink_into_src": "symlink to the source",
           "symlinked_parent": "inside the source"}


@pytest.mark.parametrize("case", sorted(ALIASES))
def test_preflight_refuses_aliasing(tmp_path, src, case):
    if case == "same":
        dst = src
    elif case == "dotdot_same":
        (src / "sub").mkdir()
        dst = src / "sub" / ".." / ".." / "src"
    elif case == "inside":
        dst = src / "out"
    elif case == "src_inside_dst":
        dst = tmp_path
    elif case == "symlink_to_src":
        dst = tmp_path / "link"
        dst.symlink_to(src)
    elif case == "symlink_into_src":
        dst = tmp_path / "link"
        dst.symlink_to(src / "nonexistent")
    else:  # DST's parent is a symlink to SRC: DST lands inside SRC
        (tmp_path / "plink").symlink_to(src)
        dst = tmp_path / "plink" / "out"
    with pytest.raises(UsageError) as ei:
        C.preflight(src, dst, overwrite=True)
    assert ei.value.exit_code == 2 and "\n" not in str(ei.value)
    assert ALIASES[case] in str(ei.value)
    assert sorted(p.name for p in src.iterdir()) == ["config.json", "model.safetensors"] + (
        ["sub"] if case == "dotdot_same" else [])


def test_preflight_existing_dst(tmp_path, src):
    dst = tmp_path / "out"
    dst.mkdir()
    with pytest.raises(UsageError, match="--overwrite"):
        C.preflight(src, dst, overwrite=False)
    assert C.preflight(src, dst, overwrite=True)[1] == dst.resolve()
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(UsageError, match="not a directory"):
        C.preflight(src, f, overwrite=True)
    with pytest.raises(UsageError, match="parent"):
        C.preflight(src, tmp_path / "no" / "out", overwrite=False)


def test_preflight_refuses_hardlinked_files(tmp_path, src):
    dst = tmp_path / "out"
    dst.mkdir()
    os.link(src / "model.safetensors", dst / "model.safetensors")
    with pytest.raises(UsageError, match="hardlink"):
        C.preflight(src, dst, overwrite=True)


# ---------------------------------------------------------------------------------- protocol

def test_commit_publishes_complete_verified_output(tmp_path, src):
    dst = _commit(tmp_path / "out", src)
    assert sorted(p.name for p in dst.iterdir()) == ["config.json", "mhc-manifest.json",
                                                     "model.safetensors"]
    assert C.verify_manifest(dst) == []
    man = json.loads((dst / "mhc-manifest.json").read_text())
    assert set(man["files"]) == {"config.json", "model.safetensors"}  # the marker is covered
    assert man["direction"] == "enable" and man["source"]["files"]["config.json"]["sha256"]
    assert _leftovers(tmp_path) == []  # no temp dir, lock file removed


def test_manifest_detects_flipped_byte_extra_and_missing(tmp_path, src):
    dst = _commit(tmp_path / "out", src, payload=b"abcdef")
    with open(dst / "model.safetensors", "r+b") as f:
        f.seek(3)
        f.write(b"X")
    assert any("sha256" in p for p in C.verify_manifest(dst))
    (dst / "stray.bin").write_bytes(b"")
    (dst / "config.json").unlink()
    problems = C.verify_manifest(dst)
    assert any("stray.bin" in p and "extra" in p for p in problems)
    assert any("config.json" in p and "missing" in p for p in problems)
    (dst / "mhc-manifest.json").unlink()
    assert "manifest" in C.verify_manifest(dst)[0]


@pytest.mark.parametrize("exc, expected", [(RuntimeError("boom"), RuntimeError),
                                           (KeyboardInterrupt(), Interrupted),
                                           (OSError(28, "No space left on device"), IOFailure)])
def test_failure_inside_removes_temp_and_leaves_no_output(tmp_path, src, exc, expected):
    dst = tmp_path / "out"
    with pytest.raises(expected) as ei, _ao(dst, src) as tmp:
        (tmp / "model.safetensors").write_bytes(b"partial")
        raise exc
    assert not dst.exists() and _leftovers(tmp_path) == []
    if expected is IOFailure:
        assert "ENOSPC" in str(ei.value)
    _commit(dst, src)  # lock was released: the next run works


def test_block_without_commit_discards_output(tmp_path, src):
    with pytest.raises(RuntimeError, match="without commit"), _ao(tmp_path / "out", src) as tmp:
        (tmp / "f").write_bytes(b"x")
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_lock_held_by_another_process(tmp_path, src):
    dst = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import fcntl, os, sys
            fd = os.open({str(tmp_path / '.out.mhc-lock')!r}, os.O_RDWR | os.O_CREAT)
            fcntl.flock(fd, fcntl.LOCK_EX)
            print("locked", flush=True)
            sys.stdin.read()
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(IOFailure, match="locked by another conversion"), _ao(dst, src):
            pytest.fail("entered while locked")
        assert not dst.exists() and _leftovers(tmp_path) == [".out.mhc-lock"]
    finally:
        holder.communicate("")
    _commit(dst, src)


@pytest.mark.parametrize("exchange", [True, False])
def test_overwrite_keeps_old_until_new_is_in_place(tmp_path, src, monkeypatch, exchange):
    if not exchange:  # filesystems without renameat2(RENAME_EXCHANGE): aside-then-in path
        monkeypatch.setattr(C, "_rename2", lambda old, new, flags: False)
    dst = _commit(tmp_path / "out", src, payload=b"old")
    real_rmtree, removed = C.shutil.rmtree, []

    def rmtree(path, *a, **k):  # the old copy may only go once the new one is at dst
        if (Path(path) / "model.safetensors").exists():
            assert (Path(path) / "model.safetensors").read_bytes() == b"old"
            assert (dst / "model.safetensors").read_bytes() == b"new"
            removed.append(path)
        return real_rmtree(path, *a, **k)

    monkeypatch.setattr(C.shutil, "rmtree", rmtree)
    ao = _ao(dst, src, overwrite=True)
    with ao as tmp:
        (tmp / "model.safetensors").write_bytes(b"new")

        def marker(d):
            assert (dst / "model.safetensors").read_bytes() == b"old"  # still intact
            (d / "config.json").write_text("{}")
        ao.commit(marker)
    assert (dst / "model.safetensors").read_bytes() == b"new" and len(removed) == 1
    assert C.verify_manifest(dst) == [] and _leftovers(tmp_path) == []


def test_overwrite_rolls_back_when_rename_fails(tmp_path, src, monkeypatch):
    monkeypatch.setattr(C, "_rename2", lambda old, new, flags: False)
    dst = _commit(tmp_path / "out", src, payload=b"old")
    real_rename = os.rename

    def flaky(a, b):
        if ".mhc-tmp-" in str(a) and Path(b) == dst:
            raise OSError(5, "Input/output error", str(b))
        return real_rename(a, b)

    monkeypatch.setattr(C.os, "rename", flaky)
    ao = _ao(dst, src, overwrite=True)
    with pytest.raises(IOFailure, match="EIO"), ao as tmp:
        (tmp / "model.safetensors").write_bytes(b"new")
        ao.commit(_marker())
    assert (dst / "model.safetensors").read_bytes() == b"old"
    assert C.verify_manifest(dst) == [] and _leftovers(tmp_path) == []


def test_source_changed_during_conversion(tmp_path, src):
    ao = _ao(tmp_path / "out", src, src=src)
    with pytest.raises(InvalidInputError, match="source changed"), ao:
        (src / "config.json").write_text('{"a": 2}')
        ao.commit(_marker())
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------- faults

def test_free_space(tmp_path):
    C.check_free_space(tmp_path, 1)
    with pytest.raises(IOFailure, match=r"need \d+ bytes .* have \d+ bytes free"):
        C.check_free_space(tmp_path, 2**62)
    with pytest.raises(IOFailure, match="need 105 bytes") as ei:
        C.check_free_space(tmp_path, 100, hooks=Hooks.from_env({"MHC_FAULT": "enospc"}))
    assert ei.value.exit_code == 5 and ei.value.path == str(tmp_path)


def test_eacces_fault_on_temp_dir(tmp_path, src):
    hooks = Hooks.from_env({"MHC_FAULT": "eacces"})
    with pytest.raises(IOFailure, match="EACCES"), _ao(tmp_path / "out", src, hooks=hooks):
        pytest.fail("entered")
    assert _leftovers(tmp_path) == []


def test_sigterm_handler_held_exactly_while_the_output_is(tmp_path, src, monkeypatch):
    """Installed before the lock is taken, restored after a failed enter and after the block."""
    import signal

    before = signal.getsignal(signal.SIGTERM)
    seen = []
    real_lock = C.try_lock

    def lock(path):
        seen.append(signal.getsignal(signal.SIGTERM))
        return real_lock(path)

    monkeypatch.setattr(C, "try_lock", lock)
    hooks = Hooks.from_env({"MHC_FAULT": "eacces"})
    with pytest.raises(IOFailure), _ao(tmp_path / "out", src, hooks=hooks):
        ...  # entering the output raises: the injected EACCES on its lock
    assert signal.getsignal(signal.SIGTERM) == before
    _commit(tmp_path / "out", src)
    assert signal.getsignal(signal.SIGTERM) == before
    assert seen == [C._sigterm_to_interrupt] * 2  # already ours when the lock is created


def test_clean_stale_only_removes_our_dead_dirs(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()

    def mk(name, pid=None):
        d = tmp_path / name
        d.mkdir()
        if pid is not None:
            (d / C.TMP_MARKER).write_text(json.dumps({"pid": int(pid), "host": os.uname()[1]}))
        return d

    stale = mk(".out.mhc-tmp-0123456789abcdef", dead)
    live = mk(".out2.mhc-tmp-0123456789abcdef", os.getpid())
    unmarked = mk(".out3.mhc-tmp-0123456789abcdef")
    user_dir = mk("checkpoint", dead)  # carries a marker but is not named like our temp dirs
    assert C.clean_stale(tmp_path) == [stale]
    assert not stale.exists() and live.exists() and unmarked.exists() and user_dir.exists()


_CRASH = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    from mhc_convert import commit as C
    from mhc_convert.hooks import Hooks
    src, dst = Path(sys.argv[1]), Path(sys.argv[2])
    ao = C.AtomicOutput(dst, fingerprint=C.source_fingerprint(src), direction="enable",
                        tool_version="t", overwrite=True, hooks=Hooks.from_env(os.environ))
    with ao as tmp:
        (tmp / "model.safetensors").write_bytes(b"new" * 1000)
        C.phase("mid-copy")
        ao.commit(lambda d: (d / "config.json").write_text("{}"))
""")


@pytest.mark.parametrize("at", C.PHASES)
def test_sigkill_at_each_phase(tmp_path, src, at):
    dst = _commit(tmp_path / "out", src, payload=b"old")
    env = {**os.environ, "MHC_CRASH_AT": at, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-c", _CRASH, str(src), str(dst)], env=env,
                       capture_output=True, text=True)
    assert r.returncode == -9, r.stderr
    # DST is the old or the new output, complete either way; never absent, never partial.
    assert C.verify_manifest(dst) == []
    assert (dst / "model.safetensors").read_bytes() in (b"old", b"new" * 1000)
    C.clean_stale(tmp_path)
    left = [n for n in _leftovers(tmp_path) if ".mhc-tmp-" in n]
    # Only a fully written, unmarked temp dir (killed between unmarking and rename) may remain.
    assert left == [] or at in ("before-rename",), left


def test_sigterm_inside_becomes_terminated_143_and_cleans_up(tmp_path, src):
    code = textwrap.dedent("""
        import os, signal, sys
        from pathlib import Path
        from mhc_convert import commit as C
        from mhc_convert.errors import Terminated
        src, dst = Path(sys.argv[1]), Path(sys.argv[2])
        try:
            with C.AtomicOutput(dst, fingerprint={}, direction="enable", tool_version="t") as tmp:
                (tmp / "f").write_bytes(b"x")
                os.kill(os.getpid(), signal.SIGTERM)
        except Terminated as e:
            sys.exit(e.exit_code)
    """)
    r = subprocess.run([sys.executable, "-c", code, str(src), str(tmp_path / "out")],
                       env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                       text=True)
    assert r.returncode == 143, r.stderr  # 128 + SIGTERM (DESIGN.md §6: 130 is SIGINT)
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []
