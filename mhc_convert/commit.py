"""The atomic-commit protocol (DESIGN.md §6, research/reliability.md §2.1), in one place.

Output is complete-and-verified or absent: everything is written into a sibling temp dir
``.<name>.mhc-tmp-<hex>`` (same filesystem as DST, never $TMPDIR: Lightning #20270/#21253), which
carries a ``.mhc-tmp`` marker so ``clean_stale`` can recognise it and never touches anything else
(orbax#394 deleted user checkpoints by guessing). ``commit`` fsyncs every file, writes
``mhc-manifest.json``, publishes the format's own marker last, then renames into place and fsyncs
the parent (a rename is not durable until the directory is fsynced: ClickHouse#111861). With
overwrite the old DST is swapped out atomically (``renameat2(RENAME_EXCHANGE)``) or renamed aside
first, and only deleted once the new one is in place.

Writers hash what they write in the same pass (``hashcopy``) and ``record`` the digests; the
commit hashes only files nobody recorded (small markers), so sealing costs O(metadata), and
hard/reflinked data files are recorded without being read (``manifest.py`` has the trade-off).

Test hooks: every crash point, hold point and fault comes from one frozen ``hooks.Hooks`` passed
in (``AtomicOutput(hooks=)``, ``check_free_space(hooks=)``); the default ``NO_HOOKS`` does nothing
and nothing here reads the environment (``hooks.py`` lists the variables the CLI entry maps).
``phase(name)`` is a named crash point: ``PHASES`` (every commit) plus ``WRITER_PHASES`` and
``after-exchange`` (overwrite). Writers that only know a path get the hooks of the output that
owns it (``hooks_for``), the same registry ``record`` uses.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import json
import os
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

from mhc_convert.errors import (
    ConvertError,
    Interrupted,
    InvalidInputError,
    IOFailure,
    SigTerm,
    Terminated,
)
from mhc_convert.hooks import NO_HOOKS, Hooks
from mhc_convert.manifest import (  # noqa: F401  (re-exported: the protocol's public surface)
    MANIFEST_NAME,
    SMALL_FILE,
    TMP_MARKER,
    _files,
    _pid_alive,
    clean_stale,
    files_under,
    sha256_file,
    source_fingerprint,
    try_lock,
    unlock,
    verify_manifest,
)
from mhc_convert.preflight import _io_failure, check_free_space, preflight  # noqa: F401

_STAGING = ".mhc-marker-staging"
PHASES = ("after-lock", "after-tmpdir", "mid-copy", "commit-start", "after-staging",
          "before-manifest", "after-manifest", "after-marker", "before-rename",
          "before-parent-fsync", "after-rename")
WRITER_PHASES = ("file-start", "mid-copy", "file-done")  # per output file / per data chunk
# The outputs (AtomicOutput, or a distributed rank's _Collector) being written by this process:
# ``record`` hands a file's digest to the one whose temp dir holds it, ``hooks_for`` its hooks.
_ACTIVE: list[AtomicOutput | _Collector] = []
_ACTIVE_LOCK = threading.Lock()


def _owners(path: Path | str | None) -> list[AtomicOutput | _Collector]:
    with _ACTIVE_LOCK:
        return [o for o in _ACTIVE if o.tmp is not None
                and (path is None or Path(path).is_relative_to(o.tmp))]


def hooks_for(path: Path | str | None = None) -> Hooks:
    """The hooks of the output whose temp dir holds ``path`` (``None``: of the output this
    process is writing); ``NO_HOOKS`` outside any."""
    owners = _owners(path)
    return owners[-1].hooks if owners else NO_HOOKS


def phase(name: str, path: Path | str | None = None) -> None:
    """Named crash point of a writer that knows only the file it writes (``path``): the hooks
    of the output owning it decide (``Hooks.phase``); a no-op outside any output."""
    hooks_for(path).phase(name)


def record(path: Path | str, *, size: int, sha256: str | None = None,
           link: dict[str, Any] | None = None) -> None:
    """Hand the manifest entry of a file just written (``sha256``, computed while writing) or
    placed by a link (``link``: ``{"link": "hardlink"|"reflink", "source": ...}``) to the
    ``AtomicOutput`` whose temp dir holds ``path``. A no-op outside any (writers used alone)."""
    path = Path(path)
    for ao in _owners(path):
        st = os.stat(path)
        rec: dict[str, Any] = {"size": size, "sha256": sha256}
        if link is not None:
            rec.update(link, sha256=None, inode=[st.st_dev, st.st_ino], mtime_ns=st.st_mtime_ns)
        with _ACTIVE_LOCK:  # files may be written side by side (parallel.run_jobs)
            ao._records[path.relative_to(ao.tmp).as_posix()] = (rec, (st.st_dev, st.st_ino))


class _Collector:
    """Owns a temp dir written by a process that has no ``AtomicOutput`` for it (a distributed
    rank other than 0): collects the ``record``s of its files and carries its hooks."""

    def __init__(self, tmp: Path, hooks: Hooks):
        self.tmp, self.hooks = tmp, hooks
        self._records: dict[str, tuple[dict[str, Any], tuple[int, int]]] = {}


@contextlib.contextmanager
def collecting(tmp: Path, hooks: Hooks = NO_HOOKS) -> Iterator[dict[str, dict[str, Any]]]:
    """Within the block, files written under ``tmp`` by this process are owned by a collector
    (for ``record`` and ``hooks_for``); on exit the yielded dict holds their manifest records
    (relative path -> record), for the process that commits to ``AtomicOutput.adopt``."""
    col = _Collector(Path(tmp), hooks)
    out: dict[str, dict[str, Any]] = {}
    with _ACTIVE_LOCK:
        _ACTIVE.append(col)
    try:
        yield out
    finally:
        with _ACTIVE_LOCK:
            _ACTIVE.remove(col)
    out.update({rel: rec for rel, (rec, _) in col._records.items()})


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


# ----------------------------------------------------------------------------------- AtomicOutput


class AtomicOutput:
    """``with AtomicOutput(dst, ...) as tmp: write into tmp; out.commit(marker_writer)``.

    ``dst`` should come from ``preflight``. ``src``, when given, is fingerprinted again at commit
    and must match ``fingerprint``. ``extra`` is merged into the manifest (e.g. the mHC config).
    ``expected_bytes`` (the output's size) is quoted when a write fails with ENOSPC.
    ``hooks``: crash/hold points and faults for tests (``hooks.py``); default none.
    Any exception or KeyboardInterrupt (SIGTERM is turned into one, ``SigTerm``, for as long as
    the object holds anything: from before the lock to the end of the block) removes the temp
    dir and releases the lock; OSErrors surface as ``IOFailure``, SIGINT as ``Interrupted``
    (exit 130), SIGTERM as ``Terminated`` (exit 143).
    """

    def __init__(self, dst: Path, *, fingerprint: dict[str, Any], direction: str,
                 tool_version: str, overwrite: bool = False, src: Path | None = None,
                 extra: dict[str, Any] | None = None, expected_bytes: int | None = None,
                 hooks: Hooks = NO_HOOKS):
        self.dst = Path(dst)
        self.hooks = hooks
        self.expected_bytes = expected_bytes
        self._records: dict[str, tuple[dict[str, Any], tuple[int, int]]] = {}
        self.fingerprint, self.direction, self.tool_version = fingerprint, direction, tool_version
        self.overwrite, self.src, self.extra = overwrite, src, extra or {}
        self.lock_path = self.dst.parent / f".{self.dst.name}.mhc-lock"
        self.tmp: Path | None = None
        self._new: Path | None = None
        self.committed = False
        self._lock_fd: int | None = None
        self._old_sigterm: Any = None

    # -- lock --------------------------------------------------------------------------------
    def _acquire_lock(self) -> None:
        fd = try_lock(self.lock_path)
        if fd is None:
            raise IOFailure("locked by another conversion writing this destination",
                            path=self.dst)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "start": time.time()}).encode())
        self._lock_fd = fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            unlock(self.lock_path, self._lock_fd)
            self._lock_fd = None

    # -- context -----------------------------------------------------------------------------
    def __enter__(self) -> Path:
        try:
            # First, before the lock or the temp dir exist: a SIGTERM from here on unwinds
            # through the cleanup below like Ctrl-C does, instead of killing the process with
            # the lock and temp dir left behind.
            self._catch_sigterm()
            self._acquire_lock()
            self.hooks.phase("after-lock")
            token = secrets.token_hex(8)
            tmp = self.dst.parent / f".{self.dst.name}.mhc-tmp-{token}"
            new = self.dst.parent / f".{self.dst.name}.mhc-new-{token}"
            if self.hooks.fault("eacces"):
                raise PermissionError(errno.EACCES, "Permission denied (MHC_FAULT)", str(tmp))
            # The dir appears under its mhc-tmp name only with a complete, durable marker, so
            # clean_stale can always tell whose it is (an mhc-new dir holds at most the marker).
            os.mkdir(new, 0o755)
            self._new = new
            _write_json_durable(new / TMP_MARKER, {"pid": os.getpid(),
                                                   "host": socket.gethostname(),
                                                   "start": time.time(), "dst": str(self.dst)})
            _fsync_path(new)
            os.rename(new, tmp)
            self.tmp, self._new = tmp, None
            with _ACTIVE_LOCK:
                _ACTIVE.append(self)
            _fsync_path(self.dst.parent)
            self.hooks.phase("after-tmpdir")
        except BaseException as e:
            self._abort()
            self._restore_sigterm()
            raise self._translate(e) from e
        return tmp

    def _catch_sigterm(self) -> None:
        if threading.current_thread() is threading.main_thread():
            old = signal.signal(signal.SIGTERM, _sigterm_to_interrupt)
            self._old_sigterm = signal.SIG_DFL if old is None else old

    def _restore_sigterm(self) -> None:
        if self._old_sigterm is not None:
            signal.signal(signal.SIGTERM, self._old_sigterm)
            self._old_sigterm = None

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._restore_sigterm()
        if exc is None and not self.committed:
            self._abort()
            raise RuntimeError("AtomicOutput block ended without commit(); output discarded")
        if exc is not None:
            translated = self._translate(exc)  # first: ENOSPC quotes the free space now
            self._abort()
            if translated is not exc:
                raise translated from exc
            return False
        with _ACTIVE_LOCK:
            _ACTIVE.remove(self)
        self._release_lock()
        return False

    def _abort(self) -> None:
        with _ACTIVE_LOCK:
            if self in _ACTIVE:
                _ACTIVE.remove(self)
        try:
            if self._new is not None and self._new.exists():
                shutil.rmtree(self._new)
            if self.tmp is not None and not self.committed and self.tmp.exists():
                shutil.rmtree(self.tmp)
        except OSError as e:  # never mask the original error; say what is left behind
            print(f"mhc-convert: could not remove temp dir {self.tmp}: {e}", file=sys.stderr)
        finally:
            self._release_lock()

    def _translate(self, e: BaseException) -> BaseException:
        if isinstance(e, ConvertError):
            return e
        if isinstance(e, SigTerm):
            return Terminated("terminated (SIGTERM); temporary output removed", path=self.dst)
        if isinstance(e, KeyboardInterrupt):
            return Interrupted("interrupted; temporary output removed", path=self.dst)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            try:
                free = shutil.disk_usage(self.dst.parent).free
            except OSError:
                free = -1
            need = self.expected_bytes
            need_s = f"{need} bytes ({need / 2**30:.2f} GiB)" if need is not None else "unknown"
            return IOFailure(f"ENOSPC: no space left on device while writing "
                             f"{e.filename or self.tmp}: need {need_s} for the output, "
                             f"have {free} bytes ({free / 2**30:.2f} GiB) free; temporary "
                             f"output removed", path=self.dst)
        if isinstance(e, OSError):
            return _io_failure(e, self.tmp or self.dst)
        return e

    def adopt(self, records: dict[str, dict[str, Any]]) -> None:
        """Take the manifest records another process collected (``collecting``) for files it
        wrote into this temp dir; their inodes are re-read here (this host's view), so the
        commit still checks each file is the one recorded."""
        tmp = self.tmp
        if tmp is None:
            raise RuntimeError("adopt() outside the with-block")
        for rel, rec in records.items():
            st = os.stat(tmp / rel)
            if "inode" in rec:
                rec = {**rec, "inode": [st.st_dev, st.st_ino], "mtime_ns": st.st_mtime_ns}
            self._records[rel] = (rec, (st.st_dev, st.st_ino))

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
        self.hooks.phase("commit-start")
        staging = tmp / _STAGING
        os.mkdir(staging)
        marker_writer(staging)
        self.hooks.phase("after-staging")
        markers = [p.relative_to(staging) for p in _files(staging)]
        for rel in markers:
            if (tmp / rel).exists() or rel.as_posix() in (MANIFEST_NAME, TMP_MARKER):
                raise RuntimeError(f"marker {rel} collides with an output file")
        _fsync_tree(tmp)
        self.hooks.phase("before-manifest")
        files, hashed = self._manifest_files(tmp)
        _write_json_durable(tmp / MANIFEST_NAME, {
            "format": "mhc-manifest", "version": 2, "tool_version": self.tool_version,
            "direction": self.direction, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "writer": {"pid": os.getpid(), "host": socket.gethostname()},
            "hashed_at_commit": hashed, "source": self.fingerprint, "files": files,
            **self.extra})
        self.hooks.phase("after-manifest")
        for rel in markers:  # the marker is published last (atomic rename within tmp)
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            os.rename(staging / rel, tmp / rel)
            _fsync_path((tmp / rel).parent)
        shutil.rmtree(staging)
        self.hooks.phase("after-marker")
        os.unlink(tmp / TMP_MARKER)
        _fsync_path(tmp)
        self.hooks.phase("before-rename")
        self._publish(tmp)
        self.committed = True
        self.hooks.phase("after-rename")
        return self.dst

    def _manifest_files(self, tmp: Path) -> tuple[dict[str, Any], int]:
        """Manifest entries: recorded ones as recorded (if the file is still that inode and
        size), everything else hashed now. Returns (entries, bytes hashed here)."""
        files: dict[str, Any] = {}
        hashed = 0
        for p in files_under(tmp):
            rel = p.relative_to(tmp)
            if rel.as_posix() == TMP_MARKER:
                continue
            st = p.stat()
            got = self._records.get(rel.as_posix())
            if rel.parts[0] == _STAGING:
                rel = Path(*rel.parts[1:])
            if got is not None and got[0]["size"] == st.st_size \
                    and got[1] == (st.st_dev, st.st_ino):
                files[rel.as_posix()] = got[0]
            else:
                files[rel.as_posix()] = {"size": st.st_size, "sha256": sha256_file(p)}
                hashed += st.st_size
        return files, hashed

    def _publish(self, tmp: Path) -> None:
        dst, parent = self.dst, self.dst.parent
        if not dst.exists() and not dst.is_symlink():
            if not _rename2(tmp, dst, _RENAME_NOREPLACE):
                if dst.exists():
                    raise IOFailure("destination appeared during the conversion", path=dst)
                os.rename(tmp, dst)
            self.committed = True
            self.hooks.phase("before-parent-fsync")
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
            self.hooks.phase("after-exchange")
            os.rename(tmp, old)
        else:  # aside, then in; roll the old one back if the second rename fails
            os.rename(dst, old)
            try:
                os.rename(tmp, dst)
            except BaseException:
                os.rename(old, dst)
                raise
            self.committed = True
        self.hooks.phase("before-parent-fsync")
        _fsync_path(parent)
        try:  # only now: the new output is in place and durable
            shutil.rmtree(old)
            _fsync_path(parent)
        except OSError as e:  # the conversion succeeded; do not turn leftovers into a failure
            print(f"mhc-convert: could not remove the replaced output {old}: {e}",
                  file=sys.stderr)


def _sigterm_to_interrupt(signum: int, frame: Any) -> None:
    raise SigTerm(f"signal {signum}")
