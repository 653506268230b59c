"""Fuzz ``config.json`` of a native checkpoint through what the converter does with it:
``read_native`` -> ``HybridConfig.from_dict`` (``NativeAdapter.config``) -> the planner and the
new-tensor values of a dry-run ``enable``, and ``inspect``."""

from __future__ import annotations

import copy
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mhc_convert import engine
from mhc_convert.errors import InvalidInputError
from tests.fuzz.harness import check, dumps, fuzz_settings, json_text_mutated, json_values, mutated
from tests.fuzz.native_base import single

SRC = single()
BASE_DOC = json.loads((SRC / "config.json").read_text())
BASE_TEXT = dumps(BASE_DOC)
PATHS = [(k,) for k in BASE_DOC] + [(k, s) for k, v in BASE_DOC.items() if isinstance(v, dict)
                                    for s in v]
VALUES = st.sampled_from([0, 1, 2, 3, 4, -1, 64, 64.0, 63, 10**18, 2**63, True, False, None,
                          0.5, 1e-300, 1e308, float("inf"), float("nan"), "", "64", "M", "M/M",
                          "M-M-M*-M-", "MEG*D+-", "|", "M-M-M*-M-|", "deepseek",
                          "megatron_dsv4", "learned", "bfloat16", "float8", [], {}, [64]]) \
    | st.text(alphabet="M-*EGD+|/x", max_size=12) | json_values(3)


@st.composite
def config_doc(draw: st.DrawFn) -> dict:
    doc = copy.deepcopy(BASE_DOC)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(PATHS))
        holder = doc if len(path) == 1 else doc.get(path[0])
        if not isinstance(holder, dict):
            continue
        what = draw(st.sampled_from(["set", "set", "set", "drop", "extra"]))
        if what == "set":
            holder[path[-1]] = draw(VALUES)
        elif what == "drop":
            holder.pop(path[-1], None)
        else:
            holder[draw(st.text(max_size=8))] = draw(json_values(2))
    return doc


@st.composite
def structured(draw: st.DrawFn) -> bytes:
    text = dumps(draw(config_doc())) if draw(st.booleans()) else BASE_TEXT
    return draw(json_text_mutated(text)) if draw(st.integers(0, 3)) == 0 else text.encode()


def parse(data: bytes) -> None:
    (SRC / "config.json").write_bytes(data)
    engine.inspect(SRC)
    engine.enable(SRC, SRC.parent / "never-written", dry_run=True, allow_nonfinite=True)


def test_base_plans():
    (SRC / "config.json").write_text(BASE_TEXT)
    assert engine.enable(SRC, SRC.parent / "x", dry_run=True).plan["added"] > 0


@fuzz_settings(max_examples=400)
@given(structured())
def test_fuzz_config_structured(data):
    check("config/structured", parse, data)


@fuzz_settings(max_examples=150)
@given(mutated(BASE_TEXT.encode(), max_ops=4))
def test_fuzz_config_bytes(data):
    check("config/bytes", parse, data)


# ---------------------------------------------------------------------------- regressions
# Found by test_fuzz_config_structured: a list where a bool belongs reached the planner, whose
# shape cache hashes the config (TypeError: unhashable type: 'list'). Found writing the
# regression for it: a float hidden size reached torch.empty in the new-tensor values
# (TypeError), and 1e400 (= inf) passed every check until json.dumps(allow_nan=False) at
# write time (ValueError). HybridConfig now type-checks every field.
REGRESSIONS = {
    "list_for_bool": ('"fp32_residual_connection":false', '"fp32_residual_connection":[]'),
    "float_hidden_size": ('"hidden_size":64', '"hidden_size":64.0'),
    "inf_norm_eps": ('"norm_eps":1e-05', '"norm_eps":1e400'),
}


@pytest.mark.parametrize("name", sorted(REGRESSIONS))
def test_regression_config_field_types(name, tmp_path):
    old, new = REGRESSIONS[name]
    assert old in BASE_TEXT
    (SRC / "config.json").write_bytes(BASE_TEXT.replace(old, new).encode())
    with pytest.raises(InvalidInputError, match="invalid model config: .* must be"):
        engine.enable(SRC, tmp_path / "out", allow_nonfinite=True)  # a real (not dry) run
    assert not (tmp_path / "out").exists()


# Found by test_fuzz_config_structured after the merge of the Hugging Face detection
# (adapters._hf_config): 3000-deep nested arrays made its plain json.loads raise RecursionError,
# which escaped detection.
DEEP = b"[" * 3000 + b"]" * 3000


def test_regression_deeply_nested_config_is_invalid_input(tmp_path):
    (SRC / "config.json").write_bytes(DEEP)
    with pytest.raises(InvalidInputError, match="not valid JSON"):
        engine.inspect(SRC)
