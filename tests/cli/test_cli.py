"""The ``mhc-convert`` CLI: help texts, ``--json`` reports, exit codes (0 ok, 2 usage/aliasing,
3 invalid input, 4 already in layout, 6 verification failed), ``inspect --verify``, ``verify``
and ``clean``. In-process through typer's ``CliRunner``, plus one real ``python -m mhc_convert``
subprocess. The refusals of bad input are in ``test_errors.py``."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mhc_model import HybridConfig, HybridModel
from tests.cli.helpers import cli, cli_json, invoke, refused

ROOT = Path(__file__).resolve().parents[2]
COMMANDS = ("enable", "disable", "inspect", "verify", "clean", "version")


@pytest.fixture
def on(tmp_path: Path, src: Path) -> Path:
    out = tmp_path / "on"
    cli("enable", src, out, "--quiet", code=0)
    return out


# ------------------------------------------------------------------------------------- help
@pytest.mark.parametrize("command", COMMANDS)
def test_help_has_examples(command):
    text = cli(command, "--help", code=0).stdout
    assert "Example" in text and f"mhc-convert {command} " in text


def test_no_args_shows_help():
    result = invoke()
    assert result.exit_code == 2
    assert all(c in result.stdout + result.stderr for c in COMMANDS)


# ------------------------------------------------------------------------------------- --json
REPORT_FIELDS = {"ok", "command", "source", "output", "format", "dry_run", "plan",
                 "tensors_written", "bytes_total", "bytes_to_write", "iteration", "optimizer",
                 "seconds", "config", "notes", "parity", "plan_detail"}
INSPECT_FIELDS = {"ok", "path", "format", "layout", "pattern", "num_layers", "streams",
                  "convention", "contract", "iteration", "optimizer", "tensors", "bytes",
                  "manifest", "problems", "notes"}


def test_enable_disable_inspect_json(tmp_path, src):
    on, back = tmp_path / "on", tmp_path / "back"
    doc = cli_json("enable", src, on, "--streams", "3", "--contract", "learned", code=0)
    assert set(doc) >= REPORT_FIELDS
    assert doc["command"] == "enable" and doc["format"] == "native" and not doc["dry_run"]
    assert doc["output"] == str(on) and doc["tensors_written"] > 0 and doc["bytes_total"] > 0
    assert doc["plan"]["added"] == 5 * 7 + 3 and doc["plan"]["dropped"] == 0
    assert doc["config"]["num_residual_streams"] == 3
    assert doc["config"]["mhc_output_contract"] == "learned"

    info = cli_json("inspect", on, code=0)
    assert set(info) >= INSPECT_FIELDS
    assert (info["format"], info["layout"], info["pattern"]) == ("native", "mhc-on", "M-M*-M-")
    assert (info["streams"], info["contract"], info["manifest"]) == (3, "learned", "present")
    assert info["problems"] == []

    doc = cli_json("disable", on, back, code=0)
    assert set(doc) >= REPORT_FIELDS
    assert doc["command"] == "disable" and doc["plan"]["dropped"] == 5 * 7 + 3
    assert doc["parity"] is None

    info = cli_json("inspect", back, "--verify", code=0)
    assert (info["layout"], info["streams"], info["manifest"]) == ("mhc-off", None, "verified")
    assert cli_json("inspect", src, code=0)["manifest"] == "absent"


def test_dry_run_json_and_text(tmp_path, src):
    dst = tmp_path / "out"
    doc = cli_json("enable", src, dst, "--dry-run", code=0)
    assert doc["dry_run"] and doc["tensors_written"] == 0 and not dst.exists()
    assert doc["bytes_to_write"] > 0 and doc["optimizer"] == "none in the source"
    assert {"op": "add", "dst": "decoder.layers.0.hyper_connection.bias"} in doc["plan_detail"]
    text = cli("enable", src, dst, "--dry-run", "--list-keys", code=0).stdout
    lines = text.splitlines()  # one plan row per line, never wrapped (grep-able)
    assert "op=rename src=decoder.layers.0.mixer.A_log " \
           "dst=decoder.layers.0.inner_layer.mixer.A_log" in lines
    assert "op=add dst=decoder.layers.6.hyper_connection.mapping_proj.weight" in lines
    assert not dst.exists()


# ------------------------------------------------------------------------------- exit codes
def test_exit_2_usage_and_aliasing(tmp_path, src):
    doc = cli_json("enable", src, src, code=2)
    assert doc["error"] == "UsageError" and str(src) in doc["message"]
    cli_json("enable", src, src / "inner", code=2)
    result = cli("enable", src, tmp_path / "x", "--contract", "bogus", code=2)
    assert "--contract" in result.stderr
    cli("enable", src, code=2)  # missing DST: click's own usage error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_exit_3_invalid_input(tmp_path, src):
    state = load_file(str(src / "model.safetensors"))
    state["decoder.layers.1.bogus.weight"] = torch.zeros(2)
    save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})
    doc = cli_json("enable", src, tmp_path / "out", code=3)
    assert doc["error"] == "InvalidInputError"
    assert doc["key"] == "decoder.layers.1.bogus.weight" and doc["key"] in doc["message"]
    # the file holding the key, not just the directory (validate.naming_files)
    assert doc["path"] == str(src / "model.safetensors") and doc["path"] in doc["message"]
    # the human form: exactly one line on stderr, nothing written
    result = cli("enable", src, tmp_path / "out", code=3)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mhc-convert: error: ")
    assert "decoder.layers.1.bogus.weight" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    cli_json("inspect", tmp_path / "nope", code=2)  # missing: a usage error, as for enable


def test_exit_4_already_in_layout(tmp_path, src, on):
    doc = cli_json("enable", on, tmp_path / "again", code=4)
    assert doc["error"] == "AlreadyInLayoutError"
    cli_json("disable", src, tmp_path / "again", code=4)
    assert not (tmp_path / "again").exists()


def test_exit_6_lossy_disable(tmp_path, on):
    key = "decoder.layers.0.hyper_connection.alpha_res"
    state = load_file(str(on / "model.safetensors"))
    state[key] = torch.full_like(state[key], 0.5)
    save_file(state, str(on / "model.safetensors"), metadata={"format": "pt"})
    (on / "mhc-manifest.json").unlink()
    doc = cli_json("disable", on, tmp_path / "back", code=6)
    assert doc["error"] == "VerificationError" and "--allow-lossy" in doc["message"]
    assert not (tmp_path / "back").exists()
    doc = cli_json("disable", on, tmp_path / "back", "--allow-lossy", code=0)
    assert doc["parity"]["max_abs"] > 0
    text = cli("disable", on, tmp_path / "back2", "--allow-lossy", code=0).stdout
    assert "parity" in text and "max-abs" in text and "LOSSY" in text


def test_inspect_verify_detects_flipped_byte(on):
    assert cli_json("inspect", on, "--verify", code=0)["manifest"] == "verified"
    path = on / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # a tensor byte: the file still parses
    path.write_bytes(bytes(data))
    assert cli_json("inspect", on, code=0)["manifest"] == "present"  # no re-hash without it
    doc = cli_json("inspect", on, "--verify", code=6)
    assert doc["manifest"] == "MISMATCH"
    assert any("model.safetensors" in p and "sha256" in p for p in doc["problems"])
    result = cli("inspect", on, "--verify", code=6)
    assert f"manifest: {path}: sha256 differs from the manifest" in result.stderr.splitlines()


def test_verify(tmp_path, src, on):
    doc = cli_json("verify", src, on, code=0)
    assert doc["max_abs"] <= 1e-5 and doc["top1_agreement"] == 1.0
    assert {"mean_abs", "kl", "thresholds", "seconds", "noise_floor"} <= set(doc)
    assert "PASS" in cli("verify", src, on, code=0).stdout
    # and it can fail: Megatron's approximate init moves the logits
    approx = tmp_path / "approx"
    cli("enable", src, approx, "--init", "megatron", "--quiet", code=0)
    doc = cli_json("verify", src, approx, code=6)
    assert doc["max_abs"] > doc["thresholds"]["max_abs"]
    assert "FAIL" in cli("verify", src, approx, code=6).stdout


# ----------------------------------------------------------------------------------- clean
def _tmp_dir(parent: Path, name: str, marker: dict | None) -> Path:
    d = parent / name
    d.mkdir()
    (d / "payload.bin").write_bytes(b"x" * 10)
    if marker is not None:
        (d / ".mhc-tmp").write_text(json.dumps(marker))
    return d


def test_clean_removes_only_marked_stale_dirs(tmp_path, on):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    hexid = "0123456789abcdef"
    stale = _tmp_dir(tmp_path, f".ckpt.mhc-tmp-{hexid}", {"pid": dead.pid, "host": host})
    keep = [
        _tmp_dir(tmp_path, f".live.mhc-tmp-{hexid}", {"pid": os.getpid(), "host": host}),
        _tmp_dir(tmp_path, f".other.mhc-tmp-{hexid}", {"pid": dead.pid, "host": host + "-x"}),
        _tmp_dir(tmp_path, f".nomarker.mhc-tmp-{hexid}", None),
        _tmp_dir(tmp_path, f".garbled.mhc-tmp-{hexid}", None),
        _tmp_dir(tmp_path, "ckpt.mhc-tmp-0123", {"pid": dead.pid, "host": host}),  # bad name
        _tmp_dir(tmp_path, "user-data", {"pid": dead.pid, "host": host}),
    ]
    (keep[3] / ".mhc-tmp").write_text("{not json")
    before = sorted(p.name for p in tmp_path.iterdir())
    doc = cli_json("clean", tmp_path, code=0)
    assert doc["removed"] == [str(stale)]
    assert not stale.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(set(before) - {stale.name})
    for d in keep:
        assert (d / "payload.bin").read_bytes() == b"x" * 10
    assert cli_json("inspect", on, "--verify", code=0)["manifest"] == "verified"
    assert "0 stale temporary directories removed" in cli("clean", tmp_path, code=0).stdout


# ----------------------------------------------------------------------------- subprocess
def test_real_subprocess(tmp_path, src):
    dst = tmp_path / "on"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "mhc_convert", "enable", str(src), str(dst),
                           "--json"], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["ok"] and doc["command"] == "enable" and doc["output"] == str(dst)
    assert (dst / "config.json").is_file() and (dst / "mhc-manifest.json").is_file()


def test_enable_allow_lossy_mtp(tmp_path):
    """An MTP model whose final norm is not uniform: mHC-on Megatron feeds each MTP depth the
    streams before that norm, so enable refuses (exit 6, one line naming the source and the
    option); --allow-lossy converts and reports the loss; -h says what is approximated."""
    model = HybridModel(HybridConfig(hybrid_layer_pattern="M*-E/*-/*-", hidden_size=32,
                                     vocab_size=64))
    with torch.no_grad():
        model.decoder.final_norm.weight.mul_(torch.linspace(0.9, 1.1, 32))
    model.save_pretrained(tmp_path / "off")
    line = refused("enable", tmp_path / "off", tmp_path / "on", code=6, where=tmp_path,
                   says=(str(tmp_path / "off"), "MTP logits change", "--allow-lossy"))
    assert "Traceback" not in line
    doc = cli_json("enable", tmp_path / "off", tmp_path / "on", "--allow-lossy", code=0)
    assert any(n.startswith("LOSSY: MTP logits change") for n in doc["notes"]), doc["notes"]
    text = cli("enable", tmp_path / "off", tmp_path / "on2", "--allow-lossy", code=0).stdout
    assert "LOSSY" in text
    help_text = " ".join(cli("enable", "-h", code=0).stdout.split())
    assert "--allow-lossy" in help_text and "RMSNorm eps" in help_text
