#!/usr/bin/env bash
# Build the carry for the TileKernels peer row of bench/overhead.py (issue 16, item 5): the H200
# box has no network and no tilelang; tilelang 0.1.15 and its compiled needs are 82 MB of wheels,
# over the device's 64 MiB carry, so they travel as one xz tarball (36 MB) with two parts left
# out that a run does not load: z3's command-line binary (its libz3.so.4.15 stays, libz3.so
# becomes a link to it) and tvm's C++ sources (tilelang/3rdparty/tvm/src).
#   bash bench/tilekernels_env.sh            # writes .tk1/tksite.tar.xz and .tk2/tk (TileKernels)
# On the device (carry .tk1 and .tk2):
#   mkdir -p /tmp/tks && xz -dc .tk1/tksite.tar.xz | tar -x -C /tmp/tks
#   CUDA_HOME=/usr/local/cuda PYTHONPATH=/tmp/tks:$PWD/.tk2/tk:$PWD python3 bench/overhead.py \
#     --stacks swiglu --skip "eager,torch.compile"
set -euo pipefail
TK_REPO=${TK_REPO:?a git directory of deepseek-ai/TileKernels (the fetch tool gives one)}
W=$(mktemp -d)
pip_dl() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$W/whl" "$@"
}
pip_dl tilelang==0.1.15 "apache-tvm-ffi>=0.1.11,<0.1.13" torch-c-dlpack-ext==0.1.5 z3-solver==4.15.4.0
mkdir -p "$W/site"
for w in "$W"/whl/*.whl; do (cd "$W/site" && unzip -q -o "$w"); done
rm -rf "$W"/site/z3_solver-*.data "$W/site/tilelang/3rdparty/tvm/src"
rm -f "$W/site/z3/lib/libz3.so" && ln -s libz3.so.4.15 "$W/site/z3/lib/libz3.so"
mkdir -p .tk1 .tk2/tk
tar -cf - -C "$W/site" . | xz -9 -T0 > .tk1/tksite.tar.xz
git -C "$TK_REPO" archive HEAD tile_kernels | tar -x -C .tk2/tk
git -C "$TK_REPO" rev-parse HEAD > .tk2/tk/COMMIT
grep -qx '/.tk1/' .git/info/exclude || printf '/.tk1/\n/.tk2/\n' >> .git/info/exclude
rm -rf "$W"
du -sh .tk1 .tk2
