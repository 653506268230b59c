import os

# MKL (torch's CPU GEMM and vector math) picks kernels by CPU and, off its reproducible mode,
# may sum in another order from call to call: on an AVX-512 box a causality test's row differed
# in its last bits between two forwards that differ only in later tokens. Its AVX2 path in
# conditional numerical reproducibility mode is pinned here, before torch loads MKL, so the CPU
# suite computes the same bits on every x86 machine with AVX2 (fixtures/make_fixtures.py pins
# the same path). Tests that run subprocesses pass it on through the environment.
os.environ["MKL_CBWR"] = "AVX2"

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
