"""The atomic-commit protocol (DESIGN.md §6, research/reliability.md §2.1), in one place.

Output is complete-and-verified or absent: everything is written into a sibling temp dir
``.<name>.mhc-tmp-<hex>`` (same filesystem as DST, never $TMPDIR: Lightning #20270/#21253), which
carries a ``.mhc-tmp`` marker so ``clean_stale`` can recognise it and never touches anything else
(orbax#394 deleted user checkpoints by guessing). ``commit`` fsyncs every file, writes
``mhc-manifest.json``, publishes the format's own marker last, then renames into place and fsyncs
the parent (a rename is not durable until the directory is fsynced: ClickHouse#111861). With
overwrite the old DST is swapped out atomically (``renameat2(RENAME_EXCHANGE)``) or renamed aside
first, and only deleted once the new one is in place.

Crash testing: ``phase(name)`` SIGKILLs the process when ``MHC_CRASH_AT`` equals ``name``.
Fault injection: ``MHC_FAULT`` (comma list) with ``enospc`` fails ``check_free_space`` and
``eacces`` fails creating the temp dir, exactly as the real errors would.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from mhc_convert.errors import ConvertError, Interrupted, InvalidInputError, IOFailure, UsageError

MANIFEST_NAME = "mhc-manifest.json"
TMP_MARKER = ".mhc-tmp"
_STAGING = ".mhc-marker-staging"
_TMP_RE = re.compile(r"^\..+\.mhc-tmp-[0-9a-f]{16}$")
PHASES = ("after-lock", "after-tmpdir", "mid-copy", "before-manifest", "after-manifest",
          "after-marker", "before-rename", "after-rename")
SMALL_FILE = 1 << 20  # source files up to this size are hashed into the fingerprint


def phase(name: str) -> None:
    """Named crash point. With ``MHC_CRASH_AT=name`` the process dies here with SIGKILL (no
    cleanup runs), which is what a power cut or OOM kill looks like to the protocol."""
    if os.environ.get("MHC_CRASH_AT") == name:
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def _fault(kind: str) -> bool:
    return kind in {f.strip() for f in os.environ.get("MHC_FAULT", "").split(",")}


def _io_failure(e: OSError, fallback: Path | str) -> IOFailure:
    name = errno.errorcode.get(e.errno or 0, "OSError")
    return IOFailure(f"{name}: {e.strerror or e}", path=e.filename or fallback)


# ----------------------------------------------------------------------------------- preflight


def _inside(child: Path, parent: Path) -> bool:
    return child != parent and child.is_relative_to(parent)


def _inodes(root: Path) -> dict[tuple[int, int], Path]:
    out: dict[tuple[int, int], Path] = {}
    paths = [root] if not root.is_dir() else [p for p in root.rglob("*") if p.is_file()]
    for p in paths:
        with contextlib.suppress(OSError):
            st = p.stat()
            out[(st.st_dev, st.st_ino)] = p
    return out


def preflight(src: Path, dst: Path, *, overwrite: bool) -> tuple[Path, Path]:
    """Refuse every aliasing between SRC and DST before a byte is written; returns the resolved
    ``(src, dst)`` (dst = resolved parent / name, so the final rename lands where the user meant).
    """
    src, dst = Path(src), Path(dst)
    if not src.exists():
        raise UsageError("source does not exist", path=src)
    rsrc = src.resolve(strict=True)
    if dst.is_symlink():
        target = dst.resolve()
        if target == rsrc or _inside(target, rsrc) or _inside(rsrc, target):
            raise UsageError(f"destination is a symlink to the source ({target})", path=dst)
        raise UsageError(f"destination is a symlink (to {target}); give the real path", path=dst)
    if dst.exists():  # resolves "x/.." and symlinked parents physically, as the kernel does
        rdst = dst.resolve(strict=True)
    elif dst.parent.is_dir():
        rdst = dst.parent.resolve(strict=True) / dst.name
    else:
        raise UsageError("destination's parent directory does not exist", path=dst.parent)
    if rdst == rsrc:
        raise UsageError(f"destination is the source ({rsrc})", path=dst)
    if _inside(rdst, rsrc):
        raise UsageError(f"destination is inside the source ({rsrc})", path=dst)
    if _inside(rsrc, rdst):
        raise UsageError(f"source is inside the destination ({rdst})", path=dst)
    if rdst.exists():
        st_d, st_s = rdst.stat(), rsrc.stat()
        if (st_d.st_dev, st_d.st_ino) == (st_s.st_dev, st_s.st_ino):  # bind mount / hardlink
            raise UsageError(f"destination is the same inode as the source ({rsrc})", path=dst)
        if not overwrite:
            raise UsageError("destination exists; use --overwrite to replace it", path=dst)
        if not rdst.is_dir():
            raise UsageError("destination exists and is not a directory", path=dst)
        shared = _inodes(rsrc).keys() & _inodes(rdst).keys()
        if shared:
            p = _inodes(rdst)[next(iter(shared))]
            raise UsageError(f"{p} is a hardlink to a source file; refusing to overwrite", path=dst)
    if not os.access(rdst.parent, os.W_OK | os.X_OK):
        raise IOFailure("EACCES: destination directory is not writable", path=rdst.parent)
    return rsrc, rdst


def check_free_space(directory: Path, needed_bytes: int, *, margin: float = 0.05) -> None:
    """IOFailure unless ``directory``'s filesystem has ``needed_bytes`` (+margin) free."""
    need = int(needed_bytes * (1 + margin))
    free = 0 if _fault("enospc") else shutil.disk_usage(directory).free
    if free < need:
        raise IOFailure(f"ENOSPC: not enough free space: need {need} bytes ({need / 2**30:.2f} "
                        f"GiB incl. {margin:.0%} margin), have {free} bytes free "
                        f"({free / 2**30:.2f} GiB)", path=directory)


