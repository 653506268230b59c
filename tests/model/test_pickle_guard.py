"""The allocation guard in front of ``torch.load(weights_only=True)`` (mhc_model/pickle_guard.py):
torch's own allowlist admits ``builtins.bytearray``, so ``bytearray(2**40)`` in a pickle would
allocate before any check of ours; the guard refuses it, however the callable is reached, and
passes every checkpoint Megatron wrote for our fixtures."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import pytest
import torch

from mhc_model.errors import InvalidInputError
from mhc_model.pickle_guard import MAX_BYTEARRAY_INT, data_pickle, refusal, unbounded_allocation
from mhc_model.safe_unpickle import safe_torch_load
from tests.paths import ROOT

HUGE = 1 << 40  # without the guard: a MemoryError (or a 1 TB allocation), never a clean refusal


class _Bomb:
    def __init__(self, n: int = HUGE):
        self.n = n

    def __reduce__(self):
        return (bytearray, (self.n,))


def _saved(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@pytest.mark.parametrize("protocol", range(0, pickle.HIGHEST_PROTOCOL + 1))
def test_bytearray_of_an_int_is_refused_in_every_protocol(protocol):
    why = unbounded_allocation(pickle.dumps({"a": [1, _Bomb()]}, protocol=protocol))
    assert why is not None and f"bytearray({HUGE})" in why


# Hand-written opcode streams that reach the callable or its name indirectly.
SMUGGLED = {
    # GLOBAL; BINPUT 0; POP; BINGET 0; BININT 2**30; TUPLE1; REDUCE
    "memo get": b"\x80\x02cbuiltins\nbytearray\nq\x000h\x00J\x00\x00\x00\x40\x85R.",
    # the two names memoized, popped, fetched back, then STACK_GLOBAL
    "memoized names": (b"\x80\x04\x8c\x08builtins\x94\x8c\tbytearray\x94" b"00"
                       b"h\x00h\x01\x93J\x00\x00\x00\x40\x85R."),
    # GLOBAL; DUP; POP; BININT; TUPLE1; REDUCE
    "dup": b"\x80\x02cbuiltins\nbytearray\n20J\x00\x00\x00\x40\x85R.",
    # inside a list built with MARK ... APPENDS
    "under a mark": b"\x80\x02](cbuiltins\nbytearray\nJ\x00\x00\x00\x40\x85Re.",
}


@pytest.mark.parametrize("name", SMUGGLED)
def test_smuggled_callable_is_still_seen(name):
    why = unbounded_allocation(SMUGGLED[name])
    assert why is not None and "bytearray(1073741824)" in why, name


def test_harmless_uses_pass():
    assert unbounded_allocation(pickle.dumps([bytearray(b"abc"), 10**15], protocol=2)) is None
    assert unbounded_allocation(pickle.dumps(_Bomb(MAX_BYTEARRAY_INT), protocol=2)) is None
    assert unbounded_allocation(b"not a pickle") is None  # torch's own loader reports it


def test_safe_torch_load_refuses_before_torch_runs():
    blob = _saved({"args": 1, "x": _Bomb()})
    with pytest.raises(InvalidInputError, match=r"common\.pt: key 'k': pickle calls "
                                                 rf"bytearray\({HUGE}\)") as e:
        safe_torch_load(blob, source="common.pt", key="k")
    assert e.value.exit_code == 3


def _megatron_pickles() -> list[Path]:
    ext = ROOT / "fixtures" / "external"
    return sorted(ext.rglob("*.pt"))


def test_every_megatron_written_file_passes():
    files = _megatron_pickles()
    assert len(files) >= 10  # the committed Megatron fixtures
    for path in files:
        assert data_pickle(path) is not None, path  # really scanned, not skipped as "no zip"
        assert refusal(path) is None, path
