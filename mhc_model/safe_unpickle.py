"""Allowlisted unpickling for checkpoint metadata and Megatron common state (DESIGN.md §5, §6).

Two pickle dialects reach us from a Megatron ``torch_dist`` checkpoint:

* ``.metadata`` is a raw ``pickle.dump`` of torch's DCP ``Metadata`` (no zip container), so torch's
  ``weights_only`` loader cannot read it. ``SafeUnpickler`` resolves only an explicit table of
  globals (the DCP metadata dataclasses, ``torch.Size``, torch dtypes, ...).
* ``common_state/shard_0_1``, ``common.pt`` and other ShardedObjects are ``torch.save`` zip blobs.
  ``safe_torch_load`` runs torch's own ``weights_only=True`` loader with a small extra allowlist
  (``argparse.Namespace`` and stand-ins for the Megatron classes that Megatron itself allowlists in
  ``megatron/core/safe_globals.py``; megatron is not installed here).

Stand-ins keep their qualified Megatron names: ``safe_torch_save`` writes them back under exactly
those names, so an edited common state still loads in Megatron with the real enums.

Every refusal is an ``InvalidInputError`` naming the file, the key and the refused global; the
input's code never runs because nothing outside the table is ever imported or called.
"""

from __future__ import annotations

import argparse
import io
import pathlib
import pickle
import re
import signal
import threading
import types
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint.filesystem as _dcp_fs
import torch.distributed.checkpoint.metadata as _dcp_md
import torch.distributed.checkpoint.planner as _dcp_planner

from mhc_model import pickle_guard
from mhc_model.errors import InvalidInputError


# ------------------------------------------------------------------------------------------------
# Stand-ins for Megatron classes (megatron is not a dependency).
class MegatronEnumStandIn:
    """Inert replacement for a Megatron ``enum.Enum`` member. Enums pickle as ``Cls(value)``
    (REDUCE), so the stand-in only records the value; it pickles back the same way."""

    _qualname = "megatron.?"

    def __init__(self, value: Any = None):
        self.value = value

    def __reduce__(self):
        return (type(self), (self.value,))

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.value == self.value  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((self._qualname, repr(self.value)))

    def __repr__(self) -> str:
        return f"<{self._qualname}({self.value!r}) stand-in>"


class MegatronRecordStandIn:
    """Inert replacement for a Megatron dataclass/plain object (``OptimizerConfig``, the dummy
    ``MCoreMetadata``/``MCoreSavePlan``): NEWOBJ + BUILD just fill ``__dict__``."""

    _qualname = "megatron.?"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and vars(other) == vars(self)

    __hash__ = None  # type: ignore[assignment]  # mutable record, like the dataclass it stands for

    def __repr__(self) -> str:
        return f"<{self._qualname} stand-in {vars(self)!r}>"


def _standin(qualname: str, base: type) -> type:
    module, name = qualname.rsplit(".", 1)
    # __module__ is set to ours on purpose: pickle must never try to import megatron; the real
    # name is written explicitly by _StandInPickler.save_global.
    return type(name, (base,), {"_qualname": qualname, "__qualname__": name})


_ENUM_NAMES = [
    "megatron.core.enums.ModelType",
    "megatron.core.transformer.enums.ModelType",
    "megatron.core.transformer.enums.AttnBackend",
    "megatron.core.transformer.enums.CudaGraphModule",
    "megatron.core.transformer.enums.CudaGraphScope",
    "megatron.core.transformer.enums.InferenceCudaGraphScope",
    "megatron.core.rerun_state_machine.RerunDiagnostic",
    "megatron.core.rerun_state_machine.RerunMode",
    "megatron.core.rerun_state_machine.RerunState",
]
_RECORD_NAMES = [
    "megatron.core.optimizer.optimizer_config.OptimizerConfig",
    "megatron.core.optimizer.OptimizerConfig",
    # Dummy classes Megatron keeps so old `.metadata` files still unpickle (strategies/torch.py).
    "megatron.core.dist_checkpointing.strategies.torch.MCoreMetadata",
    "megatron.core.dist_checkpointing.strategies.torch.MCoreSavePlan",
]
STANDINS: dict[str, type] = {n: _standin(n, MegatronEnumStandIn) for n in _ENUM_NAMES}
STANDINS.update({n: _standin(n, MegatronRecordStandIn) for n in _RECORD_NAMES})
_STANDIN_NAME: dict[type, str] = {cls: name for name, cls in STANDINS.items()}


