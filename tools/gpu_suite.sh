#!/usr/bin/env bash
# The whole GPU test suite, twice: without the `gpu` extra, then with fla-core + mamba-ssm's Triton
# ops and Megatron-LM's dev/dsv4 trees as the oracle. Run on the GPU box from the repo root:
#
#   bash tools/gpu_suite.sh WHEELS_DIR MLM_DIR LOG [COMMIT]
#
# WHEELS_DIR holds fla_core-*.whl and mamba_ssm-*.whl (pure Python); MLM_DIR holds dev/ and dsv4/
# trees (each with megatron/ and a COMMIT file). The log names device, versions and commit.
set -uo pipefail
wheels=$(realpath "$1") mlm=$(realpath "$2") log=$3 commit=${4:-unknown}
cd "$(dirname "$0")/.."
ignore=(--ignore=tests/cli --ignore=tests/test_readme.py)  # need the installed distribution
export PYTHONUNBUFFERED=1
{
  echo "# GPU test suite: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader)," \
       "$(python3 -c 'import torch, triton; print("torch", torch.__version__, "Triton", triton.__version__)')," \
       "$(date -u +%F), commit $commit"
  echo "# without the gpu extra"
  PYTHONPATH=$PWD python3 -m pytest tests "${ignore[@]}" -m gpu -o addopts= -q -rs -p no:cacheprovider
  echo "rc=$?"
  site=/tmp/gpu_extra_site
  python3 -m pip install -q --no-index --no-deps --target "$site" "$wheels"/*.whl \
    && : > "$site/mamba_ssm/__init__.py"  # its __init__ imports compiled CUDA modules
  echo "# with fla-core + mamba-ssm (Triton ops) and Megatron-LM dev $(cat "$mlm/dev/COMMIT" 2>/dev/null)" \
       "/ dsv4 $(cat "$mlm/dsv4/COMMIT" 2>/dev/null); TRITON_F32_DEFAULT=ieee MAMBA_DETERMINISTIC=1"
  TRITON_F32_DEFAULT=ieee MAMBA_DETERMINISTIC=1 PYTHONPATH=$site:$PWD \
    MHC_MEGATRON_SRC_DEV=$mlm/dev MHC_MEGATRON_SRC_DSV4=$mlm/dsv4 \
    python3 -m pytest tests "${ignore[@]}" -m gpu -o addopts= -q -rA -p no:cacheprovider
  echo "rc=$?"
} 2>&1 | tee "$log"
