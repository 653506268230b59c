"""The native directory format (DESIGN.md §5).

::

    config.json                          model config (JSON object); the format's commit marker
    model.safetensors                    one file, no index; or
    model-0000K-of-0000N.safetensors     shards, with
    model.safetensors.index.json         {"metadata": {"total_size": ...}, "weight_map": {...}}
    optimizer.safetensors                optional: optimizer.state.<name>.<model key> tensors
    training_state.json                  optional: iteration etc. (JSON object)
    mhc-manifest.json                    ours; ignored on read, rewritten by the commit protocol

Anything else in the directory is an error that lists it: a converter that skips what it does not
understand drops data silently. Every safetensors file goes through the strict parser, and the
index is cross-checked against the shard headers in both directions (diffusers#14719: a stale
index outlived its shards).
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from mhc_convert.commit import hooks_for
from mhc_convert.errors import InvalidInputError
from mhc_convert.formats.byte_sources import pread_slices
from mhc_convert.formats.safetensors_io import (
    TensorInfo,
    WriteItem,
    is_tensor,
    load_tensor,
    loads_strict_json,
    read_header,
    write_safetensors,
)
from mhc_convert.hashcopy import write_file
from mhc_convert.parallel import run_jobs
from mhc_convert.view import CheckpointView, Entry, OutItem, ProgressFn, StoredRange

if TYPE_CHECKING:  # torch is imported where tensors are made, not at import
    import torch

    from mhc_convert.validate import OnePassScan

CONFIG_NAME = "config.json"
SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
OPTIMIZER_NAME = "optimizer.safetensors"
TRAINING_STATE_NAME = "training_state.json"
MANIFEST_NAME = "mhc-manifest.json"
DEFAULT_SHARD_METADATA = {"format": "pt"}  # what transformers/safetensors.torch write


class ByteRange(NamedTuple):
    """Locator of a native entry: the (resolved) file and the absolute byte range in it."""

    file: Path
    offset: int
    length: int


def _read_json_object(path: Path) -> dict[str, Any]:
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as e:
        raise InvalidInputError(f"cannot read ({e.strerror})", path=path) from None
    except UnicodeDecodeError:
        raise InvalidInputError("not UTF-8", path=path) from None
    doc = loads_strict_json(text, path)
    if not isinstance(doc, dict):
        raise InvalidInputError("not a JSON object", path=path)
    return doc


def _contained(root: Path, name: str, *, where: Path, key: str | None) -> Path:
    """``root/name`` resolved, refusing names that are not plain file names or that resolve
    (through symlinks) outside ``root`` (unsloth#6796: shard paths escaping the directory)."""
    if (not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name
            or os.path.isabs(name)):
        raise InvalidInputError(f"shard path {name!r} is not a plain file name inside the "
                                "checkpoint directory", path=where, key=key)
    real = (root / name).resolve()
    if not real.is_relative_to(root.resolve()):
        raise InvalidInputError(f"shard {name!r} resolves outside the checkpoint directory "
                                f"({real})", path=where, key=key)
    return real


def _parse_index(root: Path) -> tuple[dict[str, str], dict[str, Any] | None]:
    path = root / INDEX_NAME
    doc = _read_json_object(path)
    unknown = set(doc) - {"weight_map", "metadata"}
    if unknown:
        raise InvalidInputError(f"unknown top-level fields {sorted(unknown)}", path=path)
    wm = doc.get("weight_map")
    if not isinstance(wm, dict) or not wm:
        raise InvalidInputError("weight_map missing, empty, or not an object", path=path)
    for key, name in wm.items():
        if not isinstance(name, str) or not name.endswith(".safetensors"):
            raise InvalidInputError(f"shard name {name!r} is not a *.safetensors file name",
                                    path=path, key=key)
        if name == OPTIMIZER_NAME:
            raise InvalidInputError("model key mapped to the optimizer file", path=path, key=key)
    meta = doc.get("metadata")
    if meta is not None and not isinstance(meta, dict):
        raise InvalidInputError("metadata is not an object", path=path)
    return wm, meta


def read_native(path: str | Path) -> CheckpointView:
    """Parse and validate a native directory. Reads headers and small JSON only."""
    root = Path(path)
    if not root.is_dir():
        raise InvalidInputError("not a directory", path=root)
    present = {p.name for p in root.iterdir()}
    if CONFIG_NAME not in present:
        raise InvalidInputError(f"no {CONFIG_NAME} (not a native checkpoint, or an incomplete "
                                "one)", path=root)
    config = _read_json_object(root / CONFIG_NAME)

    index_path = root / INDEX_NAME
    if INDEX_NAME in present:
        weight_map, index_meta = _parse_index(root)
        model_files = list(dict.fromkeys(weight_map.values()))
    elif SINGLE_NAME in present:
        weight_map, index_meta, model_files = None, None, [SINGLE_NAME]
    else:
        raise InvalidInputError(f"neither {SINGLE_NAME} nor {INDEX_NAME}", path=root)
    files = model_files + ([OPTIMIZER_NAME] if OPTIMIZER_NAME in present else [])

    known = {CONFIG_NAME, MANIFEST_NAME, TRAINING_STATE_NAME, *files}
    if weight_map is not None:
        known.add(INDEX_NAME)
    unknown = sorted(present - known)
    if unknown:
        raise InvalidInputError(f"unknown files {unknown}; refusing to drop them silently "
                                "(remove or move them first)", path=root)

    shard_of: dict[str, str] = {}
    headers: dict[str, tuple[Path, dict[str, TensorInfo]]] = {}
    shard_metadata: dict[str, dict[str, str] | None] = {}
    first_key_of: dict[str, str] = {}  # so errors about a shard name a key that uses it
    for k, v in (weight_map or {}).items():
        first_key_of.setdefault(v, k)
    for name in files:
        where = index_path if weight_map is not None and name != OPTIMIZER_NAME else root / name
        first_key = first_key_of.get(name)
        real = _contained(root, name, where=where, key=first_key)
        if name not in present or not real.is_file():
            raise InvalidInputError(f"names missing shard {name!r}", path=where, key=first_key)
        hdr = read_header(real)
        headers[name] = (real, hdr.tensors)
        shard_metadata[name] = hdr.metadata
    for name in files:  # duplicates first, so a key in two shards is reported as exactly that
        for key in headers[name][1]:
            if key in shard_of:
                raise InvalidInputError(f"key is in both {shard_of[key]} and {name}",
                                        path=root / name, key=key)
            shard_of[key] = name
    shard_of.clear()
    for name in files:
        for key in headers[name][1]:
            if weight_map is not None and name != OPTIMIZER_NAME and weight_map.get(key) != name:
                where_idx = (f"mapped to {weight_map[key]!r}" if key in weight_map
                             else "missing from")
                raise InvalidInputError(f"key is in this shard but {where_idx} the index",
                                        path=root / name, key=key)
            shard_of[key] = name
    for key, name in (weight_map or {}).items():
        if shard_of.get(key) != name:
            raise InvalidInputError(f"key is in the index but not in shard {name!r}",
                                    path=root / name, key=key)

    if weight_map is not None and index_meta and "total_size" in index_meta:
        _check_total_size(index_path, index_meta["total_size"], headers, model_files)

    training_state = None
    if TRAINING_STATE_NAME in present:
        training_state = _read_json_object(root / TRAINING_STATE_NAME)

    entries: dict[str, Entry] = {}
    for name in files:
        real, tensors = headers[name]
        order = [k for k in weight_map if weight_map[k] == name] if (
            weight_map is not None and name != OPTIMIZER_NAME) else list(tensors)
        for key in order:
            t = tensors[key]
            entries[key] = Entry(key, "tensor", t.dtype, t.shape, t.length,
                                 ByteRange(real, t.offset, t.length))
    infos = {k: headers[shard_of[k]][1][k] for k in entries}

    def loader(entry: Entry) -> torch.Tensor:
        return load_tensor(entry.locator.file, infos[entry.key])

    def sources(entry: Entry):
        loc = entry.locator
        yield root / shard_of[entry.key], pread_slices(loc.file, loc.offset, loc.length, entry.key)

    def ranges(entry: Entry) -> list[StoredRange]:
        loc = entry.locator
        return [StoredRange(loc.file, loc.offset, loc.length, root / shard_of[entry.key])]

    meta = {"config_json": config, "shard_of": shard_of, "index_metadata": index_meta,
            "training_state": training_state, "shard_metadata": shard_metadata,
            "indexed": weight_map is not None}
    return CheckpointView("native", root, entries, meta, loader, sources,
                          locate=lambda entry: root / shard_of[entry.key], ranges=ranges)


def _check_total_size(index_path: Path, total: Any, headers: Mapping[str, Any],
                      model_files: list[str]) -> None:
    """huggingface_hub writes the sum of tensor bytes; some scripts the sum of file sizes.
    Accept either; anything else means the index does not describe these shards."""
    if not isinstance(total, int) or isinstance(total, bool):
        raise InvalidInputError(f"metadata.total_size {total!r} is not an integer",
                                path=index_path)
    tensor_bytes = sum(t.length for f in model_files for t in headers[f][1].values())
    file_bytes = sum(headers[f][0].stat().st_size for f in model_files)
    if total not in (tensor_bytes, file_bytes):
        raise InvalidInputError(f"metadata.total_size {total} matches neither the tensor bytes "
                                f"({tensor_bytes}) nor the file sizes ({file_bytes}) of the shards",
                                path=index_path)


def _write_json(path: Path, obj: Any, *, canonical: bool = False) -> None:
    """New file, fsynced, sha256 recorded for the manifest (crash hooks file-start/-done).
    ``canonical``: sorted keys, no trailing newline: how ``HybridModel.save_pretrained``
    writes ``config.json`` (``HybridConfig.to_json``), so an unchanged config keeps its bytes."""
    text = json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False, sort_keys=canonical)
    write_file(path, (text if canonical else text + "\n").encode("utf-8"))


