"""Conventions users know from ``hf``/typer CLIs: ``--version``/``-V``/``version``, ``-h``, enum
choices, ``SRC DST`` usage lines, the exit-code table in ``--help``, completion, a start-up that
does not import torch, a grouped ``--dry-run`` summary (keys behind ``--list-keys``), ``-``
instead of ``None``, run directories with ``--iteration``, and a warning about stale temp output
beside DST."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

import mhc_convert
from tests.cli.helpers import cli, cli_json
from tests.paths import NEMOTRON_H_TINY

ROOT = Path(__file__).resolve().parents[2]
VERSION = metadata.version("mhc-hybrid")


def _python(code: str, timeout: int = 120) -> subprocess.CompletedProcess:
    """``python -c code`` in a fresh interpreter with the repository importable."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=timeout)


# ---------------------------------------------------------------------------- version, help
def test_version_everywhere():
    assert mhc_convert.__version__ == VERSION
    for flag in ("--version", "-V"):
        assert cli(flag, code=0).stdout == f"mhc-convert {VERSION}\n"
    assert cli("version", code=0).stdout.startswith(f"mhc-convert {VERSION} (mhc-hybrid)\n")
    doc = cli_json("version", code=0)
    assert doc["mhc-convert"] == VERSION and doc["torch"]


def test_help_conventions():
    root = cli("-h", code=0).stdout
    assert cli("--help", code=0).stdout == root
    for code in ("0 ", "2 ", "3 ", "4 ", "5 ", "6 ", "130", "143"):
        assert f"  {code}" in root, code
    assert "Exit codes:" in root and "--install-completion" in root and "--log-level" in root
    enable = cli("enable", "-h", code=0).stdout
    assert enable.startswith("Usage: mhc-convert enable [OPTIONS] SRC DST\n")
    assert "<mean|learned>" in enable and "<exact|megatron>" in enable
    assert "<deepseek|megatron_dev|megatron_dsv4>" in enable and "<copy|hardlink|reflink>" in enable
    assert "<native|megatron-dev|megatron-dsv4>" in enable
    assert "Exit codes:" in enable and "--iteration N" in enable and "--list-keys" in enable
    verify = cli("verify", "-h", code=0).stdout
    assert verify.startswith("Usage: mhc-convert verify [OPTIONS] A B\n")
    assert "<cpu|cuda>" in verify and "<fp32|bf16>" in verify and "noise floor" in verify


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["version"], ["enable", "-h"],
                                  ["inspect", str(NEMOTRON_H_TINY)],
                                  ["inspect", str(NEMOTRON_H_TINY), "--json"]])
def test_start_up_does_not_import_torch(argv):
    """--help, --version and inspecting a native checkpoint stay under 0.5 s: no torch."""
    code = (f"import sys\nsys.argv = ['mhc-convert', *{argv!r}]\n"
            "from mhc_convert.cli import main\n"
            "try:\n    main()\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
            "print(sorted(m for m in ('torch', 'rich', 'numpy', 'safetensors') "
            "if m in sys.modules))\n")
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "[]", proc.stdout


def test_import_mhc_convert_is_light():
    proc = _python("import sys, mhc_convert, mhc_model; "
                   "print('torch' in sys.modules, mhc_convert.__version__)")
    assert proc.stdout.split() == ["False", VERSION], proc.stderr


# ----------------------------------------------------------------------------- dry run
def test_dry_run_is_a_grouped_summary(tmp_path, src):
    dst = tmp_path / "out"
    text = cli("enable", src, dst, "--dry-run", code=0).stdout
    lines = text.splitlines()
    assert len(lines) <= 10, text  # not one line per key
    assert lines[0].startswith(f"dry run: enable {src} -> {dst}; nothing written")
    joined = "\n".join(lines)
    for label in ("format", "layout", "keys", "optimizer", "would write"):
        assert f"  {label} " in joined, label
    assert "renamed" in joined and "added" in joined and "bytes" in joined
    assert "None" not in joined and "op=" not in joined
    keys = cli("enable", src, dst, "--dry-run", "--list-keys", code=0).stdout.splitlines()
    doc = cli_json("enable", src, dst, "--dry-run", code=0)
    assert sum(ln.startswith("op=") for ln in keys) == len(doc["plan_detail"])
    assert cli("enable", src, dst, "--dry-run", "-q", code=0).stdout == ""
    assert not dst.exists()


