"""README.md runs as printed: every ```bash and ```python block, in order, in one shell session
(as a newcomer pastes them into one terminal after ``make demo``), in a scratch directory laid
out like the repository root (``examples/``, ``fixtures/``, ``.venv``). Python blocks run as
``python block.py`` inside that session. A block right after a line
``<!-- test_readme: skip (reason) -->`` is skipped (the Makefile targets, GPU-only commands).

The session starts with the virtual environment *not* on PATH, so a README that forgets to say
``source .venv/bin/activate`` fails here with ``mhc-convert: command not found``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.paths import ROOT

README = ROOT / "README.md"
SKIP_RE = re.compile(r"^<!-- test_readme: skip \((?P<reason>[^)]*)\) -->$")
FENCE_RE = re.compile(r"^```(?P<lang>[A-Za-z]*)\s*$")


@dataclass(frozen=True)
class Block:
    lang: str
    line: int  # 1-based line of the opening fence
    code: str
    skip: str | None


def blocks(text: str) -> list[Block]:
    out: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = FENCE_RE.match(lines[i])
        if not m:
            i += 1
            continue
        start, lang = i, m["lang"]
        i += 1
        body = []
        while i < len(lines) and lines[i].rstrip() != "```":
            body.append(lines[i])
            i += 1
        prev = next((ln for ln in reversed(lines[:start]) if ln.strip()), "")
        skip = SKIP_RE.match(prev.strip())
        out.append(Block(lang, start + 1, "\n".join(body) + "\n",
                         skip["reason"] if skip else None))
        i += 1
    return out


def test_blocks_are_found():
    found = blocks(README.read_text())
    runnable = [b for b in found if b.lang in ("bash", "python") and b.skip is None]
    assert len(runnable) >= 6, runnable
    assert any(b.skip == "needs CUDA" for b in found)
    assert all(b.lang in ("bash", "python", "text") for b in found), \
        [(b.line, b.lang) for b in found]  # a fence without a language is neither run nor seen


def _scratch(tmp: Path) -> dict[str, str]:
    """The layout the README assumes, and an environment without the venv on PATH."""
    for name in ("examples", "fixtures"):
        (tmp / name).symlink_to(ROOT / name)
    venv_bin = Path(sys.executable).parent
    if (ROOT / ".venv" / "bin" / "activate").is_file():
        (tmp / ".venv").symlink_to(ROOT / ".venv")
        venv_bin = ROOT / ".venv" / "bin"
    else:  # not run from .venv (CI with its own env): an activate that puts it on PATH
        (tmp / ".venv" / "bin").mkdir(parents=True)
        (tmp / ".venv" / "bin" / "activate").write_text(f'export PATH="{venv_bin}:$PATH"\n')
    hidden = {str(venv_bin), str(Path(sys.executable).parent)}
    path = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p not in hidden]
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONHOME")}
    env.update(PATH=os.pathsep.join(path), NO_COLOR="1")
    return env


@pytest.mark.slow
def test_readme_runs_as_printed(tmp_path):
    env = _scratch(tmp_path)
    script = ["set -euo pipefail"]
    ran = []
    for n, b in enumerate(blocks(README.read_text())):
        if b.lang not in ("bash", "python") or b.skip is not None:
            continue
        ran.append(b)
        script.append(f"echo '@@ README.md line {b.line} ({b.lang})' >&2")
        if b.lang == "bash":
            script.append(b.code)
        else:
            name = f"_readme_{n}.py"
            (tmp_path / name).write_text(b.code)
            script.append(f"python {name}")
    script.append("echo '@@ done' >&2")
    proc = subprocess.run(["bash", "-c", "\n".join(script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=1500)
    markers = [ln for ln in proc.stderr.splitlines() if ln.startswith("@@ ")]
    assert proc.returncode == 0 and markers[-1] == "@@ done", (
        f"README block failed at {markers[-1] if markers else '?'} (exit {proc.returncode})\n"
        f"--- stdout (tail)\n{proc.stdout[-3000:]}\n--- stderr (tail)\n{proc.stderr[-3000:]}")
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out, out[-3000:]
    assert "PASS" in proc.stdout  # verify, fp32 and bf16
    assert "refused with exit code 6" in proc.stdout  # disable after training is refused
    assert len(markers) == len(ran) + 1
