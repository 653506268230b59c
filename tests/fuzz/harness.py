"""Shared machinery of the parser fuzzers (research/reliability.md §4, F2).

Each target is a function of raw bytes that parses them through the project's real entry
point. The property, for every input: the call returns, or raises a ``ConvertError`` subclass
(the one hierarchy the CLI maps to exit codes); nothing else escapes, and no single input takes
1 s or more of wall time. ``TALLY`` counts the inputs each target saw; the conftest prints it at
the end of the session (``fuzz: <target> <n> inputs``).

Hypothesis runs derandomized (the same inputs on every run, so CI is reproducible) with no
deadline of its own: the 1 s limit is asserted here, per input, and a slow input is timed a
second time before it fails the test so that one scheduler stall on a shared box is not a
finding while a consistently slow input is.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from mhc_model.errors import ConvertError

LIMIT_S = 1.0
TALLY: Counter[str] = Counter()
SECONDS: Counter[str] = Counter()
OUTCOMES: dict[str, Counter[str]] = {}


def fuzz_settings(max_examples: int) -> settings:
    return settings(derandomize=True, deadline=None, max_examples=max_examples, database=None,
                    suppress_health_check=list(HealthCheck), print_blob=False)


def _once(fn: Callable[[bytes], Any], data: bytes) -> tuple[float, str]:
    t0 = time.perf_counter()
    try:
        fn(data)
        outcome = "ok"
    except ConvertError as e:
        outcome = type(e).__name__
    except BaseException as e:  # the property under test: nothing else may escape
        raise AssertionError(f"{type(e).__name__} escaped the error hierarchy for input "
                             f"{data[:300]!r} (len {len(data)}): {e}") from e
    return time.perf_counter() - t0, outcome


def check(target: str, fn: Callable[[bytes], Any], data: bytes) -> str:
    """Run one input through ``fn``; assert the property; return the outcome's name."""
    TALLY[target] += 1
    dt, outcome = _once(fn, data)
    if dt >= LIMIT_S:
        dt, outcome = _once(fn, data)  # confirm: a stall of the box is not a finding
        assert dt < LIMIT_S, f"{target}: input took {dt:.2f} s (twice): {data[:300]!r}"
    SECONDS[target] += dt
    OUTCOMES.setdefault(target, Counter())[outcome] += 1
    return outcome


def note(target: str, label: str) -> None:
    """Count a milestone inside a target (e.g. how many generated pickles unpickled at all)."""
    OUTCOMES.setdefault(target, Counter())[label] += 1


# --------------------------------------------------------------------------------- byte ops
INTERESTING = [0x00, 0x01, 0x7F, 0x80, 0xFF, ord("{"), ord("}"), ord('"'), ord("."), ord("0")]


HAVOC = ("flip", "set", "insert", "delete", "dup", "truncate")


@st.composite
def mutated(draw: st.DrawFn, base: bytes, max_ops: int = 6, ops: tuple[str, ...] = HAVOC
            ) -> bytes:
    """``base`` after 1..max_ops raw edits: bit flips, byte sets, inserts, deletes, slice
    duplication, truncation (what a fuzzer's havoc stage does)."""
    buf = bytearray(base)
    for _ in range(draw(st.integers(1, max_ops))):
        op = draw(st.sampled_from(ops))
        n = len(buf)
        pos = draw(st.integers(0, max(n - 1, 0)))
        if op == "flip" and n:
            buf[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and n:
            buf[pos] = draw(st.sampled_from(INTERESTING) | st.integers(0, 255))
        elif op == "insert":
            buf[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete" and n:
            del buf[pos:pos + draw(st.integers(1, 16))]
        elif op == "dup" and n:
            buf[pos:pos] = buf[pos:pos + draw(st.integers(1, 64))]
        elif op == "truncate":
            del buf[pos:]
    return bytes(buf)


# --------------------------------------------------------------------------------- JSON ops
def json_values(max_leaves: int = 6) -> st.SearchStrategy[Any]:
    """Arbitrary JSON-able values, biased towards the numbers parsers get wrong."""
    ints = st.integers() | st.sampled_from([0, -1, 1, 2**31, 2**63 - 1, 2**63, 2**64, -2**63,
                                            10**30])
    leaves = (st.none() | st.booleans() | ints
              | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12))
    return st.recursive(leaves, lambda c: st.lists(c, max_size=4)
                        | st.dictionaries(st.text(max_size=8), c, max_size=4),
                        max_leaves=max_leaves)


@st.composite
def json_text_mutated(draw: st.DrawFn, text: str) -> bytes:
    """A JSON document after one lexical edit that an object-level edit cannot express:
    a number of thousands of digits, a NaN/Infinity literal, deep nesting, a duplicated
    member, a BOM, invalid UTF-8, or a dangling tail."""
    op = draw(st.sampled_from(["digits", "constant", "nest", "dup_member", "bom", "badutf8",
                               "tail", "none"]))
    pos = draw(st.integers(0, len(text)))
    if op == "digits":  # CPython refuses int literals over 4300 digits with a bare ValueError
        digits = "9" * draw(st.sampled_from([4301, 5000, 20000]))
        i = next((j for j in range(pos, len(text)) if text[j].isdigit()), None)
        text = text[:i] + digits + text[i:] if i is not None else text + digits
    elif op == "constant":
        i = text.find(":", pos)
        lit = draw(st.sampled_from(["NaN", "Infinity", "-Infinity"]))
        text = text[:i + 1] + lit + "," + text[i + 1:] if i >= 0 else text
    elif op == "nest":
        depth = draw(st.sampled_from([50, 3000, 100_000]))
        text = text[:pos] + "[" * depth + "]" * depth + text[pos:]
    elif op == "dup_member" and text.startswith("{"):
        i = text.find(",", 1)
        if i > 0:
            text = "{" + text[1:i] + "," + text[1:]
    elif op == "bom":
        text = "\ufeff" + text
    elif op == "tail":
        text = text + draw(st.sampled_from(["x", "{}", "\x00", "]", " 1"]))
    raw = text.encode("utf-8")
    if op == "badutf8":
        raw = raw[:pos] + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80"])) + raw[pos:]
    return raw


def dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


__all__ = ["LIMIT_S", "TALLY", "check", "dumps", "fuzz_settings", "json_text_mutated",
           "json_values", "mutated", "note"]
