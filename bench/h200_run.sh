#!/usr/bin/env bash
# One device call on the H200 (issue 16): the GPU test suite without and with the `gpu` extra,
# then bench/kernels.py and bench/overhead.py. Run from the repository root with the Megatron
# trees at ../mlm/{dev,dsv4} and the wheels (mamba-ssm pure-Python, fla-core) at ../whl.
# Logs and tables go to $OUT.  STEPS picks a subset: tests,extra,kernels,overhead,repeat.
# With .tk1 / .tk2 carried (bench/tilekernels_env.sh) the overhead step has TileKernels' row.
set -u
OUT=${OUT:-/tmp/mhc_out}
STEPS=${STEPS:-tests,extra,kernels,overhead}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
ROOT=$PWD
MLM=$(cd "${MLM:-$ROOT/../mlm}" && pwd)   # MLM=.carry/mlm from the repo root
WHL=${WHL:-../whl}
pip install -q --no-index --no-deps --target /tmp/site "$WHL"/*.whl && : > /tmp/site/mamba_ssm/__init__.py
{
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  cat "$MLM/dev/COMMIT" "$MLM/dsv4/COMMIT"
} > "$OUT/device.txt" 2>&1
TESTS=(${TEST_PATHS:-tests} --ignore=tests/cli --ignore=tests/test_readme.py -m "gpu or triton" -o addopts= -q -rs -p no:cacheprovider -n ${NPROC:-6})
step() { case ",$STEPS," in *",$1,"*) return 0;; *) return 1;; esac; }
FAILED=""
# done_step RC LOG: the step's exit status and wall time go to the end of its log; a failed step
# fails the script (after every selected step has run)
done_step() { echo "rc=$1 wall=$((SECONDS - t0))s" >> "$2"; [ "$1" = 0 ] || FAILED="$FAILED $(basename "$2")"; }
t0=$SECONDS
if step tests; then
  PYTHONPATH=$ROOT timeout ${T_TESTS:-90} python3 -m pytest "${TESTS[@]}" > "$OUT/tests_plain.log" 2>&1
  done_step $? "$OUT/tests_plain.log"
fi
t0=$SECONDS
if step extra; then
  PYTHONPATH=/tmp/site:$ROOT MHC_MEGATRON_SRC_DEV=$MLM/dev MHC_MEGATRON_SRC_DSV4=$MLM/dsv4 \
    TRITON_F32_DEFAULT=ieee MAMBA_DETERMINISTIC=1 \
    timeout ${T_EXTRA:-300} python3 -m pytest "${TESTS[@]}" > "$OUT/tests_extra.log" 2>&1
  done_step $? "$OUT/tests_extra.log"
fi
t0=$SECONDS
if step kernels; then
  PYTHONPATH=$ROOT timeout ${T_KERNELS:-90} python3 bench/kernels.py ${KERNEL_ARGS:---sweep} --diag --out "$OUT/kernels_h200.md" \
    > "$OUT/kernels.log" 2>&1
  done_step $? "$OUT/kernels.log"
fi
t0=$SECONDS
if step overhead; then
  PP=/tmp/site:$ROOT
  if [ -f .tk1/tksite.tar.xz ]; then  # the TileKernels peer row (bench/tilekernels_env.sh)
    mkdir -p /tmp/tks && xz -dc .tk1/tksite.tar.xz | tar -x -C /tmp/tks
    PP=/tmp/site:/tmp/tks:$ROOT/.tk2/tk:$ROOT
    export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
  fi
  PYTHONPATH=$PP MHC_MEGATRON_SRC=$MLM/dev timeout ${T_OVERHEAD:-200} python3 bench/overhead.py ${OVERHEAD_ARGS:-} \
    --out "$OUT/overhead_h200.md" > "$OUT/overhead.log" 2>&1
  done_step $? "$OUT/overhead.log"
fi
t0=$SECONDS
if step repeat; then  # bitwise repeatability of the projection (bench/tma_repeat.py)
  rc=0  # any of the five runs failing (or finding a differing launch) fails the step
  for a in "" "--ring" "--no-gluon" "--plain" "--backward"; do
    PYTHONPATH=$ROOT timeout ${T_REPEAT:-60} python3 bench/tma_repeat.py --seconds ${REPEAT_S:-15} $a \
      || rc=$?
  done > "$OUT/repeat.log" 2>&1
  done_step $rc "$OUT/repeat.log"
fi
for f in tests_plain tests_extra kernels overhead repeat; do
  if [ -f "$OUT/$f.log" ]; then echo "== $f"; tail -n 4 "$OUT/$f.log"; fi
done
[ -z "$FAILED" ] || { echo "FAILED:$FAILED"; exit 1; }