def test_missing_values_print_as_dash(src):
    text = cli("inspect", src, code=0).stdout
    assert "None" not in text
    assert any(ln.split() == ["streams", "-"] for ln in text.splitlines()), text


def test_verbose_logs_each_step(src):
    result = cli("-v", "inspect", src, code=0)
    assert f"mhc-convert: INFO: reading {src}" in result.stderr


@pytest.mark.parametrize("args", [("-v",), ("--verbose",), ("--log-level", "info")])
def test_logging_options_after_the_subcommand(src, args):
    result = cli("inspect", src, *args, code=0)
    assert f"mhc-convert: INFO: reading {src}" in result.stderr
    assert "INFO" not in cli("inspect", src, code=0).stderr  # the default is back next time


# ---------------------------------------------------------------------------- run dirs
def test_run_directory_says_which_iteration(tmp_path, run):
    doc = cli_json("enable", run / "torch_dist", tmp_path / "latest", code=0)
    assert doc["iteration"] == 2
    assert any("iteration 2 (the latest, named by latest_checkpointed_iteration.txt); "
               "also present: 1 (pick one with --iteration N)" in n for n in doc["notes"])
    text = cli("enable", run / "torch_dist", tmp_path / "latest2", code=0).stdout
    assert "note: run directory: iteration 2" in text


def test_iteration_picks_another(tmp_path, run):
    out = tmp_path / "it1"
    doc = cli_json("enable", run / "torch_dist", out, "--iteration", "1", code=0)
    assert doc["iteration"] == 1 and any("chosen with --iteration" in n for n in doc["notes"])
    assert (out / "latest_checkpointed_iteration.txt").read_text() == "1"
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["iter_0000001"]
    info = cli_json("inspect", out, code=0)
    assert (info["iteration"], info["layout"]) == (1, "mhc-on")
    assert cli_json("inspect", run / "torch_dist", "--iteration", "1", code=0)["iteration"] == 1
    # a directory of native checkpoints: --iteration picks one of them
    native = cli_json("enable", run / "native", tmp_path / "n1", "--iteration", "1", code=0)
    assert native["format"] == "native" and native["iteration"] == 1
    assert any("iteration 1 (chosen with --iteration); also present: 2" in n
               for n in native["notes"])
    assert json.loads((tmp_path / "n1" / "training_state.json").read_text())["iteration"] == 1


# ------------------------------------------------------------------------- stale temp
def test_stale_temp_output_is_reported(tmp_path, src):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / ".out.mhc-tmp-0123456789abcdef"
    stale.mkdir()
    import socket

    (stale / ".mhc-tmp").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    (tmp_path / ".out.mhc-lock").write_text("{}")
    result = cli("enable", src, tmp_path / "out", "-q", code=0)
    warning = [ln for ln in result.stderr.splitlines() if "WARNING" in ln]
    assert len(warning) == 1, result.stderr
    assert ".out.mhc-tmp-0123456789abcdef" in warning[0] and ".out.mhc-lock" in warning[0]
    assert f"mhc-convert clean {tmp_path}" in warning[0]
    # nothing stale beside another destination: no warning
    assert "WARNING" not in cli("enable", src, tmp_path / "other", "-q", code=0).stderr


def test_convert_runs_with_triton_unimportable(tmp_path, src):
    """mhc_convert needs no Triton (the CPU install path has it for the kernel checks, so it
    is blocked here): enable, verify and disable with every ``triton`` import refused."""
    on, off = tmp_path / "on", tmp_path / "off"
    code = ("import sys\n"
            "class _NoTriton:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'triton' or name.startswith('triton.'):\n"
            "            raise ImportError('triton blocked by the test')\n"
            "sys.meta_path.insert(0, _NoTriton())\n"
            "from mhc_convert.cli import main\n"
            f"for argv in (['enable', {str(src)!r}, {str(on)!r}, '--streams', '4'],\n"
            f"             ['verify', {str(src)!r}, {str(on)!r}],\n"
            f"             ['disable', {str(on)!r}, {str(off)!r}]):\n"
            "    sys.argv = ['mhc-convert', *argv]\n"
            "    try:\n        main()\n    except SystemExit as e:\n"
            "        assert e.code in (0, None), (argv, e.code)\n"
            "print('triton' in sys.modules)\n")
    proc = _python(code, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines()[-1] == "False", proc.stdout[-2000:]
    assert (off / "model.safetensors").is_file() or any(off.iterdir())
