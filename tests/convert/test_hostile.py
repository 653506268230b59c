"""Every hostile input of ``fixtures/make_hostile.py`` through the real CLI
(research/reliability.md §3): the documented exit code, exactly one stderr line naming the file
(and key), the source untouched byte for byte, nothing left beside the destination, and no code
from the input executed (each payload would create a marker file if it ran).
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fixtures.hostile_native import _sharded
from fixtures.hostile_sources import build_legacy, copy_megatron, copy_native, evil_pickle
from fixtures.make_hostile import KINDS, SPECS, Case, make_cases
from mhc_convert import validate
from mhc_convert.adapters import adapter_for, detect_format
from mhc_convert.cli import app
from mhc_convert.formats import byte_sources
from mhc_model.toggle.codec import OPT_RE, wrap
from tests.convert.engine_helpers import tree_sha

ROOT = Path(__file__).resolve().parents[2]
NAMES = [s.name for s in SPECS]
SUBPROCESS = ["st_duplicate_key", "td_metadata_os_system", "pt_builtins_eval"]


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> tuple[Path, dict[str, Case]]:
    root = tmp_path_factory.mktemp("hostile")
    return root, {c.name: c for c in make_cases(root)}


def argv(c: Case, dst: Path | None = None, *extra: str) -> list[str]:
    if c.command == "inspect":
        return ["inspect", str(c.path), *extra]
    return [c.command, str(c.path), str(dst or c.dst), *extra]


def snapshot(c: Case) -> tuple[dict[str, str], list[str]]:
    return tree_sha(c.path), sorted(os.listdir(c.path.parent))


def verify(root: Path, c: Case, snap, code: int, out: str, err: str) -> None:
    """The whole refusal contract for one finished run."""
    before, listing = snap
    lines = err.splitlines()
    assert code == c.exit_code, (c.name, code, err)
    assert len(lines) == 1 and lines[0].startswith("mhc-convert: error: "), (c.name, err)
    for s in c.expect:
        assert s in lines[0], (c.name, s, lines[0])
    assert out == "", (c.name, out)
    assert tree_sha(c.path) == before, f"{c.name}: source modified"
    assert sorted(os.listdir(c.path.parent)) == listing, f"{c.name}: output or temp left behind"
    assert not c.dst.exists() and not c.dst.is_symlink()
    assert not c.marker.exists() and not list(root.glob("PWNED-*")), f"{c.name}: code ran"


def check_refusal(root: Path, c: Case, run) -> None:
    """``run(args) -> (exit code, stdout, stderr)``; assert the whole contract."""
    snap = snapshot(c)
    verify(root, c, snap, *run(argv(c)))


def in_process(args: list[str]) -> tuple[int, str, str]:
    res = CliRunner().invoke(app, args)
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception  # a traceback, not a refusal
    return res.exit_code, res.stdout, res.stderr


def test_hostile_subprocess(tmp_path):
    """A handful of representative cases through ``python -m mhc_convert``, run in parallel
    (each process pays torch's import)."""
    cases = make_cases(tmp_path, SUBPROCESS)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    snaps = [snapshot(c) for c in cases]
    procs = [subprocess.Popen([sys.executable, "-m", "mhc_convert", *argv(c)], cwd=ROOT,
                              env=env, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE) for c in cases]
    results = [p.communicate(timeout=120) for p in procs]
    for c, snap, p, (out, err) in zip(cases, snaps, procs, results):
        verify(tmp_path, c, snap, p.returncode, out, err)


def test_enough_cases_across_formats():
    by_fmt = {f: sum(s.format == f for s in SPECS) for f in
              ("safetensors", "native", "torch_dist", "torch_legacy")}
    assert len(set(NAMES)) == len(NAMES) >= 40 and min(by_fmt.values()) >= 8, by_fmt
    assert {s.exit_code for s in SPECS} == {3, 4}
    assert {s.command for s in SPECS} == {"enable", "disable", "inspect"}


@pytest.mark.parametrize("name", NAMES)
def test_hostile_cli(hostile, name):
    root, cases = hostile
    check_refusal(root, cases[name], in_process)


@pytest.mark.parametrize("name", ["nat_nan", "td_optimizer_inf", "pt_nan"])
def test_allow_nonfinite_converts_bit_exactly(tmp_path, name):
    (c,) = make_cases(tmp_path, [name])
    out = tmp_path / "converted"
    code, _, err = in_process(argv(c, out, "--allow-nonfinite", "--quiet"))
    assert code == 0, err
    key = c.expect[1]
    m = OPT_RE.match(key)
    out_key = f"optimizer.state.{m.group(1)}.{wrap(m.group(2))}" if m else wrap(key)
    src_view = adapter_for(detect_format(c.path)).read(c.path)
    out_view = adapter_for(detect_format(out)).read(out)
    a, b = src_view.load(key), out_view.load(out_key)
    assert a.dtype == b.dtype and not torch.isfinite(a.float()).all()
    assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    # and the refusal path still holds for the same source without the flag
    code, _, err = in_process(argv(c, tmp_path / "refused"))
    assert code == 3 and "--allow-nonfinite" in err and not (tmp_path / "refused").exists()


@pytest.mark.parametrize("base", ["native", "sharded", "torch_dist", "torch_legacy"])
def test_unedited_bases_pass(tmp_path, base):
    """Control: the bases the cases are cut from pass every pre-write check, so each refusal
    above comes from its edit."""
    build = {"native": copy_native, "sharded": lambda d: _sharded(d)[0],
             "torch_dist": copy_megatron, "torch_legacy": build_legacy}[base]
    src = build(tmp_path)
    code, _, err = in_process(["enable", str(src), str(tmp_path / "out"), "--dry-run", "-q"])
    assert code == 0, err


@pytest.mark.parametrize("kind", KINDS)
def test_payloads_are_live(tmp_path, kind, monkeypatch):
    """The markers prove something only if the payloads really run when unpickled naively."""
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "marker"
    pickle.loads(evil_pickle(kind, marker))  # test-only: our own payload, in tmp_path
    assert marker.exists()


def test_scan_is_sliced_and_exact(hostile, monkeypatch):
    """Counts do not depend on the slice size, and fp8 special values are recognised."""
    _, cases = hostile
    c = cases["nat_nan"]
    view = adapter_for("native").read(c.path)
    monkeypatch.setattr(byte_sources, "SLICE", 8)
    with pytest.raises(validate.InvalidInputError, match="3 NaN and 0 Inf"):
        validate.check_finite(view, list(view.entries), path=c.path)
    raw = torch.tensor([0x7F, 0xFF, 0x7E, 0x00], dtype=torch.uint8)
    assert validate.count_nonfinite(raw, "float8_e4m3fn") == (2, 0)
    assert validate.count_nonfinite(raw, "float8_e5m2") == (3, 0)  # 0x7C-0x7F specials
    ieee = torch.tensor([1.0, float("inf"), float("-inf"), float("nan")])
    assert validate.count_nonfinite(ieee.view(torch.uint8), "float32") == (1, 2)
    assert validate.count_nonfinite(ieee.bfloat16().view(torch.uint8), "bfloat16") == (1, 2)
