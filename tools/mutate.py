#!/usr/bin/env python3
"""Mutation check: hand-written mutants the test suite must kill. Run before each stop.

    .venv/bin/python tools/mutate.py            # every mutant, its targeted tests
    .venv/bin/python tools/mutate.py -k sinkhorn # mutants whose id contains "sinkhorn"
    .venv/bin/python tools/mutate.py --fallback  # a survivor also gets the CPU suite, -x
    .venv/bin/python tools/mutate.py --list
    .venv/bin/python tools/mutate.py -k split --tests tests/model/test_ssm.py  # other tests

Each mutant is (file, exact original snippet, replacement, description, tests). The snippet
must occur exactly once in the current file: a snippet that no longer matches is reported
STALE (and fails the run) instead of being skipped, so a refactor that moves the code makes
someone rewrite the mutant against the new code rather than silently dropping the check.

Mutants are applied to a scratch copy of the repository (the tracked and untracked-not-ignored
files, ``git ls-files``), never to this working tree, so an interrupted run leaves nothing to
restore; each mutated file is restored in the copy (try/finally) before the next mutant. The
tests run with this interpreter and ``PYTHONPATH`` set to the copy (checked: ``mhc_model``
must import from the copy). A mutant is killed when its tests fail (pytest exit 1), error in
collection (2), or time out; "no tests ran" (exit 4/5) is an error of the mutant list. First
the union of the targeted tests runs once unmutated (the baseline): if it fails, no verdict
would mean anything, and the run stops with exit 2.
Exit status: 0 when every mutant is killed, 1 otherwise, 2 when the baseline fails.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutant:
    id: str
    file: str
    original: str
    replacement: str
    description: str
    tests: tuple[str, ...]
    timeout_s: int = 300
    extra: tuple[tuple[str, str, str], ...] = field(default=())  # more (file, orig, repl)


MUTANTS: list[Mutant] = [
    # ------------------------------------------------------------------ reference mHC math
    Mutant("hpre-eps", "mhc_model/mhc_ref.py",
           "        H_pre = H_pre + eps\n", "        H_pre = H_pre + 2 * eps\n",
           "deepseek H_pre eps doubled (sigmoid + 2e-6)",
           ("tests/model/test_mhc_conventions.py",)),
    Mutant("sinkhorn-deepseek-iters", "mhc_model/mhc_ref.py",
           "        for _ in range(iters - 1):\n", "        for _ in range(iters):\n",
           "deepseek Sinkhorn runs one {row, col} round too many",
           ("tests/model/test_mhc_conventions.py",)),
    Mutant("sinkhorn-dsv4-iters", "mhc_model/mhc_ref.py",
           "    for _ in range(iters):\n", "    for _ in range(iters - 1):\n",
           "exp_rowmax (megatron_dsv4) Sinkhorn runs one {row, col} round too few",
           ("tests/model/test_mhc_conventions.py",)),
    Mutant("mix-transpose", "mhc_model/mhc_ref.py",
           'eq = "tji,tjc->tic" if _resolve(convention).mix_transposed else "tij,tjc->tic"',
           'eq = "tij,tjc->tic" if _resolve(convention).mix_transposed else "tji,tjc->tic"',
           "mix applies H where the convention says H^T (and vice versa)",
           ("tests/model/test_mhc_math.py::test_mix_transpose_convention",
            "tests/model/test_mhc_conventions.py")),
    Mutant("rms-factor-inv-norm", "mhc_model/mhc_ref.py",
           "    return 1.0 / (rms + eps)\n",
           "    return torch.rsqrt(xf_TK.square().mean(dim=-1, keepdim=True) + eps)\n",
           "inv_norm RMS factor (megatron_dev, megatron_dsv4) replaced by rsqrt_mean",
           ("tests/model/test_mhc_conventions.py",)),
    # the Convention table (mhc_model/conventions.py): one field of one row changed
    Mutant("table-dev-rms", "mhc_model/conventions.py",
           '            rms_factor="inv_norm",\n            head_eps="layernorm_epsilon",\n'
           '            params_dtype_rule="fp32",\n',
           '            rms_factor="rsqrt_mean",\n            head_eps="layernorm_epsilon",\n'
           '            params_dtype_rule="fp32",\n',
           "megatron_dev row: RMS factor rsqrt_mean (deepseek's) instead of inv_norm",
           ("tests/model/test_mhc_conventions.py",)),
    # DeepSeek's own code as the oracle (TileKernels' torch references, fixture 36d9e45d)
    Mutant("table-deepseek-rms", "mhc_model/conventions.py",
           '            rms_factor="rsqrt_mean",\n',
           '            rms_factor="inv_norm",\n',
           "deepseek row: Megatron's inv_norm RMS factor instead of rsqrt_mean",
           ("tests/interop/test_tilekernels_refs.py",)),
    Mutant("head-mix-eps", "mhc_model/mhc_ref.py",
           "    pre_TN = pre_TN + eps\n", "    pre_TN = pre_TN + 0.0 * eps\n",
           "learned head without the +eps on its mix (TileKernels' head_compute_mix has it)",
           ("tests/interop/test_tilekernels_refs.py",)),
    Mutant("table-dsv4-mix", "mhc_model/conventions.py",
           '            sinkhorn="exp_rowmax",\n            mix_transposed=False,\n',
           '            sinkhorn="exp_rowmax",\n            mix_transposed=True,\n',
           "megatron_dsv4 row: mix applies H^T",
           ("tests/model/test_mhc_conventions.py",)),
    Mutant("table-dsv4-pre-eps", "mhc_model/conventions.py",
           '            mix_transposed=False,\n            h_pre_eps=False,\n',
           '            mix_transposed=False,\n            h_pre_eps=True,\n',
           "megatron_dsv4 row: H_pre gets + eps",
           ("tests/model/test_mhc_conventions.py",)),
    # ------------------------------------------------------------ Megatron factory splits
    Mutant("mamba-split-in_proj-BC", "mhc_model/specs.py",
           '"mixer.in_proj.weight": (("z", di), ("x", di), ("B", gn), ("C", gn), ("dt", h)),',
           '"mixer.in_proj.weight": (("z", di), ("x", di), ("C", gn), ("B", gn), ("dt", h)),',
           "Mamba in_proj split stores C before B (same sizes: shapes cannot tell)",
           ("tests/model/test_split_parity.py",
            "tests/model/test_toggle_core.py::test_disk_views_are_views_in_split_order")),
    Mutant("mamba-split-conv-BC", "mhc_model/specs.py",
           '    conv = (("x", di), ("B", gn), ("C", gn))\n',
           '    conv = (("x", di), ("C", gn), ("B", gn))\n',
           "Mamba conv1d split stores C before B",
           ("tests/model/test_split_parity.py",)),
    Mutant("gdn-split-query-key", "mhc_model/specs.py",
           '"self_attention.in_proj.weight": (("query", qk), ("key", qk), ("value", v),',
           '"self_attention.in_proj.weight": (("key", qk), ("query", qk), ("value", v),',
           "GDN in_proj split stores key before query (same sizes)",
           ("tests/model/test_split_parity.py",)),
    Mutant("gdn-split-conv-query-key", "mhc_model/specs.py",
           '    conv = (("query", qk), ("key", qk), ("value", v))\n',
           '    conv = (("key", qk), ("query", qk), ("value", v))\n',
           "GDN conv1d split stores key before query",
           ("tests/model/test_split_parity.py",)),
    # ------------------------------------------------------------------------ durability
    Mutant("fsync-commit-noop", "mhc_convert/commit.py",
           "    try:\n        os.fsync(fd)\n    finally:\n        os.close(fd)\n",
           "    try:\n        pass\n    finally:\n        os.close(fd)\n",
           "commit's fsync of every output file and directory is a no-op",
           ("tests/convert/test_durability.py",)),
    Mutant("fsync-hashcopy-noop", "mhc_convert/hashcopy.py",
           "        size, digest = writer.finish()\n        os.fsync(fd)\n",
           "        size, digest = writer.finish()\n",
           "hashcopy.output_file closes a written file without fsync",
           ("tests/convert/test_durability.py", "tests/convert/test_hashcopy_fsync.py")),
    # ------------------------------------------------------------------------ allowlists
    Mutant("allowlist-eval", "mhc_model/safe_unpickle.py",
           "        torch._C.Generator,  # legacy-format rng state, as Megatron allowlists it\n",
           "        torch._C.Generator,  # legacy-format rng state, as Megatron allowlists it\n"
           "        eval,\n",
           "builtins.eval added to the torch.load allowlist",
           ("tests/convert/test_payloads.py::test_common_pt",)),
    Mutant("metadata-allowlist-getattr", "mhc_model/safe_unpickle.py",
           '        ("builtins", "complex"): complex,\n',
           '        ("builtins", "complex"): complex,\n        ("builtins", "getattr"): getattr,\n',
           "builtins.getattr added to the .metadata allowlist (a gadget, no call of its own)",
           ("tests/convert/test_payloads.py::test_metadata_unpickler",)),
    Mutant("unpickler-c", "mhc_model/safe_unpickle.py",
           "class SafeUnpickler(pickle._Unpickler):  # type: ignore[name-defined]\n",
           "class SafeUnpickler(pickle.Unpickler):  # type: ignore[name-defined]\n",
           "SafeUnpickler back on the C unpickler (memo-index and hash bombs)",
           ("tests/fuzz/test_fuzz_unpickle.py::test_regression_memo_index_bomb_allocates_nothing",
            "tests/fuzz/test_fuzz_unpickle.py::test_regression_hash_bombs_are_refused")),
    Mutant("unbounded-range", "mhc_model/safe_unpickle.py",
           "    if len(r) > _MAX_RANGE:\n", "    if False:\n",
           "allowlisted range unbounded (frozenset(range(n)) amplification)",
           ("tests/fuzz/test_fuzz_unpickle.py"
            "::test_regression_amplifying_allowlisted_calls_are_refused",)),
    # -------------------------------------------------------------------------- parsers
    Mutant("json-valueerror", "mhc_convert/formats/safetensors_io.py",
           "    except (ValueError, RecursionError) as e:\n",
           "    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:\n",
           "strict JSON lets CPython's int-digits ValueError escape (fuzz finding)",
           ("tests/fuzz/test_fuzz_safetensors.py"
            "::test_regression_long_int_literal_is_invalid_input",)),
    Mutant("config-types", "mhc_model/config.py",
           '        _check_types("config", self)  # sub-configs',
           '        pass  # _check_types("config", self)  # sub-configs',
           "HybridConfig stops type-checking its own fields (fuzz finding)",
           ("tests/fuzz/test_fuzz_config.py::test_regression_config_field_types",)),
    Mutant("hf-config-recursion", "mhc_convert/adapters/__init__.py",
           "    except (OSError, ValueError, RecursionError):",
           "    except (OSError, ValueError):",
           "format detection lets deeply nested config.json raise RecursionError (fuzz finding)",
           ("tests/fuzz/test_fuzz_config.py"
            "::test_regression_deeply_nested_config_is_invalid_input",)),
    # ------------------------------------------------------------ Megatron args flags
    Mutant("flip-args-streams", "mhc_convert/adapters/megatron_args.py",
           "            setattr(new, name, value)\n",
           "            setattr(new, name, 4 if field == 'num_residual_streams' else value)\n",
           "the converter writes num_residual_streams=4 into args whatever --streams says",
           ("tests/convert/test_engine.py::test_torch_dist_flags_follow_streams",)),
    Mutant("flip-args-enable", "mhc_convert/adapters/megatron_args.py",
           "            setattr(new, name, value)\n",
           "            setattr(new, name, True if value is False else value)\n",
           "disable leaves enable_hyper_connections=True in args",
           ("tests/convert/test_engine.py::test_torch_dist_roundtrip_bitwise",
            "tests/convert/test_legacy_engine.py::test_roundtrip_bitwise_and_args")),
    Mutant("megatron-args-sinkhorn", "mhc_model/megatron_args.py",
           "        setattr(ns, MHC_FLAG_SPELLINGS[name][0], value)\n",
           "        setattr(ns, MHC_FLAG_SPELLINGS[name][0],\n"
           "                20 if name == 'mhc_sinkhorn_iterations' else value)\n",
           "megatron_args() records 20 Sinkhorn iterations whatever the model uses",
           ("tests/model/test_megatron_args_roundtrip.py", "tests/model/test_config.py")),
    Mutant("meta-convention-dropped", "mhc_convert/adapters/megatron_args.py",
           "        out[MHC_META_KEY] = {name: getattr(target.mhc, name) for name in "
           "MHC_META_FIELDS}\n",
           "        out[MHC_META_KEY] = {name: getattr(target.mhc, name) for name in "
           "MHC_META_FIELDS\n                             if name != 'mhc_convention'}\n",
           "enable stops recording the convention beside Megatron's args",
           ("tests/convert/test_convention_recorded.py",)),
    # ------------------------------------------------------------------------- planner
    Mutant("plan-optimizer-not-renamed", "mhc_model/toggle/plan.py",
           '        if p.segment in ("plain", "inner"):\n'
           '            model_key = K.split_opt(key)[1]',
           '        if p.segment in ("plain", "inner") and p.opt_state is None:\n'
           '            model_key = K.split_opt(key)[1]',
           "optimizer states keep the old model key (not renamed with it)",
           ("tests/convert/test_engine.py::test_torch_dist_optimizer_state",
            "tests/convert/test_plan_properties.py")),
    Mutant("plan-drop-extra-state", "mhc_model/toggle/plan.py",
           "        renames.append(Rename(key, dst))\n",
           "        if K.EXTRA_STATE not in key:\n            renames.append(Rename(key, dst))\n",
           "the planner silently drops every _extra_state item",
           ("tests/convert/test_engine.py::test_torch_dist_roundtrip_bitwise",
            "tests/convert/test_torch_dist.py")),
    # -------------------------------------------------------------------------- engine
    Mutant("disable-skips-verdict", "mhc_convert/engine.py",
           "    if not verdict.exact and not verdict.exact_with_folds:\n",
           "    if False:\n",
           "disable never consults the verdict (a lossy disable goes through silently)",
           ("tests/convert/test_engine_refusals.py::test_refuse_lossy_disable",)),
    # ----------------------------------------------------------------- this session's code
    Mutant("pickle-guard-off", "mhc_model/pickle_guard.py",
           "            if callee is _BA and (n := _big_int(",
           "            if callee is None and (n := _big_int(",
           "the allocation guard never recognises the bytearray callable",
           ("tests/model/test_pickle_guard.py",)),
    Mutant("dp-param-align", "mhc_convert/formats/dp_layout.py",
           "PARAM_ALIGN = 64  # param_layout.py pad_param_start",
           "PARAM_ALIGN = 128  # param_layout.py pad_param_start",
           "parameter starts aligned to 128 instead of Megatron's 64 in the bucket layout",
           ("tests/convert/test_dp_optim.py", "tests/convert/test_dp_layout.py")),
    Mutant("mtp-split-swapped", "mhc_model/toggle/values.py",
           "        return {reshape.dsts[0]: w[:, :C].contiguous(), reshape.dsts[1]: "
           "w[:, C:].contiguous()}",
           "        return {reshape.dsts[0]: w[:, C:].contiguous(), reshape.dsts[1]: "
           "w[:, :C].contiguous()}",
           "enable gives e_proj the columns of h and h_proj those of e",
           ("tests/model/test_mtp.py",)),
    Mutant("one-pass-tail-dropped", "mhc_convert/validate.py",
           "        self._tail += bytes(data[cut:])\n",
           "        self._tail = b\"\"\n",
           "an element split between two copy buffers is never checked",
           ("tests/convert/test_one_pass.py",)),
    Mutant("csa-window-off-by-one", "mhc_model/layers/csa.py",
           "    return (t_1S <= i_S1) & (t_1S > i_S1 - window)",
           "    return (t_1S <= i_S1) & (t_1S >= i_S1 - window)",
           "the sliding window admits one token too many",
           ("tests/model/test_dsv4_attention.py",)),
    # the pipelined TMA projection loops (the race of bench/results/tma_race_h200.md)
    Mutant("tma-fwd-chained-dots", "mhc_model/kernels/triton_proj.py",
           "        tile = tl.dot(x, tl.trans(w_hi))  # per-tile chain, fp32 sum (see _proj_tile)\n"
           "        acc += tl.dot(x, tl.trans(w_lo), tile)\n",
           "        acc = tl.dot(x, tl.trans(w_lo), tl.dot(x, tl.trans(w_hi), acc))\n",
           "TMA forward chains its dots through acc: a wgmma stays pending over the x prefetch",
           ("tests/model/test_kernels_ir.py",)),
    Mutant("tma-bwd-dw-dot-last", "mhc_model/kernels/triton_proj_bwd.py",
           "        acc += tl.dot(xt, dp)  # chained over the tiles (see the docstring)\n"
           "        dx = tl.dot(dp, w_hi)\n        dx = tl.dot(dp, w_lo, dx)\n",
           "        dx = tl.dot(dp, w_hi)\n        dx = tl.dot(dp, w_lo, dx)\n"
           "        acc += tl.dot(xt, dp)\n",
           "TMA backward issues the dW dot last: it stays pending over the x prefetch",
           ("tests/model/test_kernels_ir.py",)),
    # the Gluon projection forward reads x from shared memory once (gluon_proj.tile_areg)
    Mutant("gluon-a-from-shared", "mhc_model/kernels/gluon_proj.py",
           "        tile = warpgroup_mma(x, ws.slice(0, KP, dim=0).permute((1, 0)), zero,\n",
           "        tile = warpgroup_mma(xs, ws.slice(0, KP, dim=0).permute((1, 0)), zero,\n",
           "the Gluon forward's hi wgmma reads x from shared memory again, not from registers",
           ("tests/model/test_gluon_proj.py",)),
    Mutant("gluon-any-triton", "mhc_model/kernels/gluon_proj.py",
           "    return m is not None and (int(m[1]), int(m[2])) >= TRITON_MIN\n",
           "    return m is not None\n",
           "the Gluon forward is taken on any Triton, older Gluon APIs included",
           ("tests/model/test_gluon_proj.py",)),
    Mutant("sums-keep-owned", "fixtures/sha256sums.py",
           "            if not owns(rel):\n", "            if True:\n",
           "the SHA256SUMS writer keeps the stale lines of the files it rewrites",
           ("tests/test_fixtures.py",)),
    Mutant("sums-unsorted", "fixtures/sha256sums.py",
           "for rel in sorted(lines))", "for rel in lines)",
           "the SHA256SUMS writer keeps insertion order instead of sorting by path",
           ("tests/test_fixtures.py",)),
]

FALLBACK = ("tests", "-m", "not gpu")


def scratch_copy(dst: Path) -> None:
    """The working tree as git sees it (tracked + untracked-not-ignored), into ``dst``."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         cwd=ROOT, check=True, capture_output=True).stdout
    for rel in filter(None, out.decode().split("\0")):
        src = ROOT / rel
        if not src.is_file():  # deleted in the tree but still in the index
            continue
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)