def write_config(out_dir: str | Path, config_json: Mapping[str, Any]) -> None:
    """Write ``config.json`` (the native marker: the commit protocol writes it last)."""
    _write_json(Path(out_dir) / CONFIG_NAME, dict(config_json), canonical=True)


def _write_item(item: OutItem, out_file: Path) -> WriteItem:
    if item.source is not None:
        src = item.source
        if src.kind != "tensor" or not isinstance(src.locator, ByteRange) or src.dtype is None:
            raise InvalidInputError("native output can only copy native safetensors entries",
                                    path=out_file, key=item.key)
        loc = src.locator
        return WriteItem(item.key, src.dtype, src.shape, src=(loc.file, loc.offset, loc.length))
    if not is_tensor(item.value):
        raise InvalidInputError("native output stores tensors only, got bytes", path=out_file,
                                key=item.key)
    return WriteItem.from_tensor(item.key, item.value)


def write_native(
    out_dir: str | Path,
    items: list[OutItem],
    config_json: Mapping[str, Any],
    shard_of: Mapping[str, str],
    progress: ProgressFn | None = None,
    *,
    shard_metadata: Mapping[str, Mapping[str, str] | None] | None = None,
    index_metadata: Mapping[str, Any] | None = None,
    training_state: Mapping[str, Any] | None = None,
    assign: Callable[[list[tuple[str, int]]], set[str]] | None = None,
    finite: OnePassScan | None = None,
) -> Callable[[Path], None]:
    """Write every file named in ``shard_of`` (key -> file name) into ``out_dir``.

    One model file named ``model.safetensors`` -> no index; otherwise an index with
    ``weight_map`` (model keys only) and ``metadata.total_size`` (tensor bytes). Keys mapped to
    ``optimizer.safetensors`` go there. ``training_state`` is written as training_state.json.
    ``config.json`` is NOT written: the returned callable writes it, for
    ``AtomicOutput.commit(marker_writer)`` to publish last. ``assign`` (distributed runs)
    maps the ``(file name, bytes)`` list to the names this rank writes; the others are skipped.
    ``finite``: the NaN/Inf check fed with the copied tensors (``validate.OnePassScan``).
    """
    out_dir = Path(out_dir)
    if not isinstance(config_json, Mapping):
        raise TypeError("config_json must be a mapping")
    keys = [it.key for it in items]
    missing = [k for k in keys if k not in shard_of]
    if missing:
        raise InvalidInputError("output key has no shard assigned", path=out_dir, key=missing[0])
    extra = sorted(set(shard_of) - set(keys))
    if extra:
        raise InvalidInputError("shard_of names a key that is not being written", path=out_dir,
                                key=extra[0])
    by_file: dict[str, list[WriteItem]] = {}
    for it in items:
        name = shard_of[it.key]
        if name not in by_file:
            _contained(out_dir, name, where=out_dir, key=it.key)
            if not name.endswith(".safetensors"):
                raise InvalidInputError(f"shard name {name!r} is not a *.safetensors file name",
                                        path=out_dir, key=it.key)
        by_file.setdefault(name, []).append(_write_item(it, out_dir / name))

    model_files = [f for f in by_file if f != OPTIMIZER_NAME]
    indexed = model_files != [SINGLE_NAME] and bool(model_files)
    units = [(f, sum(_nbytes(it) for it in w)) for f, w in by_file.items()]
    units += [(INDEX_NAME, 0)] if indexed else []
    units += [(TRAINING_STATE_NAME, 0)] if training_state is not None else []
    mine = assign(units) if assign is not None else {name for name, _ in units}
    jobs = [_shard_job(out_dir / name, witems, (shard_metadata or {}).get(
        name, DEFAULT_SHARD_METADATA), _locked(progress), finite)
        for name, witems in by_file.items() if name in mine]
    # Shards side by side (parallel.py: both cores hash); one at a time under a distributed
    # run (its progress callback talks to the rendezvous store) and under phase hooks.
    run_jobs(jobs, width=1 if assign is not None else hooks_for(out_dir).writers)
    if indexed and INDEX_NAME in mine:
        total = sum(_nbytes(it) for f in model_files for it in by_file[f])
        index = {"metadata": {**(index_metadata or {}), "total_size": total},
                 "weight_map": {k: shard_of[k] for k in sorted(keys)
                                if shard_of[k] != OPTIMIZER_NAME}}
        _write_json(out_dir / INDEX_NAME, index)
    if training_state is not None and TRAINING_STATE_NAME in mine:
        _write_json(out_dir / TRAINING_STATE_NAME, dict(training_state))
    frozen = dict(config_json)
    return lambda marker_dir: write_config(marker_dir, frozen)


def _shard_job(path: Path, witems: list[WriteItem], meta: Mapping[str, str] | None,
               progress: ProgressFn | None, finite: OnePassScan | None) -> Callable[[], None]:
    return lambda: write_safetensors(path, witems, metadata=dict(meta) if meta else None,
                                     progress=progress, finite=finite)


def _locked(progress: ProgressFn | None) -> ProgressFn | None:
    """``progress`` callable from several writer threads."""
    if progress is None:
        return None
    lock = threading.Lock()

    def cb(n: int) -> None:
        with lock:
            progress(n)
    return cb


def _nbytes(it: WriteItem) -> int:
    if it.src is not None:
        return it.src[2]
    if is_tensor(it.data):
        return it.data.numel() * it.data.element_size()
    return len(it.data or b"")
