"""Megatron ``torch_dist`` (torch DCP) reader (DESIGN.md §5, §6); the writer is
``torch_dist_write``.

On disk (verified on the megatron-core 0.19.2 fixture, torch 2.13 ``filesystem.py``):

* ``.metadata``: raw ``pickle.dump`` of DCP ``Metadata``. ``state_dict_metadata[fqn]`` is a
  ``TensorStorageMetadata`` (dtype, global size, chunks) or ``BytesStorageMetadata``;
  ``storage_data[MetadataIndex(fqn, chunk offsets)] = _StorageInfo(file, offset, length)``.
* ``__R_W.distcp``: no key names inside. A tensor chunk is a whole ``torch.save`` zip blob of
  exactly the chunk (DCP clones views first; Megatron forces the TORCH_SAVE format). A byte item
  is raw bytes; Megatron's ShardedObjects are themselves ``torch.save([obj])`` blobs.
* ``common_state/shard_0_1`` (>= 0.19) or ``common.pt`` (< 0.19): args, iteration, param groups.
* ``metadata.json`` (written last; Megatron treats a DCP without it as not-torch_dist) and,
  beside ``iter_XXXXXXX/``, the tracker ``latest_checkpointed_iteration.txt``.

A rename never decodes tensors: the output ``.metadata`` points renamed keys at copied (or linked)
data files, and new values go into one new data file encoded as DCP encodes them.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorStorageMetadata,
)

from mhc_convert.errors import InvalidInputError, IOFailure
from mhc_convert.formats.byte_sources import dcp_chunk_range, dcp_chunk_slices, tensor_slices
from mhc_convert.view import CheckpointView, Entry, StoredRange
from mhc_model.megatron_files import (
    COMMON_KEY,
    COMMON_PT,
    iter_dir_name,
    iteration_of,
    read_tracker,
)
from mhc_model.megatron_files import MARKER as MARKER_FN
from mhc_model.megatron_files import METADATA as METADATA_FN
from mhc_model.megatron_files import TRACKER as TRACKER_FN
from mhc_model.safe_unpickle import safe_pickle_load, safe_torch_load

_MAX_METADATA = 4 << 30  # real .metadata files reach hundreds of MB on large jobs
_MAX_SMALL = 1 << 20  # metadata.json, tracker
# mhc-manifest.json: ours, in the iteration dir of an iter-dir output; rewritten on commit
_KNOWN = {METADATA_FN, MARKER_FN, COMMON_PT, "mhc-manifest.json"}
_BUCKET_RE = re.compile(r"(^|\.)distributed\.dp_group_idx_|\.gbuf_idx_")
_FICLONE = 0x40049409  # linux/fs.h _IOW(0x94, 9, int)


@dataclass(frozen=True)
class Chunk:
    """One stored piece of an entry (the ``Entry.locator`` is a tuple of these).
    ``offsets``/``sizes`` are None for byte items."""

    offsets: tuple[int, ...] | None
    sizes: tuple[int, ...] | None
    index: MetadataIndex
    info: _StorageInfo


# ------------------------------------------------------------------------------------- locate
def _read_small(path: Path, limit: int = _MAX_SMALL) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise InvalidInputError(f"cannot read: {e.strerror or e}", path=path) from None
    if len(data) > limit:
        raise InvalidInputError(f"file larger than {limit} bytes", path=path)
    return data


def resolve_torch_dist(path: str | Path) -> tuple[Path, Path | None, int | str | None]:
    """Accept an iteration directory or a run directory holding the tracker.
    Returns ``(iter_dir, run_dir or None, iteration or None)``."""
    p = Path(path)
    if (p / TRACKER_FN).is_file() and not (p / METADATA_FN).exists():
        tracker = p / TRACKER_FN
        iteration = read_tracker(tracker)[0]
        iter_dir = p / iter_dir_name(iteration)
        if not (iter_dir / METADATA_FN).is_file():
            raise InvalidInputError(f"tracker names {iter_dir.name} but it has no {METADATA_FN}",
                                    path=tracker)
        return iter_dir, p, iteration
    if (p / METADATA_FN).is_file():
        return p, None, iteration_of(p)
    raise InvalidInputError(f"not a torch_dist checkpoint (no {METADATA_FN} and no {TRACKER_FN})",
                            path=p)


# ------------------------------------------------------------------------------------ validate
def _ints(v: Any) -> tuple[int, ...] | None:
    if isinstance(v, (tuple, list)) and all(type(x) is int and x >= 0 for x in v):
        return tuple(v)
    return None


def _check_file(iter_dir: Path, rel: Any, mpath: Path, key: str) -> int:
    """``rel`` must name a regular file inside ``iter_dir``; returns its size."""
    pp = PurePosixPath(rel) if isinstance(rel, str) else None
    if (pp is None or not rel or pp.is_absolute() or "\\" in rel or "\0" in rel
            or any(part in ("..", ".") for part in pp.parts)):
        raise InvalidInputError(f"storage path {rel!r} escapes the checkpoint directory",
                                path=mpath, key=key)
    full = iter_dir / rel
    if not full.resolve().is_relative_to(iter_dir.resolve()):
        raise InvalidInputError(f"storage path {rel!r} resolves outside the checkpoint",
                                path=mpath, key=key)
    if not full.is_file():
        raise InvalidInputError(f"data file {rel!r} is missing", path=mpath, key=key)
    return full.stat().st_size


def _validate(md: Any, iter_dir: Path, mpath: Path) -> dict[str, Entry]:
    """Type-check every field of the unpickled ``Metadata`` (BUILD can set anything) and turn it
    into entries. Each chunk must have storage, in bounds, inside an existing data file."""
    if not isinstance(md, Metadata) or not isinstance(getattr(md, "state_dict_metadata", None),
                                                      dict) \
            or not isinstance(getattr(md, "storage_data", None), dict):
        raise InvalidInputError("not a torch.distributed.checkpoint Metadata", path=mpath)
    storage: dict[MetadataIndex, _StorageInfo] = {}
    sizes: dict[str, int] = {}
    for idx, info in md.storage_data.items():
        key = getattr(idx, "fqn", None)
        if not isinstance(idx, MetadataIndex) or not isinstance(key, str) \
                or not isinstance(info, _StorageInfo):
            raise InvalidInputError("malformed storage_data entry", path=mpath)
        offset, length = getattr(info, "offset", None), getattr(info, "length", None)
        if type(offset) is not int or type(length) is not int or offset < 0 or length < 0:
            raise InvalidInputError("negative or non-integer storage offset", path=mpath, key=key)
        if not isinstance(getattr(info, "relative_path", None), str):  # before hashing it
            kind = type(getattr(info, "relative_path", None)).__name__  # no repr: may be a DAG
            raise InvalidInputError(f"storage path is a {kind}, not a string", path=mpath,
                                    key=key)
        if info.relative_path not in sizes:
            sizes[info.relative_path] = _check_file(iter_dir, info.relative_path, mpath, key)
        if info.offset + info.length > sizes[info.relative_path]:
            raise InvalidInputError(
                f"item [{info.offset}, +{info.length}) lies beyond the end of "
                f"{info.relative_path} ({sizes[info.relative_path]} bytes)", path=mpath, key=key)
        storage[idx] = info
    entries: dict[str, Entry] = {}
    used: set[MetadataIndex] = set()
    for key, sm in md.state_dict_metadata.items():
        if not isinstance(key, str):
            raise InvalidInputError("non-string key", path=mpath)
        if isinstance(sm, BytesStorageMetadata):
            idx = MetadataIndex(key)
            if idx not in storage:
                raise InvalidInputError("byte item has no storage", path=mpath, key=key)
            used.add(idx)
            info = storage[idx]
            entries[key] = Entry(key, "bytes", None, (), info.length,
                                 (Chunk(None, None, idx, info),))
            continue
        props = getattr(sm, "properties", None)
        size = _ints(getattr(sm, "size", None))
        chunks_md = getattr(sm, "chunks", None)
        if not isinstance(sm, TensorStorageMetadata) or size is None \
                or not isinstance(getattr(props, "dtype", None), torch.dtype) \
                or not isinstance(chunks_md, list):
            raise InvalidInputError("malformed tensor metadata", path=mpath, key=key)
        chunks, covered = [], 0
        for c in chunks_md:
            off, sz = _ints(getattr(c, "offsets", None)), _ints(getattr(c, "sizes", None))
            if not isinstance(c, ChunkStorageMetadata) or off is None or sz is None \
                    or len(off) != len(size) or len(sz) != len(size) \
                    or any(o + s > g for o, s, g in zip(off, sz, size)):
                raise InvalidInputError("chunk outside the global shape", path=mpath, key=key)
            idx = MetadataIndex(key, off)
            if idx not in storage:
                raise InvalidInputError(f"chunk at {list(off)} has no storage", path=mpath,
                                        key=key)
            used.add(idx)
            covered += math.prod(sz)
            chunks.append(Chunk(off, sz, idx, storage[idx]))
        # Only main replicas are written, so chunks tile the tensor: equal volume and no two
        # overlapping means an exact cover (pairwise check bounded for huge rank counts).
        if covered != math.prod(size) or (len(chunks) <= 256 and any(
                all(a.offsets[d] < b.offsets[d] + b.sizes[d] and b.offsets[d] < a.offsets[d]
                    + a.sizes[d] for d in range(len(size)))
                for i, a in enumerate(chunks) for b in chunks[i + 1:])):
            raise InvalidInputError(f"chunks do not tile the {list(size)} tensor", path=mpath,
                                    key=key)
        dtype = props.dtype
        entries[key] = Entry(key, "tensor", str(dtype).removeprefix("torch."), size,
                             math.prod(size) * dtype.itemsize, tuple(chunks))
    stray = set(storage) - used
    if stray:
        raise InvalidInputError("storage entry for no chunk", path=mpath,
                                key=sorted(i.fqn for i in stray)[0])
    return entries


# -------------------------------------------------------------------------------------- read
def read_metadata(iter_dir: Path) -> Metadata:
    """Unpickle ``iter_dir/.metadata`` with the allowlisted unpickler (no validation)."""
    mpath = iter_dir / METADATA_FN
    data = _read_small(mpath, _MAX_METADATA)
    if not data:
        raise InvalidInputError("empty file", path=mpath)
    return safe_pickle_load(data, source=mpath)


def read_torch_dist(path: str | Path) -> CheckpointView:
    """Parse a torch_dist checkpoint (iteration or run directory) into a lazy view."""
    iter_dir, run_dir, iteration = resolve_torch_dist(path)
    mpath = iter_dir / METADATA_FN
    if not (iter_dir / MARKER_FN).exists():  # before unpickling anything: say what this is
        raise InvalidInputError(
            f"no {MARKER_FN}: Megatron writes it last, so this is an incomplete torch_dist save "
            f"or a plain DCP checkpoint (--ckpt-format torch_dcp / fsdp_dtensor), which is not "
            f"supported; re-save with --ckpt-format torch_dist", path=iter_dir / MARKER_FN)
    md = read_metadata(iter_dir)
    entries = _validate(md, iter_dir, mpath)
    try:
        marker = json.loads(_read_small(iter_dir / MARKER_FN).decode("utf-8"))
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise InvalidInputError(f"invalid JSON: {str(e)[:200]}", path=iter_dir / MARKER_FN) \
            from None
    if not isinstance(marker, dict) or marker.get("sharded_backend") != "torch_dist":
        raise InvalidInputError("sharded_backend is not 'torch_dist'", path=iter_dir / MARKER_FN)
    tracker = (run_dir / TRACKER_FN).read_text("utf-8") if run_dir else None
    loader = _make_loader(iter_dir)
    if (iter_dir / COMMON_PT).is_file():  # < 0.19: a separate file, no list wrapper
        common_key = COMMON_PT
        common = safe_torch_load(iter_dir / COMMON_PT, source=iter_dir / COMMON_PT)
    elif COMMON_KEY in entries and entries[COMMON_KEY].kind == "bytes":
        common_key = COMMON_KEY
        data_file = iter_dir / entries[COMMON_KEY].locator[0].info.relative_path
        common = decode_common_state(loader(entries[COMMON_KEY]), source=data_file)
    else:
        raise InvalidInputError(f"no common state (neither {COMMON_KEY} nor {COMMON_PT}); "
                                "args and iteration would be lost", path=iter_dir)
    if not isinstance(common, dict):
        raise InvalidInputError("common state is not a dict", path=iter_dir, key=common_key)
    if iteration is None and isinstance(common.get("iteration"), int):
        iteration = common["iteration"]
    content = common.get("content_metadata")  # absent before megatron-core 0.13
    declared = content.get("distrib_optim_sharding_type") if isinstance(content, dict) else None
    if declared is not None and not isinstance(declared, str):
        raise InvalidInputError(f"content_metadata.distrib_optim_sharding_type is a "
                                f"{type(declared).__name__}, not a string", path=iter_dir,
                                key=common_key)
    opt_keys = [k for k in entries if k.startswith("optimizer.")]
    if any(_BUCKET_RE.search(k) for k in opt_keys):
        sharding = "dp_reshardable"  # bucket-keyed: whatever content_metadata claims
    else:
        sharding = (declared or "fully_reshardable") if opt_keys else None
    referenced = {c.info.relative_path for e in entries.values() for c in e.locator}
    files = sorted(p.relative_to(iter_dir).as_posix() for p in iter_dir.rglob("*") if p.is_file())
    meta = {
        "iteration": iteration, "run_dir": run_dir, "tracker": tracker,
        "common_state": common, "common_key": common_key,
        "optimizer_sharding": sharding, "optimizer_sharding_declared": declared,
        "metadata_json": marker, "storage_meta": md.storage_meta,
        "other_files": [f for f in files if f not in _KNOWN and not f.endswith(".distcp")],
        "unreferenced_data_files": [f for f in files
                                    if f.endswith(".distcp") and f not in referenced],
        "metadata_extra_attrs": sorted(set(vars(md)) - set(Metadata.__dataclass_fields__)),
        "dcp_metadata": md,
    }
    def sources(entry: Entry):
        """Each DCP chunk's storage record, streamed out of its ``torch.save`` zip without
        unpickling; a chunk in an unusual container is decoded through the reader instead."""
        itemsize = getattr(torch, entry.dtype).itemsize
        for c in entry.locator:
            path = iter_dir / c.info.relative_path
            nbytes = math.prod(c.sizes) * itemsize
            slices = None if c.info.transform_descriptors else dcp_chunk_slices(
                path, c.info.offset, c.info.length, nbytes, entry.key)
            if slices is None:
                yield path, tensor_slices(loader(entry))
                return
            yield path, slices

    def ranges(entry: Entry) -> list[StoredRange] | None:
        """The element bytes of every chunk inside its ``torch.save`` record; None when one
        chunk is not in the plain container (then it can only be checked by decoding it)."""
        itemsize = getattr(torch, entry.dtype).itemsize
        out = []
        for c in entry.locator:
            path = iter_dir / c.info.relative_path
            nbytes = math.prod(c.sizes) * itemsize
            at = None if c.info.transform_descriptors else dcp_chunk_range(
                path, c.info.offset, c.info.length, nbytes)
            if at is None:
                return None
            out.append(StoredRange(path, at, nbytes, path))
        return out

    return CheckpointView("torch_dist", iter_dir, entries, meta, loader, sources,
                          locate=lambda entry: mpath, ranges=ranges)


def decode_common_state(blob: bytes, *, source: str | Path, key: str = COMMON_KEY) -> Any:
    """Megatron stores ``torch.save([common_state_dict])``; return the dict."""
    obj = safe_torch_load(blob, source=source, key=key)
    if not isinstance(obj, list) or len(obj) != 1:
        raise InvalidInputError("expected a one-element list (Megatron ShardedObject)",
                                path=source, key=key)
    return obj[0]


def _make_loader(iter_dir: Path):
    def read_item(entry: Entry, c: Chunk) -> bytes:
        path = iter_dir / c.info.relative_path
        if c.info.transform_descriptors:  # e.g. DCP compression extensions: not decodable here
            raise InvalidInputError(f"unsupported storage transform {c.info.transform_descriptors}",
                                    path=path, key=entry.key)
        try:
            with open(path, "rb") as f:
                f.seek(c.info.offset)
                data = f.read(c.info.length)
        except OSError as e:
            raise IOFailure(f"cannot read: {e.strerror or e}", path=path, key=entry.key) from None
        if len(data) != c.info.length:
            raise InvalidInputError("data file truncated", path=path, key=entry.key)
        return data

    def load(entry: Entry) -> torch.Tensor | bytes:
        if entry.kind == "bytes":
            return read_item(entry, entry.locator[0])
        dtype = getattr(torch, entry.dtype)
        out = torch.empty(entry.shape, dtype=dtype)
        for c in entry.locator:
            src = iter_dir / c.info.relative_path
            t = safe_torch_load(read_item(entry, c), source=src, key=entry.key,
                                megatron_globals=False)
            if not isinstance(t, torch.Tensor) or t.dtype != dtype or tuple(t.shape) != c.sizes:
                raise InvalidInputError(f"stored chunk is not a {entry.dtype} tensor of shape "
                                        f"{list(c.sizes)}", path=src, key=entry.key)
            view = out
            for dim, (o, s) in enumerate(zip(c.offsets, c.sizes)):
                view = view.narrow(dim, o, s)
            view.copy_(t)
        return out

    return load


__all__ = [
    "COMMON_KEY", "COMMON_PT", "MARKER_FN", "METADATA_FN", "TRACKER_FN", "Chunk",
    "decode_common_state", "iter_dir_name", "read_metadata", "read_torch_dist",
    "resolve_torch_dist",
]
