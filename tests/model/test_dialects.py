"""Our pattern grammar per Megatron branch (``mhc_model.dialects``) against Megatron's own
``parse_hybrid_pattern`` of that branch, imported from the tree the environment names
(``tests/megatron_env.py``; ``MHC_MEGATRON_SRC_MAIN`` / ``_DEV`` / ``_DSV4``; a branch without a
tree is skipped). Nothing of Megatron is copied here.

Megatron's ``hybrid_layer_allocation.py`` is executed from its file with one test-only stand-in:
``megatron.core.utils`` (two logging helpers the parser never calls), so the three branches run
in one process without importing the rest of Megatron. Compared on every pattern of a fixed list
(Megatron's docstring examples, the DeepSeek-V4 ones, malformed ones) and 1500 random strings
over all branches' symbols plus ``|``, ``/`` and a foreign one: both refuse, or both return the
same main part, MTP part and depth count, and the same layer / stage counts.
"""

from __future__ import annotations

import importlib.util
import random
import sys
import types

import pytest

from mhc_model.dialects import DIALECTS, parse_for_branch
from tests.megatron_env import megatron_tree

FIXED = [
    "", "M", "M*M*", "M*M*/MM/MM", "MMMM/*M/*M/*M", "M-M-|M-M*-/MM/MM", "C-D-/D-", "C-D-/D-/D-",
    "CHW-E/W-", "DEDE/DE", "M*-E/*-/*-", "*-/-", "M+-", "+-/+-", "*+", "*D", "*C", "*H", "*W",
    "/", "//", "M/", "M//", "/M", "/M/M", "M/-/", "M/-/*", "M/-|-", "M/|", "|", "||", "M||M",
    "M*|-E|/-", "M/*D", "*-/D-", "MX", "M/X", "m", "M G", "M*-E/E", "GGG*GGG*/G*", "-/-/-/-",
    "H/H", "W/W", "C/C",
]
ALPHABET = "MG*D+CHW-E|/x"


def _patterns() -> list[str]:
    rnd = random.Random(20261201)
    out = list(FIXED)
    for _ in range(1500):
        n = rnd.randint(0, 9)
        if rnd.random() < 0.5:  # mostly well-formed MTP tails, some broken
            main = "".join(rnd.choice("MG*D+CHW-E|") for _ in range(n))
            mtp = "".join(rnd.choice("MG*D+CHW-E") for _ in range(rnd.randint(0, 3)))
            parts = [mtp] * rnd.randint(1, 3)
            if rnd.random() < 0.15:
                parts[-1] += rnd.choice("-*|x")
            out.append(main + "/" + "/".join(parts))
        else:
            out.append("".join(rnd.choice(ALPHABET) for _ in range(n)))
    return out


def _megatron_parser(branch: str):
    tree = megatron_tree(branch)
    path = tree / "megatron" / "core" / "models" / "hybrid" / "hybrid_layer_allocation.py"
    if not path.is_file():  # a tree was given: a broken oracle fails, never skips
        pytest.fail(f"{path} is missing", pytrace=False)
    stub = types.ModuleType("megatron.core.utils")
    stub.log_on_each_pipeline_stage = stub.log_single_rank = lambda *a, **k: None
    saved = {k: sys.modules.get(k) for k in ("megatron", "megatron.core", "megatron.core.utils")}
    sys.modules.update({"megatron": types.ModuleType("megatron"),
                        "megatron.core": types.ModuleType("megatron.core"),
                        "megatron.core.utils": stub})
    try:
        spec = importlib.util.spec_from_file_location(f"_mlm_alloc_{branch}", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    return mod


def _theirs(mod, pattern: str):
    try:
        p = mod.parse_hybrid_pattern(pattern)
    except ValueError:
        return "refused"
    counts = None
    if p.main_pattern is not None:
        counts = (mod.get_hybrid_total_layer_count(pattern),
                  mod.get_hybrid_total_pipeline_segment_count(pattern))
    return (p.main_pattern, p.mtp_pattern, p.mtp_num_depths, counts)


def _ours(branch: str, pattern: str):
    try:
        p = parse_for_branch(pattern, branch)
    except ValueError:
        return "refused"
    counts = (len(p.main_symbols), len(p.stages)) if p.main is not None else None
    return (p.main, p.mtp, p.mtp_depths, counts)


@pytest.mark.parametrize("branch", sorted(DIALECTS))
def test_grammar_matches_megatron(branch):
    mod = _megatron_parser(branch)
    assert set(mod.Symbols.VALID_LAYERS) == set(DIALECTS[branch].symbols)
    patterns = _patterns()
    diffs = [(p, _ours(branch, p), _theirs(mod, p)) for p in patterns
             if _ours(branch, p) != _theirs(mod, p)]
    assert diffs == [], diffs[:5]
    refused = sum(_ours(branch, p) == "refused" for p in patterns)
    assert 0.2 < refused / len(patterns) < 0.9  # both kinds of pattern are exercised
