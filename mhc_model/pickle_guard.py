"""Refuse ``torch.save`` files whose pickle would make torch's ``weights_only`` loader allocate
unbounded memory (a denial of service, not code execution).

torch's own allowlist (``torch/_weights_only_unpickler.py``) admits ``builtins.bytearray``, so a
20-byte pickle ``bytearray(16_000_000_000)`` makes ``torch.load(weights_only=True)`` allocate
16 GB before any of our checks run. No checkpoint that Megatron or torch writes calls
``bytearray`` with an integer (``torch.save`` of a bytearray passes its bytes), so a call of the
``bytearray`` global with a large integer among its arguments is refused before ``torch.load``
runs. The scan is a read of the opcode stream (``pickletools.genops``); nothing is built.
"""

from __future__ import annotations

import io
import pickletools
import zipfile
from pathlib import Path
from typing import BinaryIO

# bytearray(n) with n up to this many bytes is harmless; no real checkpoint uses one at all.
MAX_BYTEARRAY_INT = 1 << 20

_BYTEARRAY = frozenset({("builtins", "bytearray"), ("__builtin__", "bytearray")})
_TUPLES = frozenset({"TUPLE", "TUPLE1", "TUPLE2", "TUPLE3"})
_CALLS = frozenset({"REDUCE", "NEWOBJ", "NEWOBJ_EX"})
_BA = object()  # "the bytearray callable", as a tracked stack/memo value
_MARK = object()


def unbounded_allocation(pickle_bytes: bytes) -> str | None:
    """The reason ``pickle_bytes`` is refused, or None.

    Simulates the unpickler's stack from each opcode's declared effect (``stack_before`` /
    ``stack_after`` in ``pickletools``), tracking only what matters: strings (STACK_GLOBAL's
    module and name), ints, tuples of those, and the ``bytearray`` callable, through the memo
    too, so the callable or its name cannot be smuggled past the scan by PUT/GET, DUP or POP."""
    stack: list[object] = []
    marks: list[int] = []
    memo: dict[object, object] = {}
    try:
        for op, arg, _pos in pickletools.genops(pickle_bytes):
            name, before, after = op.name, op.stack_before, op.stack_after
            if name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
                memo[arg if name != "MEMOIZE" else len(memo)] = stack[-1]
                continue
            if name == "DUP":
                stack.append(stack[-1])
                continue
            kept: list[object] = []  # what stays under a mark (APPENDS' list, SETITEMS' dict)
            if pickletools.markobject in before:
                top = marks.pop()
                n_kept = before.index(pickletools.markobject)
                kept, popped = stack[top - n_kept:top], stack[top + 1:]
                del stack[top - n_kept:]
            else:
                popped = stack[len(stack) - len(before):] if before else []
                del stack[len(stack) - len(before):]
            callee = (_callable(name, arg) if name == "INST"
                      else popped[0] if name in _CALLS or name == "OBJ" else None)
            if callee is _BA and (n := _big_int(popped[1:] if name != "INST" else popped)):
                return (f"pickle calls bytearray({n}), an allocation of {n:,} bytes that no "
                        f"real checkpoint makes")
            if after == [pickletools.markobject]:
                marks.append(len(stack))
                stack.append(_MARK)
            else:
                stack.extend(kept if kept else [_value(name, arg, popped, memo)] * len(after))
    except (ValueError, EOFError, IndexError, KeyError):
        return None  # malformed: torch's own loader refuses it with its own message
    return None


def _callable(name: str, arg: object) -> object:
    module, _, attr = str(arg).partition(" ")
    return _BA if (module, attr) in _BYTEARRAY else None


def _value(name: str, arg: object, popped: list[object], memo: dict[object, object]) -> object:
    if name == "GLOBAL":
        return _callable(name, arg)
    if name == "STACK_GLOBAL":
        return _BA if tuple(popped) in _BYTEARRAY else None
    if name in ("GET", "BINGET", "LONG_BINGET"):
        return memo.get(arg)
    if name in _TUPLES:
        return tuple(popped)
    return arg if isinstance(arg, (str, int)) and not isinstance(arg, bool) else None


def _big_int(args: list[object]) -> int:
    """The largest int over MAX_BYTEARRAY_INT found in the call's arguments, else 0."""
    flat = [x for a in args for x in (a if isinstance(a, tuple) else (a,))]
    return max((x for x in flat if isinstance(x, int) and x > MAX_BYTEARRAY_INT), default=0)


def data_pickle(source: bytes | bytearray | memoryview | str | Path) -> bytes | None:
    """The ``data.pkl`` of a ``torch.save`` zip (a file path or the bytes), or None when the
    input is no zip or cannot be read (torch's loader then reports it)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _zip_pickle(io.BytesIO(source))
    try:
        with open(source, "rb") as stream:
            return _zip_pickle(stream)
    except OSError:
        return None


def _zip_pickle(stream: BinaryIO) -> bytes | None:
    try:
        with zipfile.ZipFile(stream) as zf:
            infos = [i for i in zf.infolist()
                     if i.filename.endswith("/data.pkl") or i.filename == "data.pkl"]
            # torch writes members stored; a compressed one (a zip bomb?) is torch's to refuse
            if len(infos) != 1 or infos[0].compress_type != zipfile.ZIP_STORED:
                return None
            return zf.read(infos[0])
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return None


def refusal(source: bytes | bytearray | memoryview | str | Path) -> str | None:
    """Why the ``torch.save`` data at ``source`` must not reach ``torch.load``, or None."""
    data = data_pickle(source)
    return unbounded_allocation(data) if data is not None else None
