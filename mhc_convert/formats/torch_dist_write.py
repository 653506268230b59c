"""Writing Megatron ``torch_dist`` checkpoints: data files copied, hardlinked or reflinked
byte-for-byte, new items in one new ``__mhc_N.distcp`` encoded as DCP encodes them, ``.metadata``
rewritten with the output keys, ``metadata.json`` (the marker) and the tracker written last by
the caller. Reading lives in ``torch_dist``; this module knows nothing about mHC."""


from __future__ import annotations

import errno
import fcntl
import io
import json
import os
import pickle
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)

from mhc_convert.commit import phase, record
from mhc_convert.errors import InvalidInputError, IOFailure
from mhc_convert.formats.torch_dist import _FICLONE, COMMON_PT, MARKER_FN, METADATA_FN, TRACKER_FN
from mhc_convert.hashcopy import HashingFile, output_file, write_file
from mhc_convert.view import CheckpointView, OutItem, ProgressFn
from mhc_model.megatron_files import parse_tracker
from mhc_model.safe_unpickle import safe_torch_save

if TYPE_CHECKING:
    from mhc_convert.validate import OnePassScan


# ------------------------------------------------------------------------------------- write
def _fsync_close(f: Any) -> None:
    f.flush()
    os.fsync(f.fileno())
    f.close()


