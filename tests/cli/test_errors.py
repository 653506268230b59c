"""One error path: each mistake a user makes is refused before any work with the documented exit
code, one ``mhc-convert: error:`` line on stderr naming the file (and key), no traceback and
nothing written (``helpers.refused`` checks all of that, and the ``--json`` form). SIGTERM and
SIGINT in the middle of a real conversion exit 143 and 130 and leave nothing behind."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mhc_convert import engine
from mhc_convert.errors import UsageError
from tests.cli.helpers import cli, refused, tree

ROOT = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------- options
@pytest.mark.parametrize("n", [1, 0, -3])
def test_streams_below_two(tmp_path, src, n):
    line = refused("enable", src, tmp_path / "out", "--streams", n, code=2, where=tmp_path,
                   says=("--streams must be at least 2", f"got {n}"))
    assert "ValueError" not in line


@pytest.mark.parametrize("command", ["enable", "disable"])
def test_bad_passthrough_regex(tmp_path, src, command):
    refused(command, src, tmp_path / "out", "--passthrough", "[", code=2, where=tmp_path,
            says=("--passthrough '['", "not a valid regular expression"))


def test_bad_choice_is_one_line(tmp_path, src):
    refused("enable", src, tmp_path / "out", "--contract", "bogus", code=2, where=tmp_path,
            says=("--contract", "bogus", "mhc-convert enable -h"))
    refused("enable", src, code=2, where=tmp_path, says=("Missing argument 'DST'",))


def test_api_refuses_the_same(tmp_path, src):
    with pytest.raises(UsageError, match="--streams must be at least 2"):
        engine.enable(src, tmp_path / "out", streams=1)
    with pytest.raises(UsageError, match="regular expression"):
        engine.disable(src, tmp_path / "out", passthrough="(")
    with pytest.raises(UsageError, match="no such file or directory"):
        engine.enable(tmp_path / "nope", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------- paths
def test_missing_source_same_code_and_words_everywhere(tmp_path, src):
    nope = tmp_path / "nope"
    lines = {
        "enable": refused("enable", nope, tmp_path / "out", code=2, where=tmp_path),
        "disable": refused("disable", nope, tmp_path / "out", code=2, where=tmp_path),
        "inspect": refused("inspect", nope, code=2, where=tmp_path),
        "verify A": refused("verify", nope, src, code=2, where=tmp_path),
        "verify B": refused("verify", src, nope, code=2, where=tmp_path),
    }
    assert set(lines.values()) == {f"mhc-convert: error: {nope}: no such file or directory"}


def test_clean_missing_or_not_a_directory(tmp_path, src):
    refused("clean", tmp_path / "nope", code=2, where=tmp_path,
            says=(f"{tmp_path / 'nope'}: no such file or directory",))
    refused("clean", src / "config.json", code=2, where=tmp_path,
            says=(f"{src / 'config.json'}: not a directory",))


@pytest.mark.parametrize("url", ["s3://bucket/run/ckpt", "gs://bucket/ckpt", "hf://org/model",
                                 "https://huggingface.co/org/model"])
def test_remote_source_is_named_not_mangled(tmp_path, url):
    for args in (("enable", url, tmp_path / "out"), ("inspect", url), ("verify", url, url)):
        line = refused(*args, code=2, where=tmp_path, says=(url, "remote"))
        assert "download" in line or "copy it locally" in line


def test_remote_destination(tmp_path, src):
    refused("enable", src, "s3://bucket/out", code=2, where=tmp_path,
            says=("s3://bucket/out", "destination is a remote location", "upload"))


def test_device_cuda_without_cuda(tmp_path, src, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    refused("verify", src, src, "--device", "cuda", code=2, where=tmp_path,
            says=("--device cuda", "CUDA is not available", "--device cpu"))


# ------------------------------------------------------------------------ foreign inputs
def test_hugging_face_transformers_directory(tmp_path):
    hf = tmp_path / "nemotron-h-hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({
        "architectures": ["NemotronHForCausalLM"], "model_type": "nemotron_h",
        "hidden_size": 64, "hybrid_override_pattern": "M-M*"}))
    (hf / "model.safetensors").write_bytes(b"\0" * 16)
    (hf / "tokenizer.json").write_text("{}")
    for args in (("enable", hf, tmp_path / "out"), ("inspect", hf)):
        refused(*args, code=3, where=tmp_path,
                says=(str(hf / "config.json"), "key 'model_type'",
                      "Hugging Face transformers checkpoint", "not a Megatron/mhc one"))


def test_directory_of_native_checkpoints_gets_a_hint(tmp_path, run):
    line = refused("enable", run / "native", tmp_path / "out", code=3, where=tmp_path,
                   says=("directory of native checkpoints", "iter_0000001, iter_0000002",
                         "--iteration 2"))
    assert "not a recognised checkpoint" in line
    refused("inspect", run, code=3, where=tmp_path,
            says=("training run's checkpoints", str(run / "torch_dist")))


def test_iteration_errors(tmp_path, run, src):
    refused("enable", run / "torch_dist", tmp_path / "out", "--iteration", 7, code=2,
            where=tmp_path, says=("--iteration 7: no iter_0000007 (have 1, 2)",))
    refused("enable", src, tmp_path / "out", "--iteration", 1, code=2, where=tmp_path,
            says=("not a run directory",))


# -------------------------------------------------------------------------------- signals
def _hold_and_signal(tmp_path: Path, sig: int, hold_at: str) -> tuple[int, str, list[str]]:
    """Start a real conversion, hold it at commit phase ``hold_at`` (commit.py's test hook),
    send ``sig``, return (exit code, stderr, what is left beside the destination)."""
    src = tmp_path / "src"
    shutil.copytree(ROOT / "fixtures" / "nemotron_h_tiny", src)
    hold = tmp_path / "hold"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MHC_HOLD_AT": hold_at,
           "MHC_HOLD_FILE": str(hold)}
    proc = subprocess.Popen([sys.executable, "-m", "mhc_convert", "enable", str(src),
                             str(tmp_path / "out")], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not hold.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert hold.exists(), proc.communicate()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    left = sorted(p.name for p in tmp_path.iterdir())
    return proc.returncode, err, left


@pytest.mark.parametrize("hold_at", ["mid-copy", "after-lock"])
def test_sigterm_exits_143_and_cleans_up(tmp_path, hold_at):
    code, err, left = _hold_and_signal(tmp_path, signal.SIGTERM, hold_at)
    assert code == 143, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mhc-convert: error: ") and \
        "terminated (SIGTERM)" in lines[0], err
    assert left == ["hold", "src"]  # no output, no temp dir, no lock


def test_sigint_exits_130(tmp_path):
    code, err, left = _hold_and_signal(tmp_path, signal.SIGINT, "mid-copy")
    assert code == 130, err
    assert len(err.splitlines()) == 1 and "interrupted" in err and "Traceback" not in err
    assert left == ["hold", "src"]


def test_refusals_write_nothing_anywhere(tmp_path, src):
    """A whole session of mistakes leaves the directory as it was."""
    before = tree(tmp_path)
    for args in (["enable", src, tmp_path / "o", "--streams", "1"],
                 ["enable", src, tmp_path / "o", "--passthrough", "("],
                 ["disable", src, tmp_path / "o"],  # already mHC-off: exit 4
                 ["enable", src, src]):
        result = cli(*args, code={"disable": 4}.get(args[0], 2))
        assert "Traceback" not in result.output
    assert tree(tmp_path) == before
