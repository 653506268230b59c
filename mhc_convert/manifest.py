"""``mhc-manifest.json``, source fingerprints, output locks and stale temp-dir cleanup: the
read-side half of the commit protocol (``commit.py`` is the write side).

Manifest (version 2) ``files`` entries:

* ``{"size": N, "sha256": HEX}``: every file whose bytes this tool wrote. The digest is
  computed *while the file is written* (``hashcopy``), or at commit for files nobody recorded.
* ``{"size": N, "sha256": null, "link": "hardlink"|"reflink", "inode": [dev, ino],
  "mtime_ns": T, "source": REL}``: a torch_dist data file placed with ``--link``. Its bytes
  are the source's and were never read, so a rename stays O(metadata). Trade-off, explicitly:
  ``verify`` checks the size always; while the file is still the very inode recorded (the output
  was not copied elsewhere) it also checks ``mtime_ns``, so an in-place write to the shared
  inode is caught; it cannot detect silent bit rot or a same-size, mtime-preserving rewrite of
  such a file, and after a copy of the output directory (new inodes) only the size is checked.
  Use ``--link copy`` when a content digest of every byte is required.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

MANIFEST_NAME = "mhc-manifest.json"
MANIFEST_VERSIONS = (1, 2)
TMP_MARKER = ".mhc-tmp"
LINK_KINDS = ("hardlink", "reflink")
_TMP_RE = re.compile(r"^\.(?P<name>.+)\.mhc-tmp-[0-9a-f]{16}$")
_NEW_RE = re.compile(r"^\.(?P<name>.+)\.mhc-new-[0-9a-f]{16}$")
_OLD_RE = re.compile(r"^\.(?P<name>.+)\.mhc-old-[0-9a-f]{16}$")
_LOCK_RE = re.compile(r"^\.(?P<name>.+)\.mhc-lock$")
SMALL_FILE = 1 << 20  # source files up to this size are hashed into the fingerprint


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def files_under(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            yield Path(dirpath) / name


_files = files_under  # old private name


def source_fingerprint(src: Path) -> dict[str, Any]:
    """Cheap identity of the source: size, mtime_ns and inode of every file, plus sha256 of the
    small (metadata) files. Compared again at commit time to detect a source changed mid-run."""
    src = Path(src).resolve()
    files: dict[str, Any] = {}
    for p in [src] if src.is_file() else files_under(src):
        st = p.stat()
        rec: dict[str, Any] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns,
                               "inode": [st.st_dev, st.st_ino]}
        if st.st_size <= SMALL_FILE:
            rec["sha256"] = sha256_file(p)
        files[p.relative_to(src).as_posix() if p != src else p.name] = rec
    digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
    return {"path": str(src), "files": files, "digest": digest}


def _check_entry(p: Path, rec: Any) -> str | None:
    if not isinstance(rec, dict):
        return f"{p}: malformed manifest entry"
    st = p.stat()
    if st.st_size != rec.get("size"):
        return f"{p}: size {st.st_size} != manifest {rec.get('size')}"
    link = rec.get("link")
    if link is None:
        if not isinstance(rec.get("sha256"), str):
            return f"{p}: manifest entry has no sha256"
        if sha256_file(p) != rec["sha256"]:
            return f"{p}: sha256 differs from the manifest"
        return None
    if link not in LINK_KINDS:
        return f"{p}: unknown link kind {link!r} in the manifest"
    # Linked data was never hashed (see the module docstring): size (above) always; on the
    # recorded inode also mtime, which any in-place write to the shared inode changes.
    if rec.get("inode") == [st.st_dev, st.st_ino] and rec.get("mtime_ns") != st.st_mtime_ns:
        return f"{p}: {link}ed data file was modified after the conversion (mtime changed)"
    return None


def verify_manifest(directory: Path) -> list[str]:
    """Check every file against ``mhc-manifest.json``; returns problems (empty = verified).
    Hashed entries are re-hashed; linked entries get the checks described above."""
    directory = Path(directory)
    try:
        manifest = json.loads((directory / MANIFEST_NAME).read_text())
        listed = manifest["files"]
        assert isinstance(listed, dict)
        assert manifest.get("version", 1) in MANIFEST_VERSIONS, "unknown manifest version"
    except (OSError, ValueError, KeyError, AssertionError, TypeError) as e:
        return [f"{directory / MANIFEST_NAME}: missing or unreadable manifest ({e})"]
    problems = []
    for rel, rec in listed.items():
        p = directory / rel
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            problems.append(f"{rel}: manifest entry points outside the directory")
        elif p.is_symlink() or not p.is_file():
            problems.append(f"{p}: missing (listed in the manifest)")
        elif (problem := _check_entry(p, rec)) is not None:
            problems.append(problem)
    for p in files_under(directory):
        rel = p.relative_to(directory).as_posix()
        if rel != MANIFEST_NAME and rel not in listed:
            problems.append(f"{p}: extra file not in the manifest")
    return problems


# ----------------------------------------------------------------------------------- locks


def try_lock(lock_path: Path) -> int | None:
    """Take the exclusive flock on ``lock_path`` (created if needed) without blocking; the fd,
    or None when another process holds it. A holder unlinks the file while still holding it,
    so a lock on an inode that is no longer at ``lock_path`` is dropped and retried."""
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(lock_path))
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def unlock(lock_path: Path, fd: int) -> None:
    with contextlib.suppress(OSError):
        os.unlink(lock_path)  # while still holding it: see try_lock
    os.close(fd)


# ----------------------------------------------------------------------------------- clean


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_pid_alive = pid_alive  # old private name


def _owner(d: Path) -> tuple[int, str] | None:
    """(pid, host) of the conversion that made temp dir ``d``: from its marker, or from the
    manifest once the marker is gone just before the rename. None: not ours."""
    for name, field in ((TMP_MARKER, None), (MANIFEST_NAME, "writer")):
        try:
            doc = json.loads((d / name).read_text())
            doc = doc[field] if field else doc
            return int(doc["pid"]), str(doc["host"])
        except FileNotFoundError:
            continue
        except (OSError, ValueError, KeyError, TypeError):
            return None
    return None


def clean_stale(parent_dir: Path) -> list[Path]:
    """Remove what killed conversions left in ``parent_dir``; returns the directories removed.

    * ``.<name>.mhc-tmp-<hex>`` directories written on this host by a pid that is gone (from the
      ``.mhc-tmp`` marker, or the manifest's ``writer`` after the marker's removal), only while
      no live conversion holds the ``<name>`` lock. Anything without our marker is left alone
      (orbax#394).
    * ``.<name>.mhc-new-<hex>``: a temp dir killed before its marker was complete (it is
      renamed to ``mhc-tmp`` once the marker is durable), holding nothing but that marker.
    * ``.<name>.mhc-old-<hex>``: a replaced output whose deletion was interrupted, only when the
      new ``<name>`` is in place (never the only copy of an output).
    * ``.<name>.mhc-lock`` files nobody holds (not listed in the result: they hold no data).
    """
    parent_dir = Path(parent_dir)
    removed = []
    host = socket.gethostname()
    for p in sorted(parent_dir.iterdir()):
        m = _TMP_RE.match(p.name) or _NEW_RE.match(p.name) or _OLD_RE.match(p.name)
        if m is None or p.is_symlink() or not p.is_dir():
            continue
        if m.re is _TMP_RE:
            owner = _owner(p)
            if owner is None or owner[1] != host or pid_alive(owner[0]):
                continue
        elif m.re is _NEW_RE:
            if {c.name for c in p.iterdir()} - {TMP_MARKER}:
                continue
        elif not (parent_dir / m["name"]).is_dir():
            continue
        lock = parent_dir / f".{m['name']}.mhc-lock"
        fd = try_lock(lock)
        if fd is None:  # a live conversion of this output: not stale
            continue
        try:
            shutil.rmtree(p)
            removed.append(p)
        finally:
            unlock(lock, fd)
    for p in sorted(parent_dir.iterdir()):
        if _LOCK_RE.match(p.name) and p.is_file() and not p.is_symlink():
            fd = try_lock(p)
            if fd is not None:
                unlock(p, fd)
    return removed