def run_pytest(copy: Path, tests: tuple[str, ...], timeout: int) -> tuple[str, str, float]:
    """(verdict, by, seconds): verdict killed|survived|error."""
    env = {**os.environ, "PYTHONPATH": str(copy), "PYTHONDONTWRITEBYTECODE": "1",
           "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-rfE", "-p", "no:cacheprovider",
           "-p", "no:randomly", *tests]
    t0 = time.perf_counter()
    try:
        res = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True,
                             timeout=timeout)
    except subprocess.TimeoutExpired:
        return "killed", f"timeout after {timeout} s", time.perf_counter() - t0
    dt = time.perf_counter() - t0
    out = res.stdout + res.stderr
    if res.returncode == 0:
        return "survived", "", dt
    if res.returncode in (1, 2):
        m = re.search(r"^(?:FAILED|ERROR) (\S+)", out, re.M)
        return "killed", (m.group(1) if m else f"pytest exit {res.returncode}"), dt
    tail = " | ".join(out.strip().splitlines()[-3:])
    return "error", f"pytest exit {res.returncode}: {tail[:200]}", dt


def apply(copy: Path, file: str, original: str, replacement: str) -> tuple[Path, str] | str:
    """Mutate ``copy/file``; returns (path, saved text), or the reason it is stale."""
    path = copy / file
    if not path.is_file():
        return f"stale mutant: {file} does not exist"
    text = path.read_text()
    n = text.count(original)
    if n != 1:
        return (f"stale mutant: snippet found {n} times in {file}" if n else
                f"stale mutant: snippet not found in {file}")
    path.write_text(text.replace(original, replacement))
    return path, text


