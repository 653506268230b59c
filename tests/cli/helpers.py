"""Shared by the CLI tests: run ``mhc-convert`` in-process (typer's ``CliRunner``, through the
same ``_Group.main`` as the console script) and assert the refusal contract: the documented
exit code, exactly one ``mhc-convert: error:`` line on stderr, nothing on stdout, no
traceback, and nothing written."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from typer.testing import CliRunner

from mhc_convert.cli import app
from mhc_model.model import HybridModel
from tests.model.helpers import perturb_norms_, tiny_config

runner = CliRunner()


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args], prog_name="mhc-convert")


def cli(*args: object, code: int):
    result = invoke(*args)
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr,
                                      result.exception)
    return result


def cli_json(*args: object, code: int) -> dict:
    result = cli(*args, "--json", code=code)
    lines = [ln for ln in result.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stdout  # one JSON document, nothing else on stdout
    doc = json.loads(lines[0])
    assert doc["ok"] is (code == 0)
    if code not in (0, 6) or "exit_code" in doc:
        assert doc["exit_code"] == code and "\n" not in doc["message"]
    return doc


def tree(root: Path) -> list[str]:
    """Every path under ``root`` (names only): 'nothing written' is 'this did not change'."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            out.append(os.path.relpath(os.path.join(dirpath, name), root))
    return sorted(out)


def refused(*args: object, code: int, where: Path, says: tuple[str, ...] = ()) -> str:
    """Run a command that must be refused; returns its one stderr line."""
    before = tree(where)
    result = invoke(*args)
    err = result.stderr
    assert result.exit_code == code, (args, result.exit_code, result.stdout, err)
    assert "Traceback" not in result.output, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mhc-convert: error: "), (args, err)
    for s in says:
        assert s in lines[0], (s, lines[0])
    assert result.stdout == "", result.stdout
    assert tree(where) == before, "something was written"
    doc = cli_json(*args, code=code)  # the --json form of the same refusal
    assert doc["message"] in lines[0]
    assert tree(where) == before
    return lines[0]


def make_native(root: Path, pattern: str = "M-M*-M-", seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = HybridModel(tiny_config(pattern))
    perturb_norms_(model, seed)
    model.save_pretrained(root)
    return root
