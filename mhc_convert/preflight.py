"""Preflight of the commit protocol (DESIGN.md §6): refuse every aliasing between SRC and DST
and a destination without room, before a byte is written. ``commit`` re-exports these."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path

from mhc_convert.errors import IOFailure, UsageError
from mhc_convert.hooks import NO_HOOKS, Hooks


def _io_failure(e: OSError, fallback: Path | str) -> IOFailure:
    name = errno.errorcode.get(e.errno or 0, "OSError")
    return IOFailure(f"{name}: {e.strerror or e}", path=e.filename or fallback)


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


def check_free_space(directory: Path, needed_bytes: int, *, margin: float = 0.05,
                     hooks: Hooks = NO_HOOKS) -> None:
    """IOFailure unless ``directory``'s filesystem has ``needed_bytes`` (+margin) free
    (``hooks`` fault ``enospc``: as if none were)."""
    need = int(needed_bytes * (1 + margin))
    free = 0 if hooks.fault("enospc") else shutil.disk_usage(directory).free
    if free < need:
        raise IOFailure(f"ENOSPC: not enough free space: need {need} bytes ({need / 2**30:.2f} "
                        f"GiB incl. {margin:.0%} margin), have {free} bytes free "
                        f"({free / 2**30:.2f} GiB)", path=directory)


