"""Fuzz the native index (``model.safetensors.index.json``) through ``read_native`` and a
dry-run ``enable`` (the index decides which keys and shards the planner sees)."""

from __future__ import annotations

import copy

from hypothesis import given
from hypothesis import strategies as st

from mhc_convert import engine
from mhc_convert.formats.native import read_native
from tests.fuzz.harness import check, dumps, fuzz_settings, json_text_mutated, json_values, mutated
from tests.fuzz.native_base import INDEX, SHARDS, sharded

SRC, BASE_DOC = sharded()
KEYS = list(BASE_DOC["weight_map"])
TOTAL = BASE_DOC["metadata"]["total_size"]
FILE_BYTES = sum((SRC / s).stat().st_size for s in SHARDS)
BASE_TEXT = dumps(BASE_DOC)

SHARD_NAMES = st.sampled_from([
    *SHARDS, "model-00003-of-00002.safetensors", "optimizer.safetensors", "config.json",
    "../model-00001-of-00002.safetensors", "/etc/passwd.safetensors", ".safetensors",
    "a/b.safetensors", "x\\y.safetensors", "nul\x00.safetensors", "." , "..",
    "x" * 300 + ".safetensors", "model.safetensors", INDEX, "mhc-manifest.json",
]) | st.text(max_size=12).map(lambda s: s + ".safetensors") | json_values(2)
TOTALS = st.sampled_from([TOTAL, FILE_BYTES, TOTAL + 1, TOTAL - 1, 0, -1, 2**64, True,
                          float(TOTAL), str(TOTAL), None]) | json_values(2)


@st.composite
def index_doc(draw: st.DrawFn) -> dict:
    doc = copy.deepcopy(BASE_DOC)
    wm = doc["weight_map"]
    for _ in range(draw(st.integers(1, 4))):
        what = draw(st.sampled_from(["shard", "drop", "add", "rename", "total", "meta",
                                     "weight_map", "extra", "drop_meta", "drop_wm"]))
        key = draw(st.sampled_from(KEYS))
        if what == "shard" and isinstance(wm, dict):
            wm[key] = draw(SHARD_NAMES)
        elif what == "drop" and isinstance(wm, dict):
            wm.pop(key, None)
        elif what == "add" and isinstance(wm, dict):
            wm[draw(st.text(max_size=20) | st.just(key + ".x"))] = draw(SHARD_NAMES)
        elif what == "rename" and isinstance(wm, dict) and key in wm:
            wm[draw(st.text(max_size=20))] = wm.pop(key)
        elif what == "total" and isinstance(doc.get("metadata"), dict):
            doc["metadata"]["total_size"] = draw(TOTALS)
        elif what == "meta":
            doc["metadata"] = draw(json_values())
        elif what == "weight_map":
            doc["weight_map"] = wm = draw(json_values() | st.just({}))
        elif what == "extra":
            doc[draw(st.text(max_size=8))] = draw(json_values(2))
        elif what == "drop_meta":
            doc.pop("metadata", None)
        elif what == "drop_wm":
            doc.pop("weight_map", None)
    return doc


@st.composite
def structured(draw: st.DrawFn) -> bytes:
    text = dumps(draw(index_doc())) if draw(st.booleans()) else BASE_TEXT
    return draw(json_text_mutated(text)) if draw(st.booleans()) else text.encode()


def parse(data: bytes) -> None:
    (SRC / INDEX).write_bytes(data)
    read_native(SRC)
    engine.enable(SRC, SRC.parent / "never-written", dry_run=True, allow_nonfinite=True)


def test_base_reads():
    (SRC / INDEX).write_text(BASE_TEXT)
    assert len(read_native(SRC).entries) == len(KEYS)


@fuzz_settings(max_examples=300)
@given(structured())
def test_fuzz_index_structured(data):
    check("index/structured", parse, data)


@fuzz_settings(max_examples=150)
@given(mutated(BASE_TEXT.encode(), max_ops=6))
def test_fuzz_index_bytes(data):
    check("index/bytes", parse, data)