# ------------------------------------------------------------------------------------------------
# Raw pickle (`.metadata`).
def _latin1_encode(obj: str, encoding: str = "latin1") -> bytes:
    """Protocol-2 pickles spell ``bytes`` as ``_codecs.encode(str, 'latin1')``; any other codec
    (zlib, rot13, ...) has no business in checkpoint metadata."""
    if encoding not in ("latin1", "latin-1") or not isinstance(obj, str):
        raise pickle.UnpicklingError(f"_codecs.encode with codec {encoding!r} is not allowed")
    return obj.encode("latin1")


_MAX_RANGE = 1 << 16  # a DCP Metadata pickles no range at all; a long one is an attack


def _bounded_range(*args: Any) -> range:
    """``range``, refused when long: ``frozenset(range(2**31))`` is a 50-byte pickle that
    takes minutes and ~100 GB to unpickle (set/frozenset/torch.Size materialize it)."""
    r = range(*args)
    if len(r) > _MAX_RANGE:
        raise pickle.UnpicklingError(f"range of {len(r)} elements is not allowed")
    return r


def _no_int_bytearray(*args: Any) -> bytearray:
    """``bytearray``, but not ``bytearray(n)``: a pickled bytearray always carries its
    content (protocol 2: ``bytearray(str, 'latin-1')``); a count allocates n zero bytes."""
    if args and not isinstance(args[0], (str, bytes, bytearray)):
        raise pickle.UnpicklingError("bytearray from a count or iterable is not allowed")
    return bytearray(*args)


_MAX_KEY_NODES = 1 << 16  # a real key (a MetadataIndex: fqn + offsets) has a handful
_ATOMS = (str, int, bytes, float, bool, type(None))


def _children(x: Any) -> list[Any]:
    if isinstance(x, (tuple, list, set, frozenset)):
        return list(x)
    if isinstance(x, dict):
        return [*x.keys(), *x.values()]
    if isinstance(x, (*_ATOMS, type)) or not hasattr(x, "__dict__"):
        return []
    return list(vars(x).values())  # dataclass instances hash their fields


def _check_key(obj: Any) -> None:
    """Refuse a dict key or set element whose hash would visit over ``_MAX_KEY_NODES``
    objects. Tuples shared through the memo form a DAG: 60 ``DUP, TUPLE2`` pairs build a
    tuple whose hash walks 2**60 leaves (tuple hashes are not cached), so a few hundred bytes
    of ``.metadata`` would hang the reader. Counted per occurrence, memoized per object."""
    if type(obj) in _ATOMS:
        return
    weight: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[Any, bool]] = [(obj, False)]
    while stack:
        x, expanded = stack.pop()
        if expanded:
            on_path.discard(id(x))
            w = 1 + sum(weight.get(id(k), 1) for k in _children(x))
            if w > _MAX_KEY_NODES:
                raise pickle.UnpicklingError(f"a {type(obj).__name__} used as a key or set "
                                             f"element expands to over {_MAX_KEY_NODES} objects")
            weight[id(x)] = w
        elif id(x) not in weight and id(x) not in on_path:  # on_path: a cycle, counted once
            on_path.add(id(x))
            stack.append((x, True))
            stack.extend((k, False) for k in _children(x))


def _checked_collection(kind: type, pairs: bool = False) -> Any:
    """``set``/``frozenset``/``OrderedDict`` called by REDUCE: check what they will hash."""
    def build(*args: Any) -> Any:
        if args and isinstance(args[0], (list, tuple)):
            for item in args[0]:
                _check_key(item[0] if pairs and isinstance(item, (tuple, list)) and item
                           else item)
        return kind(*args)
    build.__name__ = kind.__name__
    return build


