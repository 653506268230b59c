"""Fuzz the ``torch.load`` allowlist route (``safe_torch_load``: torch's ``weights_only``
unpickler plus our Megatron stand-ins) with the real common state of the megatron-core
0.19.2 checkpoint: raw byte havoc on its ``torch.save`` zip, havoc on the pickle inside a
re-zipped (CRC-valid) archive, and object-level edits of the state itself (args fields set to
anything). The blob goes through what the converter does with it: ``decode_common_state`` ->
``megatron_config``, and, as ``common.pt``, through a dry-run ``enable``."""

from __future__ import annotations

import argparse
import copy
import io
import tempfile
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fixtures.hostile_sources import ITER, copy_megatron
from mhc_convert import engine
from mhc_convert.adapters.megatron_args import megatron_config
from mhc_convert.errors import InvalidInputError
from mhc_convert.formats import torch_dist as td
from mhc_model.safe_unpickle import safe_torch_save
from tests.fuzz.harness import check, fuzz_settings, json_values, mutated

# Havoc on the protocol byte makes torch warn about the protocol before refusing the pickle.
pytestmark = pytest.mark.filterwarnings("ignore:Detected pickle protocol")
WORK = Path(tempfile.mkdtemp(prefix="mhc-fuzz-common-"))
RUN = copy_megatron(WORK)
ITER_DIR = RUN / ITER
VIEW = td.read_torch_dist(RUN)
COMMON = VIEW.meta["common_state"]
ENTRIES = VIEW.entries
SHARD_BLOB = safe_torch_save([COMMON])  # what common_state/shard_0_1 holds
PICKLE_NAME = next(n for n in zipfile.ZipFile(io.BytesIO(SHARD_BLOB)).namelist()
                   if n.endswith("/data.pkl"))


def decode(blob: bytes) -> None:
    common = td.decode_common_state(blob, source=ITER_DIR / "__0_0.distcp")
    if isinstance(common, dict) and "args" in common:
        megatron_config(common["args"], ITER_DIR, ENTRIES)


def as_common_pt(blob: bytes) -> None:
    (ITER_DIR / td.COMMON_PT).write_bytes(blob)
    try:
        engine.enable(RUN, WORK / "never-written", dry_run=True, allow_nonfinite=True)
    finally:
        (ITER_DIR / td.COMMON_PT).unlink()


def test_base_decodes():
    decode(SHARD_BLOB)
    as_common_pt(safe_torch_save(COMMON))


@fuzz_settings(max_examples=200)
@given(mutated(SHARD_BLOB, max_ops=3, ops=("flip", "set", "set", "insert", "delete", "truncate")))
def test_fuzz_common_state_zip_bytes(data):
    check("torch_load/zip_bytes", decode, data)


def rezip(blob: bytes, pickle_bytes: bytes) -> bytes:
    src = zipfile.ZipFile(io.BytesIO(blob))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, pickle_bytes if info.filename == PICKLE_NAME
                         else src.read(info))
    return out.getvalue()


BASE_PICKLE = zipfile.ZipFile(io.BytesIO(SHARD_BLOB)).read(PICKLE_NAME)


@fuzz_settings(max_examples=300)
@given(mutated(BASE_PICKLE, max_ops=3, ops=("flip", "set", "set", "insert", "delete", "dup")))
def test_fuzz_common_state_pickle(data):
    check("torch_load/pickle", decode, rezip(SHARD_BLOB, data))


# -------------------------------------------------------------------- object-level edits
ARG_NAMES = sorted(vars(COMMON["args"]))
ODD = st.sampled_from([
    None, 0, -1, 1, 2, 3, 4, 64, 2**63, 10**30, True, False, 0.0, 1e-300, float("inf"),
    float("nan"), "", "RMSNorm", "LayerNorm", "rope", "none", "M", "M*M", "M/M", "bf16",
    torch.bfloat16, torch.float8_e4m3fn, [1], {"a": 1}, (1, 2), torch.zeros(2),
]) | json_values(2)
EXTRA_ARGS = st.sampled_from(["mamba_num_heads", "padded_vocab_size", "vocab_size",
                              "enable_mhc_connections", "mhc_num_residual_streams",
                              "num_residual_streams", "enable_hyper_connections",
                              "mhc_convention", "mhc_output_contract", "group_query_attention",
                              "params_dtype", "hidden_size", "swiglu", "normalization"])


@st.composite
def edited_common(draw: st.DrawFn) -> dict:
    common = copy.copy(COMMON)
    args = copy.copy(common["args"])
    common["args"] = args
    for _ in range(draw(st.integers(1, 3))):
        what = draw(st.sampled_from(["arg", "arg", "arg", "new_arg", "del_arg", "field",
                                     "args"]))
        if what == "arg":
            setattr(args, draw(st.sampled_from(ARG_NAMES)), draw(ODD))
        elif what == "new_arg":
            setattr(args, draw(EXTRA_ARGS), draw(ODD))
        elif what == "del_arg":
            name = draw(st.sampled_from(ARG_NAMES))
            if hasattr(args, name):
                delattr(args, name)
        elif what == "field":
            common[draw(st.sampled_from(sorted(common)))] = draw(ODD)
        else:
            common["args"] = draw(ODD | st.just(argparse.Namespace()))
    return common


@fuzz_settings(max_examples=100)
@given(edited_common())
def test_fuzz_common_state_objects(common):
    check("torch_load/objects", as_common_pt, safe_torch_save(common))


# ---------------------------------------------------------------------------- regressions
# Found by test_fuzz_common_state_objects: args values of the wrong type escaped
# config_from_megatron_args as OverflowError (int(inf)) and RuntimeError (a tensor's truth
# value); found while fixing them: a list mamba_num_heads times the head dim (list
# repetition: allocation), a missing hidden_size (KeyError), a tensor sharding type.
ARG_REGRESSIONS = {
    "inf_vocab": ("padded_vocab_size", float("inf")),
    "tensor_flag": ("group_query_attention", torch.zeros(2)),
    "list_heads": ("mamba_num_heads", [1]),
    "tensor_dtype": ("params_dtype", torch.zeros(2)),
    "dict_mhc_flag": ("enable_hyper_connections", {"a": 1}),
}


@pytest.mark.parametrize("name", sorted(ARG_REGRESSIONS))
def test_regression_arg_types(name):
    field, value = ARG_REGRESSIONS[name]
    common = copy.copy(COMMON)
    common["args"] = copy.copy(COMMON["args"])
    setattr(common["args"], field, value)
    if name == "list_heads":
        delattr(common["args"], "mamba_expand") if hasattr(common["args"], "mamba_expand") \
            else None
    with pytest.raises(InvalidInputError, match=f"cannot derive the model config.*{field}"):
        decode(safe_torch_save([common]))


def test_regression_missing_hidden_size_with_mamba_heads():
    common = copy.copy(COMMON)
    common["args"] = args = copy.copy(COMMON["args"])
    args.mamba_num_heads, args.mamba_expand = 8, None
    del args.hidden_size
    with pytest.raises(InvalidInputError, match="mamba_num_heads needs"):
        decode(safe_torch_save([common]))


def test_regression_sharding_type_not_a_string():
    common = copy.copy(COMMON)
    common["content_metadata"] = {"distrib_optim_sharding_type": torch.zeros(2)}
    with pytest.raises(InvalidInputError, match="distrib_optim_sharding_type is a Tensor"):
        as_common_pt(safe_torch_save(common))