def check_copy_is_imported(copy: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(copy)}
    where = subprocess.run([sys.executable, "-c", "import mhc_model, mhc_convert; "
                            "print(mhc_model.__file__); print(mhc_convert.__file__)"],
                           cwd=copy, env=env, capture_output=True, text=True, check=True).stdout
    bad = [w for w in where.split() if not Path(w).resolve().is_relative_to(copy.resolve())]
    if bad:
        sys.exit(f"mutate.py: the scratch copy is not what gets imported ({bad}); refusing to "
                 "report on mutants that would not be exercised")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-k", default="", help="only mutants whose id contains this")
    ap.add_argument("--fallback", action="store_true",
                    help="rerun a survivor against the CPU suite (-x) before calling it alive")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--no-baseline", action="store_true",
                    help="skip the unmutated run of the targeted tests")
    ap.add_argument("--tests", nargs="+", help="run the selected mutants against these tests "
                    "instead of their own (e.g. to see whether older tests kill them)")
    args = ap.parse_args()
    mutants = [m for m in MUTANTS if args.k in m.id]
    if args.tests:
        mutants = [dataclasses.replace(m, tests=tuple(args.tests)) for m in mutants]
    if args.list:
        for m in mutants:
            print(f"{m.id:<28} {m.file:<40} {m.description}")
        return 0
    ids = [m.id for m in MUTANTS]
    assert len(set(ids)) == len(ids), "duplicate mutant ids"

    rows: list[tuple[str, str, str, float]] = []
    with tempfile.TemporaryDirectory(prefix="mhc-mutate-") as tmp:
        copy = Path(tmp) / "repo"
        scratch_copy(copy)
        check_copy_is_imported(copy)
        if not args.no_baseline:  # a test that fails unmutated would "kill" every mutant
            tests = tuple(dict.fromkeys(t for m in mutants for t in m.tests))
            verdict, by, dt = run_pytest(copy, tests, 1800)
            print(f"  baseline (unmutated, {len(tests)} test paths): "
                  f"{'passed' if verdict == 'survived' else 'FAILED ' + by} ({dt:.0f} s)",
                  flush=True)
            if verdict != "survived":
                print("mutate.py: the targeted tests fail without any mutant; fix that first")
                return 2
        for m in mutants:
            edits = [(m.file, m.original, m.replacement), *m.extra]
            saved: list[tuple[Path, str]] = []
            try:
                stale = None
                for edit in edits:
                    got = apply(copy, *edit)
                    if isinstance(got, str):
                        stale = got
                        break
                    saved.append(got)
                if stale:
                    rows.append((m.id, "STALE", stale, 0.0))
                else:
                    verdict, by, dt = run_pytest(copy, m.tests, m.timeout_s)
                    if verdict == "survived" and args.fallback:
                        verdict, by, dt2 = run_pytest(copy, FALLBACK, 3000)
                        by, dt = (f"fallback: {by}" if by else "fallback suite passed"), dt + dt2
                    rows.append((m.id, verdict, by, dt))
            finally:
                for path, text in reversed(saved):
                    path.write_text(text)
            print(f"  {m.id}: {rows[-1][1]} {rows[-1][2]} ({rows[-1][3]:.0f} s)", flush=True)

    width = max(len(r[0]) for r in rows)
    print(f"\n{'mutant':<{width}}  {'result':<8}  {'seconds':>7}  killed by / reason")
    for mid, verdict, by, dt in rows:
        print(f"{mid:<{width}}  {verdict:<8}  {dt:7.1f}  {by}")
    bad = [r for r in rows if r[1] != "killed"]
    print(f"\n{len(rows) - len(bad)}/{len(rows)} mutants killed"
          + (f"; NOT killed: {', '.join(r[0] for r in bad)}" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
