"""Code-execution payloads against every unpickling route (DESIGN.md §5, §6).

Each payload of ``fixtures.hostile_sources.PAYLOAD_KINDS`` (``eval``, ``exec``, ``os.system``,
``posix.system``, ``subprocess.Popen/run/check_output``, ``importlib.import_module``,
``builtins.__import__``, and a ``builtins.getattr`` gadget chain) would create a marker file if
it ran. On every route it must be refused with ``InvalidInputError`` naming the global, and the
marker must stay absent:

* DCP ``.metadata``: ``SafeUnpickler`` directly, the converter's torch_dist reader, and the
  model's DCP loader (``mhc_model.checkpoint``);
* ``torch.load`` with our allowlist (``safe_torch_load``): ``common_state/shard_0_1`` (converter
  and model loader), ``common.pt``, a ShardedObject item (``rng_state``);
* legacy ``model_optim_rng.pt`` (``safe_load_rank``);
* the CLI: ``mhc-convert inspect`` and ``enable`` on checkpoints carrying the payload: exit 3.

The controls at the end widen an allowlist by the payload's global and show the payload then
runs: the marker is a real witness, and these tests fail if such a global is ever allowlisted.
"""

from __future__ import annotations

import builtins
import contextlib
import importlib
import io
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fixtures.hostile_sources import (
    ITER,
    PAYLOAD_KINDS,
    RANK,
    build_legacy,
    copy_megatron,
    evil_pickle,
    evil_torch_zip,
    td_put_blob,
)
from mhc_convert.cli import app
from mhc_convert.errors import InvalidInputError
from mhc_convert.formats import torch_dist as td
from mhc_convert.formats import torch_legacy as tl
from mhc_model import checkpoint as ck
from mhc_model import safe_unpickle as su
from mhc_model.megatron_files import COMMON_KEY, RNG_KEY

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
KINDS = list(PAYLOAD_KINDS)
FUNCS = {"builtins.eval": eval, "builtins.exec": exec, "os.system": os.system,
         "posix.system": os.system, "subprocess.Popen": subprocess.Popen,
         "subprocess.run": subprocess.run, "subprocess.check_output": subprocess.check_output,
         "importlib.import_module": importlib.import_module,
         "builtins.__import__": builtins.__import__, "builtins.getattr": getattr}


@pytest.fixture
def marker(tmp_path, monkeypatch) -> Path:
    monkeypatch.syspath_prepend(str(tmp_path))  # where the import kinds' module lives
    return tmp_path / "PWNED"


def ran(marker: Path, kind: str) -> bool:
    if kind == "subprocess.Popen":  # asynchronous: give a started child time to create it
        time.sleep(0.3)
    return marker.exists()


def refused(exc: BaseException, kind: str) -> None:
    """The error names the refused global, module included."""
    text = str(exc)
    assert f"refused pickle global '{kind}'" in text, text


# ------------------------------------------------------------------------ .metadata route
@pytest.mark.parametrize("kind", KINDS)
def test_metadata_unpickler(kind, marker):
    with pytest.raises(InvalidInputError) as ei:
        su.safe_pickle_load(evil_pickle(kind, marker), source="x/.metadata")
    refused(ei.value, kind)
    assert not ran(marker, kind)


@pytest.mark.parametrize("kind", KINDS)
def test_metadata_converter_and_model_loader(kind, marker, tmp_path):
    run = copy_megatron(tmp_path)
    (run / ITER / ".metadata").write_bytes(evil_pickle(kind, marker))
    with pytest.raises(InvalidInputError) as ei:
        td.read_torch_dist(run)
    refused(ei.value, kind)
    with pytest.raises(BaseException) as ei:  # DCP wraps it in CheckpointException
        ck.read_common(run)
    refused(ei.value, kind)
    assert not ran(marker, kind)


# ------------------------------------------------------------------------ torch.load routes
@pytest.mark.parametrize("kind", KINDS)
def test_common_state_converter_and_model_loader(kind, marker, tmp_path):
    run = copy_megatron(tmp_path)
    td_put_blob(run, COMMON_KEY, evil_torch_zip(kind, marker))
    with pytest.raises(InvalidInputError) as ei:
        td.read_torch_dist(run)
    refused(ei.value, kind)
    with pytest.raises(BaseException) as ei:
        ck.read_common(run)
    refused(ei.value, kind)
    assert not ran(marker, kind)