# ----------------------------------------------------------------------------------- hashing


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _files(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            yield Path(dirpath) / name


def source_fingerprint(src: Path) -> dict[str, Any]:
    """Cheap identity of the source: size, mtime_ns and inode of every file, plus sha256 of the
    small (metadata) files. Compared again at commit time to detect a source changed mid-run."""
    src = Path(src).resolve()
    files: dict[str, Any] = {}
    for p in [src] if src.is_file() else _files(src):
        st = p.stat()
        rec: dict[str, Any] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns,
                               "inode": [st.st_dev, st.st_ino]}
        if st.st_size <= SMALL_FILE:
            rec["sha256"] = sha256_file(p)
        files[p.relative_to(src).as_posix() if p != src else p.name] = rec
    digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
    return {"path": str(src), "files": files, "digest": digest}


def verify_manifest(directory: Path) -> list[str]:
    """Re-hash every file against ``mhc-manifest.json``; returns problems (empty = verified)."""
    directory = Path(directory)
    try:
        manifest = json.loads((directory / MANIFEST_NAME).read_text())
        listed = manifest["files"]
        assert isinstance(listed, dict)
    except (OSError, ValueError, KeyError, AssertionError, TypeError) as e:
        return [f"{directory / MANIFEST_NAME}: missing or unreadable manifest ({e})"]
    problems = []
    for rel, rec in listed.items():
        p = directory / rel
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            problems.append(f"{rel}: manifest entry points outside the directory")
        elif p.is_symlink() or not p.is_file():
            problems.append(f"{p}: missing (listed in the manifest)")
        elif p.stat().st_size != rec.get("size"):
            problems.append(f"{p}: size {p.stat().st_size} != manifest {rec.get('size')}")
        elif sha256_file(p) != rec.get("sha256"):
            problems.append(f"{p}: sha256 differs from the manifest")
    for p in _files(directory):
        rel = p.relative_to(directory).as_posix()
        if rel != MANIFEST_NAME and rel not in listed:
            problems.append(f"{p}: extra file not in the manifest")
    return problems


# ----------------------------------------------------------------------------------- fs helpers


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            _fsync_path(Path(dirpath) / name)
        _fsync_path(Path(dirpath))


def _write_json_durable(path: Path, obj: Any) -> None:
    with open(path, "x") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


_RENAME_NOREPLACE, _RENAME_EXCHANGE, _AT_FDCWD = 1, 2, -100
_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_renameat2 = getattr(_libc, "renameat2", None)


