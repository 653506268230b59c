"""Which Megatron-LM source trees the oracle tests use (the environment scheme they share).

  MHC_MEGATRON_SRC_DEV=/path    a tree holding ``megatron/`` of Megatron-LM's ``dev`` branch
  MHC_MEGATRON_SRC_DSV4=/path   the same for the ``dsv4`` branch
  MHC_MEGATRON_SRC_MAIN=/path   the same for the ``main`` branch (the pattern-grammar oracle)
  MHC_MEGATRON_SRC=/path        one tree of either branch, named by
  MHC_MEGATRON_BRANCH=dev|dsv4|main  (required with MHC_MEGATRON_SRC)

A per-branch variable wins over MHC_MEGATRON_SRC for its branch; a branch whose tree is not given
is skipped by the tests, a misconfigured one fails them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

BRANCHES = ("dev", "dsv4", "main")


def megatron_trees() -> dict[str, Path | None]:
    trees: dict[str, Path | None] = dict.fromkeys(BRANCHES)
    for branch in trees:
        path = os.environ.get(f"MHC_MEGATRON_SRC_{branch.upper()}")
        if path:
            trees[branch] = Path(path)
    path = os.environ.get("MHC_MEGATRON_SRC")
    if path:
        branch = os.environ.get("MHC_MEGATRON_BRANCH", "")
        if branch not in trees:  # a misconfigured oracle fails loudly, never skips
            pytest.fail(f"MHC_MEGATRON_SRC is set: set MHC_MEGATRON_BRANCH to one of "
                        f"{sorted(trees)}, got {branch!r}", pytrace=False)
        trees[branch] = trees[branch] or Path(path)
    return trees


def megatron_tree(branch: str) -> Path:
    """The tree for ``branch``; skips the test when none is given."""
    tree = megatron_trees()[branch]
    if tree is None:
        pytest.skip(f"no Megatron {branch} tree (set MHC_MEGATRON_SRC_{branch.upper()}, or "
                    f"MHC_MEGATRON_SRC with MHC_MEGATRON_BRANCH={branch})")
    return tree