@pytest.mark.parametrize("kind", KINDS)
def test_common_pt(kind, marker, tmp_path):
    run = copy_megatron(tmp_path)
    (run / ITER / td.COMMON_PT).write_bytes(evil_torch_zip(kind, marker))
    with pytest.raises(InvalidInputError) as ei:
        td.read_torch_dist(run)
    refused(ei.value, kind)
    assert not ran(marker, kind)


@pytest.mark.parametrize("kind", KINDS)
def test_sharded_object(kind, marker, tmp_path):
    blob = evil_torch_zip(kind, marker)
    with pytest.raises(InvalidInputError) as ei:
        su.safe_torch_load(blob, source="__0_0.distcp", key=RNG_KEY)
    refused(ei.value, kind)
    run = copy_megatron(tmp_path)
    td_put_blob(run, RNG_KEY, blob)
    with pytest.raises(BaseException) as ei:  # the model's loader decodes every byte item
        ck._load(run / ITER, {RNG_KEY: None}, {})
    refused(ei.value, kind)
    assert not ran(marker, kind)


@pytest.fixture(scope="module")
def legacy_base(tmp_path_factory) -> Path:
    return build_legacy(tmp_path_factory.mktemp("legacy"))


def evil_legacy(base: Path, d: Path, kind: str, marker: Path) -> Path:
    run = d / "legacy"
    shutil.copytree(base, run)
    (run / "iter_0000100" / RANK).write_bytes(evil_torch_zip(kind, marker))
    return run


@pytest.mark.parametrize("kind", KINDS)
def test_legacy_rank_file(kind, marker, tmp_path, legacy_base):
    run = evil_legacy(legacy_base, tmp_path, kind, marker)
    with pytest.raises(InvalidInputError) as ei:
        tl.safe_load_rank(run / "iter_0000100" / RANK)
    refused(ei.value, kind)
    assert not ran(marker, kind)


# ----------------------------------------------------------------------------------- CLI
def _td_metadata(d, kind, marker, _):
    run = copy_megatron(d)
    (run / ITER / ".metadata").write_bytes(evil_pickle(kind, marker))
    return run


def _td_common_state(d, kind, marker, _):
    run = copy_megatron(d)
    td_put_blob(run, COMMON_KEY, evil_torch_zip(kind, marker))
    return run


def _td_common_pt(d, kind, marker, _):
    run = copy_megatron(d)
    (run / ITER / td.COMMON_PT).write_bytes(evil_torch_zip(kind, marker))
    return run


ROUTES = {"td_metadata": _td_metadata, "td_common_state": _td_common_state,
          "td_common_pt": _td_common_pt,
          "legacy_rank": lambda d, kind, marker, base: evil_legacy(base, d, kind, marker)}


@pytest.mark.parametrize("route", sorted(ROUTES))
@pytest.mark.parametrize("kind", KINDS)
def test_cli_inspect_and_enable(kind, route, marker, tmp_path, legacy_base):
    src = ROUTES[route](tmp_path, kind, marker, legacy_base)
    for argv in (["inspect", str(src)], ["enable", str(src), str(tmp_path / "out")]):
        res = CliRunner().invoke(app, argv)
        if res.exception is not None and not isinstance(res.exception, SystemExit):
            raise res.exception  # a traceback, not a refusal
        assert res.exit_code == 3, (argv[0], res.stderr)
        lines = res.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("mhc-convert: error: "), res.stderr
        refused(Exception(lines[0]), kind)
        assert not (tmp_path / "out").exists()
    assert not ran(marker, kind)


# ------------------------------------------------------------------------------- controls
@pytest.mark.parametrize("kind", KINDS)
def test_control_metadata_payload_runs_if_allowlisted(kind, marker, monkeypatch):
    module, name = kind.rsplit(".", 1)
    monkeypatch.setitem(su._METADATA_TABLE, (module, name), FUNCS[kind])
    su.safe_pickle_load(evil_pickle(kind, marker), source="x")
    assert ran(marker, kind)


# torch's loader refuses the os/posix/sys/nt modules whatever the allowlist says, and REDUCE
# only calls allowlisted callables (a getattr result never is): not live there.
TORCH_LIVE = [k for k in KINDS if k.split(".")[0] not in ("os", "posix") and
              k != "builtins.getattr"]


@pytest.mark.parametrize("kind", TORCH_LIVE)
def test_control_torch_payload_runs_if_allowlisted(kind, marker):
    with torch.serialization.safe_globals([FUNCS[kind]]), \
            contextlib.suppress(Exception):  # only whether the payload ran matters here
        torch.load(io.BytesIO(evil_torch_zip(kind, marker)), weights_only=True)
    assert ran(marker, kind)