def _rename2(old: Path, new: Path, flags: int) -> bool:
    """renameat2 with flags; False when the kernel/FS/libc cannot do it (caller falls back)."""
    if _renameat2 is None or not sys.platform.startswith("linux"):
        return False
    rc = _renameat2(_AT_FDCWD, os.fsencode(old), _AT_FDCWD, os.fsencode(new), flags)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(new))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(parent_dir: Path) -> list[Path]:
    """Remove temp dirs of dead conversions in ``parent_dir``; returns what was removed. Only a
    directory named ``.<name>.mhc-tmp-<hex>`` that holds our ``.mhc-tmp`` marker, written on this
    host by a pid that is no longer alive, is touched. Anything else is left alone."""
    removed = []
    host = socket.gethostname()
    for p in sorted(Path(parent_dir).iterdir()):
        if not _TMP_RE.match(p.name) or p.is_symlink() or not p.is_dir():
            continue
        try:
            marker = json.loads((p / TMP_MARKER).read_text())
            pid, mhost = int(marker["pid"]), marker["host"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if mhost == host and not _pid_alive(pid):
            shutil.rmtree(p)
            removed.append(p)
    return removed


# ----------------------------------------------------------------------------------- AtomicOutput


class AtomicOutput:
    """``with AtomicOutput(dst, ...) as tmp: write into tmp; out.commit(marker_writer)``.

    ``dst`` should come from ``preflight``. ``src``, when given, is fingerprinted again at commit
    and must match ``fingerprint``. ``extra`` is merged into the manifest (e.g. the mHC config).
    Any exception or KeyboardInterrupt (SIGTERM is turned into one) removes the temp dir and
    releases the lock; OSErrors surface as ``IOFailure``, interrupts as ``Interrupted``.
    """

    def __init__(self, dst: Path, *, fingerprint: dict[str, Any], direction: str,
                 tool_version: str, overwrite: bool = False, src: Path | None = None,
                 extra: dict[str, Any] | None = None):
        self.dst = Path(dst)
        self.fingerprint, self.direction, self.tool_version = fingerprint, direction, tool_version
        self.overwrite, self.src, self.extra = overwrite, src, extra or {}
        self.lock_path = self.dst.parent / f".{self.dst.name}.mhc-lock"
        self.tmp: Path | None = None
        self.committed = False
        self._lock_fd: int | None = None
        self._old_sigterm: Any = None

    # -- lock --------------------------------------------------------------------------------
    def _acquire_lock(self) -> None:
        import fcntl

        while True:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise IOFailure("locked by another conversion writing this destination",
                                path=self.dst) from None
            # The previous holder may have unlinked the file between our open and flock; then we
            # hold a lock on an orphan inode and must retry on the new file.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.lock_path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "start": time.time()}).encode())
        self._lock_fd = fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.lock_path)  # while still holding it: see _acquire_lock
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- context -----------------------------------------------------------------------------
    def __enter__(self) -> Path:
        try:
            self._acquire_lock()
            phase("after-lock")
            tmp = self.dst.parent / f".{self.dst.name}.mhc-tmp-{secrets.token_hex(8)}"
            if _fault("eacces"):
                raise PermissionError(errno.EACCES, "Permission denied (MHC_FAULT)", str(tmp))
            os.mkdir(tmp, 0o755)
            self.tmp = tmp
            _write_json_durable(tmp / TMP_MARKER, {"pid": os.getpid(),
                                                   "host": socket.gethostname(),
                                                   "start": time.time(), "dst": str(self.dst)})
            _fsync_path(self.dst.parent)
            phase("after-tmpdir")
        except BaseException as e:
            self._abort()
            raise self._translate(e) from e
        if threading.current_thread() is threading.main_thread():
            old = signal.signal(signal.SIGTERM, _sigterm_to_interrupt)
            self._old_sigterm = signal.SIG_DFL if old is None else old
        return tmp

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self._old_sigterm is not None:
            signal.signal(signal.SIGTERM, self._old_sigterm)
            self._old_sigterm = None
        if exc is None and not self.committed:
            self._abort()
            raise RuntimeError("AtomicOutput block ended without commit(); output discarded")
        if exc is not None:
            self._abort()
            translated = self._translate(exc)
            if translated is not exc:
                raise translated from exc
            return False
        self._release_lock()
        return False

    def _abort(self) -> None:
        try:
            if self.tmp is not None and not self.committed and self.tmp.exists():
                shutil.rmtree(self.tmp)
        except OSError as e:  # never mask the original error; say what is left behind
            print(f"mhc-convert: could not remove temp dir {self.tmp}: {e}", file=sys.stderr)
        finally:
            self._release_lock()

    def _translate(self, e: BaseException) -> BaseException:
        if isinstance(e, ConvertError):
            return e
        if isinstance(e, KeyboardInterrupt):
            return Interrupted("interrupted; temporary output removed", path=self.dst)
        if isinstance(e, OSError):
            return _io_failure(e, self.tmp or self.dst)
        return e

    # -- commit ------------------------------------------------------------------------------
    def commit(self, marker_writer: Callable[[Path], None]) -> Path:
        """Seal and publish. ``marker_writer(d)`` writes the format's marker file(s) into ``d``,
        a staging dir: they are hashed into the manifest, then moved into the output root as the
        very last write, so a reader that trusts the marker never sees a partial output."""
        tmp = self.tmp
        if tmp is None or self.committed:
            raise RuntimeError("commit() outside the with-block or twice")
        if self.src is not None and source_fingerprint(self.src)["digest"] != \
                self.fingerprint.get("digest"):
            raise InvalidInputError("source changed during the conversion; output discarded",
                                    path=self.src)
        staging = tmp / _STAGING
        os.mkdir(staging)
        marker_writer(staging)
        markers = [p.relative_to(staging) for p in _files(staging)]
        for rel in markers:
            if (tmp / rel).exists() or rel.as_posix() in (MANIFEST_NAME, TMP_MARKER):
                raise RuntimeError(f"marker {rel} collides with an output file")
        _fsync_tree(tmp)
        phase("before-manifest")
        files = {}
        for p in _files(tmp):
            rel = p.relative_to(tmp)
            if rel.as_posix() == TMP_MARKER:
                continue
            if rel.parts[0] == _STAGING:
                rel = Path(*rel.parts[1:])
            files[rel.as_posix()] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
        _write_json_durable(tmp / MANIFEST_NAME, {
            "format": "mhc-manifest", "version": 1, "tool_version": self.tool_version,
            "direction": self.direction, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "source": self.fingerprint, "files": files, **self.extra})
        phase("after-manifest")
        for rel in markers:  # the marker is published last (atomic rename within tmp)
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            os.rename(staging / rel, tmp / rel)
            _fsync_path((tmp / rel).parent)
        shutil.rmtree(staging)
        phase("after-marker")
        os.unlink(tmp / TMP_MARKER)
        _fsync_path(tmp)
        phase("before-rename")
        self._publish(tmp)
        self.committed = True
        phase("after-rename")
        return self.dst

    def _publish(self, tmp: Path) -> None:
        dst, parent = self.dst, self.dst.parent
        if not dst.exists() and not dst.is_symlink():
            if not _rename2(tmp, dst, _RENAME_NOREPLACE):
                if dst.exists():
                    raise IOFailure("destination appeared during the conversion", path=dst)
                os.rename(tmp, dst)
            self.committed = True
            _fsync_path(parent)
            return
        if not self.overwrite:
            raise IOFailure("destination appeared during the conversion", path=dst)
        if dst.is_symlink() or not dst.is_dir():
            raise IOFailure("destination changed into a non-directory during the conversion",
                            path=dst)
        old = parent / f".{dst.name}.mhc-old-{secrets.token_hex(8)}"
        if _rename2(tmp, dst, _RENAME_EXCHANGE):  # atomic swap: dst is never absent
            self.committed = True
            os.rename(tmp, old)
        else:  # aside, then in; roll the old one back if the second rename fails
            os.rename(dst, old)
            try:
                os.rename(tmp, dst)
            except BaseException:
                os.rename(old, dst)
                raise
            self.committed = True
        _fsync_path(parent)
        try:  # only now: the new output is in place and durable
            shutil.rmtree(old)
            _fsync_path(parent)
        except OSError as e:  # the conversion succeeded; do not turn leftovers into a failure
            print(f"mhc-convert: could not remove the replaced output {old}: {e}",
                  file=sys.stderr)


def _sigterm_to_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")