def _metadata_table() -> dict[tuple[str, str], Any]:
    table: dict[tuple[str, str], Any] = {}
    for mod, names in (
        (_dcp_md, ["Metadata", "MetadataIndex", "TensorStorageMetadata", "BytesStorageMetadata",
                   "ChunkStorageMetadata", "TensorProperties", "StorageMeta",
                   "_MEM_FORMAT_ENCODING"]),
        (_dcp_fs, ["_StorageInfo", "_StoragePrefix"]),
        # `all_local_plans`, attached by Megatron's decentralized save planner.
        (_dcp_planner, ["SavePlan", "WriteItem", "WriteItemType", "TensorWriteData"]),
    ):
        for name in names:
            if hasattr(mod, name):
                table[(mod.__name__, name)] = getattr(mod, name)
    # torch.dtype pickles as the global `torch.<name>`; resolve only real dtype objects.
    for name in dir(torch):
        if isinstance(getattr(torch, name, None), torch.dtype):
            table[("torch", name)] = getattr(torch, name)
    table.update({
        ("torch", "Size"): torch.Size,
        ("torch", "device"): torch.device,
        # torch.layout pickles through this helper (a dict lookup by name, no code from input).
        ("torch.serialization", "_get_layout"): torch.serialization._get_layout,
        ("collections", "OrderedDict"): _checked_collection(
            __import__("collections").OrderedDict, pairs=True),
        ("builtins", "set"): _checked_collection(set),
        ("builtins", "frozenset"): _checked_collection(frozenset),
        ("builtins", "slice"): slice,
        ("builtins", "complex"): complex,
        ("builtins", "bytearray"): _no_int_bytearray,
        ("builtins", "range"): _bounded_range,
        ("_codecs", "encode"): _latin1_encode,
    })
    for name, cls in STANDINS.items():
        mod, attr = name.rsplit(".", 1)
        if "dist_checkpointing" in mod:
            table[(mod, attr)] = cls
    return table


_METADATA_TABLE = _metadata_table()


class SafeUnpickler(pickle._Unpickler):  # type: ignore[name-defined]
    """The pure-Python unpickler, whose ``find_class`` resolves only ``_METADATA_TABLE``.
    Persistent ids are refused by the base class (no ``persistent_load``).

    Not the C ``pickle.Unpickler``: its memo is an array grown to twice any PUT index, so the
    9 bytes ``PROTO 2, NONE, LONG_BINPUT 2**30, STOP`` make it allocate and zero 16 GB. Here the
    memo is a dict, and every dict key and set element goes through ``_check_key`` before it
    is hashed. The price: about 9x the C unpickler's time (12 ms for the fixture's 54 kB)."""

    dispatch = dict(pickle._Unpickler.dispatch)  # type: ignore[attr-defined]

    def __init__(self, file: Any, *, source: str | Path, key: str | None = None):
        super().__init__(file)
        self.source = str(source)
        self.key = key

    # Between MARK and SETITEMS/DICT/ADDITEMS/FROZENSET, ``self.stack`` holds the marked items.
    def _load_setitem(self) -> None:
        _check_key(self.stack[-2])
        super().load_setitem()

    def _load_setitems(self) -> None:
        for k in self.stack[::2]:
            _check_key(k)
        super().load_setitems()

    def _load_dict(self) -> None:
        for k in self.stack[::2]:
            _check_key(k)
        super().load_dict()

    def _load_additems(self) -> None:
        for k in self.stack:
            _check_key(k)
        super().load_additems()

    def _load_frozenset(self) -> None:
        for k in self.stack:
            _check_key(k)
        super().load_frozenset()

    dispatch[pickle.SETITEM[0]] = _load_setitem
    dispatch[pickle.SETITEMS[0]] = _load_setitems
    dispatch[pickle.DICT[0]] = _load_dict
    dispatch[pickle.ADDITEMS[0]] = _load_additems
    dispatch[pickle.FROZENSET[0]] = _load_frozenset

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _METADATA_TABLE[(module, name)]
        except KeyError:
            raise InvalidInputError(
                f"refused pickle global '{module}.{name}' (not in the metadata allowlist)",
                path=self.source, key=self.key,
            ) from None


