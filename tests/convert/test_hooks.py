"""The test/fault hooks (``mhc_convert/hooks.py``): one frozen object, read from the environment
only at the process entry, a no-op by default, and passed explicitly down the write path."""

from __future__ import annotations

import ast
import dataclasses
import errno
from pathlib import Path

import pytest

from mhc_convert.hooks import NO_HOOKS, Hooks
from tests.paths import ROOT

HOOK_VARS = ("MHC_CRASH_AT", "MHC_HOLD_AT", "MHC_HOLD_FILE", "MHC_PHASE_LOG", "MHC_FAULT",
             "MHC_FAIL_RANK", "MHC_COPY_MODE", "MHC_DISTRIBUTED", "MHC_DIST_TIMEOUT",
             "MHC_DIST_DEAD_S")


def test_from_env_maps_every_variable():
    h = Hooks.from_env({"MHC_CRASH_AT": "mid-copy:3", "MHC_HOLD_AT": "after-lock",
                        "MHC_HOLD_FILE": "/x/hold", "MHC_PHASE_LOG": "/x/log",
                        "MHC_FAULT": "enospc, eacces@50000,eio@7,bogus@1,eacces@x",
                        "MHC_FAIL_RANK": "1", "MHC_COPY_MODE": "user",
                        "MHC_DISTRIBUTED": "0", "MHC_DIST_TIMEOUT": "9.5",
                        "MHC_DIST_DEAD_S": "nan?"})
    assert h == Hooks(crash_at="mid-copy:3", hold_at="after-lock", hold_file="/x/hold",
                      phase_log="/x/log", faults=frozenset({"enospc"}),
                      write_faults=(("eacces", 50000), ("eio", 7)), fail_rank=1,
                      copy_mode="user", distributed=False, dist_timeout_s=9.5,
                      dist_dead_s=120.0)
    assert Hooks.from_env({"MHC_DISTRIBUTED": "1"}).distributed is True
    assert Hooks.from_env({"MHC_COPY_MODE": "warp"}).copy_mode == "direct"  # the default


def test_default_is_a_frozen_no_op():
    assert Hooks.from_env({}) == NO_HOOKS == Hooks()
    with pytest.raises(dataclasses.FrozenInstanceError):
        NO_HOOKS.crash_at = "after-lock"  # type: ignore[misc]
    NO_HOOKS.phase("after-lock")  # returns; nothing counted
    NO_HOOKS.before_write(1 << 40, "/x")
    NO_HOOKS.rank_fault(0)
    assert not NO_HOOKS.fault("enospc") and NO_HOOKS.copy_mode == "direct"
    assert NO_HOOKS._run.phases == {} and NO_HOOKS._run.written == 0


def test_write_fault_counts_per_hooks_object():
    h = Hooks.from_env({"MHC_FAULT": "enospc@100"})
    h.before_write(60, "/x/a")
    with pytest.raises(OSError) as ei:
        h.before_write(60, "/x/b")  # crosses byte 100 over both files
    assert ei.value.errno == errno.ENOSPC and ei.value.filename == "/x/b"
    Hooks.from_env({"MHC_FAULT": "enospc@100"}).before_write(60, "/x/b")  # fresh: counts from 0


def test_phase_log_counts_calls(tmp_path):
    h = Hooks(phase_log=str(tmp_path / "log"))
    for name in ("a", "b", "a"):
        h.phase(name)
    assert [line.split()[0] for line in (tmp_path / "log").read_text().splitlines()] == \
        ["a:1", "b:1", "a:2"]


def _env_reads(tree: ast.AST) -> list[int]:
    """Lines that touch ``os.environ`` / ``os.getenv``."""
    return [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Attribute)
            and n.attr in ("environ", "getenv") and isinstance(n.value, ast.Name)
            and n.value.id == "os"]


def test_no_production_module_reads_the_hook_variables():
    """Only the entry (cli.main) reads the environment for hooks; distributed.py reads the
    launcher's own variables (RANK, ...) in exactly one function; hooks.py only parses the
    mapping it is given."""
    pkg = ROOT / "mhc_convert"
    for path in sorted(pkg.rglob("*.py")):
        text = path.read_text()
        rel = path.relative_to(ROOT).as_posix()
        if rel != "mhc_convert/hooks.py":
            assert not [v for v in HOOK_VARS if f'"{v}"' in text], rel
        reads = _env_reads(ast.parse(text))
        if rel == "mhc_convert/cli.py":
            assert len(reads) == 1, (rel, reads)
        elif rel == "mhc_convert/distributed.py":
            fn = next(n for n in ast.walk(ast.parse(text))
                      if isinstance(n, ast.FunctionDef) and n.name == "_launch")
            assert reads and all(fn.lineno <= ln <= fn.end_lineno for ln in reads), reads
        else:
            assert reads == [], (rel, reads)


def test_no_module_reaches_into_another_through_getattr():
    """Registries stay private to their module (commit's active outputs: ``record``,
    ``hooks_for``, ``collecting``, ``AtomicOutput.adopt``); nobody reads a private name of
    another object or module through ``getattr``."""
    for path in sorted((ROOT / "mhc_convert").rglob("*.py")):
        for n in ast.walk(ast.parse(path.read_text())):
            if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "getattr" \
                    and len(n.args) > 1 and isinstance(n.args[1], ast.Constant) \
                    and str(n.args[1].value).startswith("_"):
                pytest.fail(f"{path}:{n.lineno} getattr(..., {n.args[1].value!r})")


def test_entry_reads_the_environment_once():
    text = (ROOT / "mhc_convert" / "cli.py").read_text()
    assert text.count("Hooks.from_env(") == 1
    assert Path(ROOT / "mhc_convert" / "__main__.py").read_text().strip().endswith("main()")
