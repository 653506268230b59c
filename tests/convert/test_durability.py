"""Durability of a real conversion (DESIGN.md §6, research/reliability.md §2: a rename is atomic
but not durable until the files and directories are fsynced; ClickHouse#111861, neon#9686).

A conversion runs in-process with ``os.fsync``, ``os.rename`` and the ``renameat2`` wrapper
journaled. ``fsync`` records the inode it syncs with its size and mtime at that moment; the
rename that publishes the output records a snapshot of the temp tree just before it happens.
The protocol is durable iff:

* every file and directory of the output was fsynced before the publishing rename, and none
  changed after its last fsync (same size and mtime at the rename as at the fsync; for a
  directory, the same mtime: no entry added, renamed or removed afterwards);
* the temp dir's last fsync comes after every file's last fsync (order: files, temp dir,
  rename);
* the parent directory is fsynced after the publishing rename.

Timestamps are the kernel's coarse clock, so a change in the same tick as the fsync would go
unseen; a missing fsync never does.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest
import torch

from mhc_convert import commit, engine
from mhc_model.model import HybridModel
from tests.model.helpers import perturb_norms_, tiny_config
from tests.paths import MEGATRON_FIXTURE

Inode = tuple[int, int]


def _snapshot(root: Path) -> dict[Inode, tuple[str, bool, int, int]]:
    """inode -> (path relative to root, is_dir, size, mtime_ns) for root and everything in it."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for p in [Path(dirpath), *(Path(dirpath) / f for f in files)]:
            st = os.lstat(p)
            out[(st.st_dev, st.st_ino)] = (p.relative_to(root).as_posix(),
                                           stat.S_ISDIR(st.st_mode), st.st_size, st.st_mtime_ns)
    return out


class Journal:
    def __init__(self, monkeypatch, dst: Path):
        self.events: list[tuple] = []
        self.dst = dst
        real_fsync, real_rename, real_rename2 = os.fsync, os.rename, commit._rename2

        def fsync(fd):
            st = os.fstat(fd)
            self.events.append(("fsync", (st.st_dev, st.st_ino), st.st_size, st.st_mtime_ns))
            return real_fsync(fd)

        def rename(old, new, *a, **kw):
            snap = self._before(old, new, kw)
            real_rename(old, new, *a, **kw)
            if snap is not None:
                self.events.append(("publish", Path(old), snap))

        def rename2(old, new, flags):
            snap = self._before(old, new, {})
            done = real_rename2(old, new, flags)
            if done and snap is not None:
                self.events.append(("publish", Path(old), snap))
            return done

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "rename", rename)
        monkeypatch.setattr(commit, "_rename2", rename2)

    def _before(self, old, new, kw):
        if kw or Path(new) != self.dst:
            return None
        return _snapshot(Path(old))

    def check(self) -> None:
        ev = self.events
        pubs = [i for i, e in enumerate(ev) if e[0] == "publish"]
        assert len(pubs) == 1, f"{len(pubs)} publishing renames"
        i_pub = pubs[0]
        snap = ev[i_pub][2]
        # the snapshot is the whole output: what the rename published is what we check
        assert {rel for rel, *_ in snap.values()} == \
            {"."} | {p.relative_to(self.dst).as_posix() for p in self.dst.rglob("*")}
        last: dict[Inode, tuple[int, int, int]] = {}
        for i, e in enumerate(ev[:i_pub]):
            if e[0] == "fsync":
                last[e[1]] = (i, e[2], e[3])
        root_ino = next(ino for ino, (rel, *_) in snap.items() if rel == ".")
        for ino, (rel, is_dir, size, mtime) in sorted(snap.items(), key=lambda kv: kv[1][0]):
            kind = "directory" if is_dir else "file"
            assert ino in last, f"{kind} {rel} was never fsynced before the rename"
            i, f_size, f_mtime = last[ino]
            assert f_mtime == mtime, f"{kind} {rel} changed after its last fsync"
            if not is_dir:
                assert f_size == size, f"file {rel} grew or shrank after its last fsync"
                assert i < last[root_ino][0], f"temp dir fsynced before file {rel}"
        st = os.stat(self.dst.parent)
        after = [e for e in ev[i_pub + 1:] if e[0] == "fsync" and e[1] == (st.st_dev, st.st_ino)]
        assert after, "parent directory not fsynced after the rename"


def _native(root: Path) -> Path:
    torch.manual_seed(0)
    model = HybridModel(tiny_config("M-M*-M-"))
    perturb_norms_(model, 0)
    model.save_pretrained(root, max_shard_bytes=40_000)
    return root


def _dist(root: Path) -> Path:
    shutil.copytree(MEGATRON_FIXTURE, root, copy_function=shutil.copyfile)
    for d, _, _ in os.walk(root):
        os.chmod(d, 0o755)
    return root


@pytest.mark.parametrize("overwrite", [False, True], ids=["new", "overwrite"])
@pytest.mark.parametrize("make", [_native, _dist], ids=["native", "torch_dist"])
def test_every_file_and_directory_fsynced_before_rename_parent_after(tmp_path, monkeypatch,
                                                                      make, overwrite):
    src = make(tmp_path / "src")
    dst = (tmp_path / "out").resolve()
    if overwrite:  # the swap path (renameat2 RENAME_EXCHANGE, or aside-then-in)
        engine.enable(src, dst)
    journal = Journal(monkeypatch, dst)
    engine.enable(src, dst, overwrite=overwrite)
    monkeypatch.undo()
    assert len([e for e in journal.events if e[0] == "fsync"]) > 3
    journal.check()