def safe_pickle_load(data: bytes, *, source: str | Path, key: str | None = None) -> Any:
    """Unpickle ``data`` with ``SafeUnpickler``; any failure becomes ``InvalidInputError``."""
    try:
        return SafeUnpickler(io.BytesIO(data), source=source, key=key).load()
    except InvalidInputError:
        raise
    except (Exception, RecursionError) as exc:  # truncated, garbage, bad opcode, BUILD failure
        raise InvalidInputError(
            f"malformed pickle ({type(exc).__name__}: {exc})", path=source, key=key
        ) from None


# ------------------------------------------------------------------------------------------------
# torch.save blobs (common state, ShardedObjects, common.pt).
def _torch_allowlist() -> list[Any]:
    allowed: list[Any] = [
        argparse.Namespace, types.SimpleNamespace, pathlib.PosixPath, io.BytesIO, signal.Signals,
        torch._C.Generator,  # legacy-format rng state, as Megatron allowlists it
    ]
    allowed += [(cls, name) for name, cls in STANDINS.items()]
    return allowed


_TORCH_ALLOWLIST = _torch_allowlist()
_ALLOWLIST_LOCK = threading.Lock()
_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")


def safe_torch_load(
    data: bytes | str | Path, *, source: str | Path, key: str | None = None,
    megatron_globals: bool = True,
) -> Any:
    """``torch.load(weights_only=True, map_location='cpu')`` plus the explicit Megatron
    allowlist (``megatron_globals=False``: torch's own allowlist only, e.g. for tensor chunks).
    ``data`` is the blob itself or a file path. Refusals and corrupt input raise
    ``InvalidInputError`` naming ``source``/``key`` and, where torch names it, the global."""
    stream: Any = io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data
    if (why := pickle_guard.refusal(data)) is not None:
        raise InvalidInputError(why, path=source, key=key)
    try:
        if not megatron_globals:
            return torch.load(stream, map_location="cpu", weights_only=True)
        # torch's allowlist is process-global: serialize our temporary additions, and add only
        # what is not registered yet so leaving the context never removes someone else's global.
        with _ALLOWLIST_LOCK:
            present = set(torch.serialization.get_safe_globals())
            extra = [g for g in _TORCH_ALLOWLIST if g not in present]
            with torch.serialization.safe_globals(extra):
                # weights_only passed explicitly: TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD can't flip it.
                return torch.load(stream, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise InvalidInputError("file not found", path=source, key=key) from None
    except (Exception, RecursionError) as exc:
        text = str(exc)
        m = _GLOBAL_RE.search(text)
        if m:  # torch strips "builtins." from the name it reports; put it back
            name = m.group(1) if "." in m.group(1) else f"builtins.{m.group(1)}"
            msg = f"refused pickle global '{name}' (not in the allowlist)"
        else:
            first = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(exc).__name__)
            msg = f"cannot decode torch.save data safely ({type(exc).__name__}: {first[:300]})"
        raise InvalidInputError(msg, path=source, key=key) from None


class _StandInPickler(pickle._Pickler):  # type: ignore[name-defined]
    """Python pickler that writes stand-in classes under their real Megatron names (the C
    pickler cannot: it would try to import megatron to verify the name)."""

    def save_global(self, obj: Any, name: str | None = None) -> None:
        qual = _STANDIN_NAME.get(obj) if isinstance(obj, type) else None
        if qual is None:
            return super().save_global(obj, name)
        module, attr = qual.rsplit(".", 1)
        if self.proto >= 4:
            self.save(module)
            self.save(attr)
            self.write(pickle.STACK_GLOBAL)
        else:
            self.write(pickle.GLOBAL + f"{module}\n{attr}\n".encode())
        self.memoize(obj)


_STANDIN_PICKLE_MODULE = types.SimpleNamespace(__name__="pickle", Pickler=_StandInPickler)


def safe_torch_save(obj: Any) -> bytes:
    """``torch.save(obj)`` into bytes; stand-ins are written under their Megatron names."""
    buf = io.BytesIO()
    torch.save(obj, buf, pickle_module=_STANDIN_PICKLE_MODULE)
    return buf.getvalue()