def _place_file(src: Path, dst: Path, link: str, progress: ProgressFn | None,
                finite: OnePassScan | None = None) -> int:
    """Copy (byte-for-byte, sha256 and the NaN/Inf check of the tensor records inside computed
    in the same pass), hardlink or reflink one data file. Linked files are recorded for the
    manifest without reading them (manifest.py says what ``verify`` then checks) and reported
    to ``finite`` as unchanged source bytes. Returns bytes placed."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    size = src.stat().st_size
    if link == "copy":
        with open(src, "rb") as fi, output_file(dst, progress) as out:
            out.copy_range(fi.fileno(), 0, size, lambda missing: _shrunk(src, missing),
                           finite.ranges(src, 0, size) if finite else ())
        return size
    if finite is not None:
        finite.linked(src)
    phase("file-start")
    if link == "hardlink":
        try:
            os.link(src, dst)
        except OSError as e:
            raise IOFailure(f"cannot hardlink ({errno.errorcode.get(e.errno, e.errno)}: "
                            f"{e.strerror}); source and output must share a filesystem, "
                            "or use --link copy", path=dst) from None
    else:
        with open(src, "rb") as fi, open(dst, "xb") as fo:
            try:
                fcntl.ioctl(fo.fileno(), _FICLONE, fi.fileno())
            except OSError as e:
                fo.close()
                dst.unlink()
                code = errno.errorcode.get(e.errno or 0, e.errno)
                raise IOFailure(f"reflink not supported here ({code}); use --link copy or "
                                "hardlink", path=dst) from None
            _fsync_close(fo)
    if progress:
        progress(size)
    record(dst, size=size, link={"link": link, "source": os.path.abspath(src)})
    phase("file-done")
    return size


def _shrunk(src: Path, missing: int) -> None:
    raise InvalidInputError(f"data file ended {missing} bytes early (modified during the "
                            "conversion?)", path=src)


def _encode_value(key: str, value: Any) -> tuple[bytes, Any, MetadataIndex]:
    """(stored blob, storage metadata, index) for a new value, encoded as DCP's FileSystemWriter
    does: a tensor is ``torch.save`` of a CPU tensor whose storage is exactly the tensor (DCP
    clones views so no outside bytes leak in); a byte item is written verbatim."""
    if isinstance(value, (bytes, bytearray)):
        if not bytes(value[:4]) == b"PK\x03\x04":
            raise ValueError(f"{key}: byte values are stored verbatim and DCP/Megatron torch.load "
                             "them; pass torch.save output (encode_common_state, safe_torch_save)")
        return bytes(value), BytesStorageMetadata(), MetadataIndex(key)
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{key}: value must be a tensor or bytes")
    t = value.detach().cpu().contiguous()
    if t.untyped_storage().nbytes() != t.numel() * t.element_size() or t.storage_offset():
        t = t.clone()
    buf = io.BytesIO()
    torch.save(t, buf)
    shape, zeros = torch.Size(t.shape), torch.Size([0] * t.dim())
    sm = TensorStorageMetadata(TensorProperties(dtype=t.dtype), shape,
                               [ChunkStorageMetadata(zeros, shape)])
    return buf.getvalue(), sm, MetadataIndex(key, zeros)


def write_torch_dist(out_dir: str | Path, view: CheckpointView, items: list[OutItem], *,
                     link: Literal["copy", "hardlink", "reflink"] = "copy",
                     progress: ProgressFn | None = None,
                     assign: Callable[[list[tuple[str, int]]], set[str]] | None = None,
                     finite: OnePassScan | None = None) -> dict[str, Any]:
    """Write ``items`` as a DCP checkpoint in ``out_dir`` (data files + ``.metadata``; NOT
    ``metadata.json``: call ``write_marker`` last). Source items keep their stored bytes in
    copied/linked data files; values go into one new data file. Every item is checked and
    encoded before the first write. Returns ``{"data_files", "new_file", "bytes"}``.
    ``assign`` (distributed runs) maps the ``(file name, bytes)`` list to the files this rank
    writes (data files, the new file, ``.metadata``); the others are skipped. ``finite``: the
    NaN/Inf check, fed with the data files as they are copied (``validate.OnePassScan``)."""
    if link not in ("copy", "hardlink", "reflink"):
        raise ValueError(f"link must be copy/hardlink/reflink, not {link!r}")
    out = Path(out_dir)
    src_md: Metadata = view.meta["dcp_metadata"]
    keys = [it.key for it in items]
    if len(set(keys)) != len(keys):
        raise ValueError("duplicate output keys")
    sd_md: dict[str, Any] = {}
    storage: dict[MetadataIndex, _StorageInfo] = {}
    origin: dict[str, str] = {}  # output key -> source key
    referenced: list[str] = []
    for it in items:
        if it.source is None:
            continue
        if view.entries.get(it.source.key) is not it.source:
            raise ValueError(f"{it.key}: source entry is not from this view")
        origin[it.key] = it.source.key
        sd_md[it.key] = src_md.state_dict_metadata[it.source.key]
        for c in it.source.locator:
            storage[MetadataIndex(it.key, c.index.offset, c.index.index)] = c.info
            if c.info.relative_path not in referenced:
                referenced.append(c.info.relative_path)
    new_name = next(f"__mhc_{n}.distcp" for n in range(len(referenced) + 1)
                    if f"__mhc_{n}.distcp" not in referenced)
    encoded = [(it.key, *_encode_value(it.key, it.value)) for it in items if it.source is None]
    encoded.sort(key=lambda e: not isinstance(e[2], BytesStorageMetadata))  # DCP: bytes first
    offset = 0
    for key, blob, sm, idx in encoded:  # the new file's layout, known before it is written
        storage[idx] = _StorageInfo(new_name, offset, len(blob))
        sd_md[key] = sm
        offset += len(blob)
    total = 0
    try:
        units = [(rel, (view.path / rel).stat().st_size) for rel in referenced]
        units += [(new_name, offset)] if encoded else []
        mine = assign(units + [(METADATA_FN, 0)]) if assign else {METADATA_FN, *dict(units)}
        out.mkdir(parents=True, exist_ok=True)
        for rel in (r for r in referenced if r in mine):
            total += _place_file(view.path / rel, out / rel, link, progress, finite)
        if encoded and new_name in mine:
            with output_file(out / new_name, progress) as f:  # sha256 in the same pass
                for _, blob, _, _ in encoded:
                    f.write(blob)  # a crash-hook point per item
                    total += len(blob)
        # Keep item order in .metadata as the caller gave it (readers list keys in this order).
        sd_md = {k: sd_md[k] for k in keys}
        md = Metadata(state_dict_metadata=sd_md, storage_data=storage,
                      planner_data=_follow(src_md.planner_data, origin, keys, default=True),
                      storage_meta=_storage_meta(src_md.storage_meta), version=src_md.version)
        mcore = getattr(src_md, "mcore_data", None)  # old Megatron: per-fqn reformulation info
        if isinstance(mcore, dict):
            md.mcore_data = _follow(mcore, origin, keys, default=False)
        # `all_local_plans` (Megatron's save-plan cache) is dropped: it would describe old keys.
        if METADATA_FN in mine:
            with output_file(out / METADATA_FN) as f:
                pickle.dump(md, HashingFile(f))
        _fsync_dir(out)
    except OSError as e:
        if e.errno == errno.ENOSPC:  # the commit protocol adds need vs free
            raise
        raise IOFailure(f"{errno.errorcode.get(e.errno or 0, 'OSError')}: {e.strerror or e}",
                        path=e.filename or out) from None
    return {"data_files": referenced + ([new_name] if encoded else []),
            "new_file": new_name if encoded else None, "bytes": total}


def _follow(data: Any, origin: dict[str, str], keys: list[str], *, default: bool) -> Any:
    """Re-key a per-fqn dict for the output. DCP's default planner keeps ``planner_data`` =
    {fqn: object path}; new keys get the flat path ``(key,)`` when ``default``."""
    if not isinstance(data, dict):
        return data
    out = {k: data[origin[k]] for k in keys if k in origin and origin[k] in data}
    if default:
        for k in keys:
            out.setdefault(k, (k,))
    return out


def _storage_meta(src: StorageMeta | None) -> StorageMeta:
    """A new save: fresh save_id; checkpoint_id kept for provenance; no load_id."""
    modules = list(src.modules) if src is not None and isinstance(src.modules, list) else []
    cid = src.checkpoint_id if src is not None else None
    return StorageMeta(checkpoint_id=cid, save_id=str(uuid.uuid4()), load_id=None,
                       modules=modules)


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durable(path: Path, data: bytes) -> None:
    try:
        write_file(path, data)  # fsynced; sha256 recorded for the manifest
        _fsync_dir(path.parent)
    except OSError as e:
        if e.errno == errno.ENOSPC:  # the commit protocol adds need vs free
            raise
        raise IOFailure(f"{errno.errorcode.get(e.errno or 0, 'OSError')}: {e.strerror or e}",
                        path=path) from None


def write_marker(out_dir: str | Path, metadata_json: dict) -> None:
    """Write ``metadata.json`` (Megatron's completion marker). Call it LAST."""
    _write_durable(Path(out_dir) / MARKER_FN, json.dumps(metadata_json).encode("utf-8"))


def write_tracker(run_out_dir: str | Path, iteration_text: str) -> None:
    """Write ``latest_checkpointed_iteration.txt`` exactly as Megatron does (no newline)."""
    parse_tracker(iteration_text, path=Path(run_out_dir) / TRACKER_FN)
    _write_durable(Path(run_out_dir) / TRACKER_FN, iteration_text.strip().encode("utf-8"))


def encode_common_state(obj: dict) -> bytes:
    """Bytes for the ``common_state/shard_0_1`` item: ``torch.save([obj])`` as Megatron's
    ShardedObject serialization does. Pass the dict (``view.meta['common_state']``)."""
    return safe_torch_save([obj])


def write_common_pt(out_dir: str | Path, obj: dict) -> None:
    """Old layout (< 0.19): ``common.pt`` = ``torch.save(common_state_dict)``, no list."""
    _write_durable(Path(out_dir) / COMMON_PT, safe_torch_save(obj))
