"""Benchmark ``mhc-convert enable`` as an I/O job (DESIGN.md §7: "a full copy runs at disk speed;
a DCP rename is O(metadata)"). Not a test.

1. A synthetic >= 2 GB native checkpoint (MLP-only hybrid, C = 4096, F = 14336, vocab 32768,
   bf16, random bytes written straight with safetensors; the model is never built). Times
   ``enable`` against ``cp -r`` (+ ``sync``, since enable fsyncs) of the same bytes in the same run
   (throughput ratio, target >= 0.8) and measures the conversion's peak RSS in a child process
   (``ru_maxrss`` from ``os.wait4``, i.e. RUSAGE_CHILDREN of exactly that child; target
   <= 2 x largest tensor + 300 MB).
2. Synthetic Megatron ``torch_dist`` checkpoints written by torch DCP's own ``FileSystemWriter``
   (byte items ``common_state/shard_0_1`` = ``torch.save([common])`` with an argparse.Namespace
   ``args``, TE ``_extra_state`` and ``rng_state`` blobs taken from the megatron-core fixture), at
   two data sizes with the same keys (C = 1024 and C = 4096): ``enable(link="hardlink")`` time
   (target: independent of the data size).

    PYTHONPATH=. python bench/convert.py [--workdir DIR] [--out bench/results/convert_cpu.md]

Everything is written under a temp dir in --workdir (default /tmp, same filesystem for the
hardlinks) and removed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import io
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = Path("/work/shared/fixtures-external/megatron-core-0.19.2/hybrid_tp1")
SHARD_BYTES = 1 << 30
MB = 1e6


# ------------------------------------------------------------------------------------ helpers
def _sync() -> None:
    subprocess.run(["sync"], check=True)


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _random(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Random finite bf16 bits (incompressible; the top exponent bit is cleared so no value is
    NaN/Inf, which ``enable`` refuses by default)."""
    n = math.prod(shape)
    raw = torch.randint(0, 256, (2 * n,), dtype=torch.uint8, generator=gen)
    raw.view(n, 2)[:, 1] &= 0xBF
    return raw.view(torch.bfloat16).reshape(shape)


# Linux carries a process's RSS high-water mark across fork+exec (exec folds the pre-exec mm's
# hiwater into ru_maxrss), so a child forked straight from this multi-GB generator process would
# report our RSS, not its own. A tiny stdlib-only launcher in between starts the measured child
# from a ~10 MB process and reads its rusage with wait4 (RUSAGE_CHILDREN of exactly that child).
_LAUNCHER = ("import json, os, subprocess, sys\n"
             "p = subprocess.Popen(sys.argv[1:], stdout=subprocess.PIPE)\n"
             "out = p.stdout.read()\n"
             "_, st, ru = os.wait4(p.pid, 0)\n"
             "print(json.dumps({'rc': os.waitstatus_to_exitcode(st), 'maxrss': ru.ru_maxrss,"
             " 'out': out.decode()}))")


def _child(code: str, *argv: str, env_extra: dict | None = None) -> tuple[dict, float, int]:
    """Run ``code`` in a fresh interpreter; returns (its JSON stdout, wall s, peak RSS bytes)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env_extra or {})}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _LAUNCHER, sys.executable, "-W", "ignore",
                           "-c", code, *argv], capture_output=True, text=True, env=env,
                          check=True)
    wall = time.perf_counter() - t0
    res = json.loads(proc.stdout)
    if res["rc"] != 0:
        raise RuntimeError(f"child failed ({res['rc']}): {code}\n{proc.stderr}")
    out = res["out"]
    return (json.loads(out) if out.strip() else {}), wall, res["maxrss"] * 1024


# The child is a process entry: it maps MHC_COPY_MODE etc. to hooks as the CLI's main does.
ENABLE = ("import json, os, sys, time, mhc_convert\n"
          "from mhc_convert.hooks import Hooks\n"
          "t = time.perf_counter()\n"
          "r = mhc_convert.enable(sys.argv[1], sys.argv[2], link=sys.argv[3],\n"
          "                       allow_nonfinite=sys.argv[4] == 'skip-finite-scan',\n"
          "                       hooks=Hooks.from_env(os.environ))\n"
          "m = json.load(open(sys.argv[2] + '/mhc-manifest.json'))\n"
          "print(json.dumps({'seconds': r.seconds, 'bytes': r.bytes_total,\n"
          "                  'hashed_at_commit': m.get('hashed_at_commit')}))")
# MHC_COPY_MODE (pread + sha256 thread + write vs copy_file_range + re-read for the hash), with
# the NaN/Inf source scan skipped (the conversion proper), then the default CLI path (scan on).
MODES = ("user", "kernel", "user+finite-scan")


# ------------------------------------------------------------------------------------- native
def native_config(layers: int, hidden: int, ffn: int, vocab: int):
    from mhc_model.config import HybridConfig, MLPConfig

    return HybridConfig(hybrid_layer_pattern="-" * layers, hidden_size=hidden, vocab_size=vocab,
                        params_dtype="bfloat16", mlp=MLPConfig(ffn_hidden_size=ffn))


def write_native(root: Path, cfg) -> tuple[int, int]:
    """config.json + model-0000K-of-0000N.safetensors + index, random bf16. Returns
    (tensor bytes, largest tensor bytes)."""
    from safetensors.torch import save_file

    from mhc_model.toggle.shapes import expected_model_shapes

    root.mkdir(parents=True)
    shapes = expected_model_shapes(cfg)
    shards: list[list[str]] = [[]]
    size = 0
    for key, shape in shapes.items():
        nbytes = math.prod(shape) * 2
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    gen = torch.Generator().manual_seed(0)
    weight_map = {}
    for i, keys in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: _random(shapes[k], gen) for k in keys}, str(root / name),
                  metadata={"format": "pt"})
        weight_map.update({k: name for k in keys})
    total = sum(math.prod(s) * 2 for s in shapes.values())
    (root / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (root / "config.json").write_text(cfg.to_json())
    return total, max(math.prod(s) * 2 for s in shapes.values())


def bench_native(work: Path, reps: int) -> dict:
    cfg = native_config(layers=8, hidden=4096, ffn=14336, vocab=32768)
    src = work / "native"
    t0 = time.perf_counter()
    total, largest = write_native(src, cfg)
    _sync()
    gen_s = time.perf_counter() - t0
    file_bytes = _du(src)
    cp_s, cp_sync_s, rss = [], [], []
    enable_s: dict[str, list[float]] = {m: [] for m in MODES}
    enable_wall_s: dict[str, list[float]] = {m: [] for m in MODES}
    hashed = {}
    for r in range(reps):
        dst = work / f"native-cp{r}"
        _sync()
        t0 = time.perf_counter()
        subprocess.run(["cp", "-r", str(src), str(dst)], check=True)
        t1 = time.perf_counter()
        _sync()
        t2 = time.perf_counter()
        cp_s.append(t1 - t0)
        cp_sync_s.append(t2 - t0)
        shutil.rmtree(dst)
        for mode in MODES:
            out = work / f"native-on{r}-{mode}"
            _sync()
            rep, wall, peak = _child(ENABLE, str(src), str(out), "copy",
                                     "scan" if "finite" in mode else "skip-finite-scan",
                                     env_extra={"MHC_COPY_MODE": mode.split("+")[0]})
            enable_s[mode].append(rep["seconds"])
            enable_wall_s[mode].append(wall)
            hashed[mode] = rep["hashed_at_commit"]
            rss.append(peak)
            shutil.rmtree(out)
    # what the manifest costs: one sha256 pass over the bytes (page-cache hot)
    t0 = time.perf_counter()
    for p in sorted(src.iterdir()):
        with open(p, "rb") as f:
            hashlib.file_digest(f, "sha256")
    sha_s = time.perf_counter() - t0
    shutil.rmtree(src)
    _, _, base_rss = _child("import torch, mhc_convert")
    return {"bytes": file_bytes, "tensor_bytes": total, "largest": largest, "gen_s": gen_s,
            "cp_s": min(cp_s), "cp_sync_s": min(cp_sync_s),
            "modes": {m: {"enable_s": min(enable_s[m]), "enable_wall_s": min(enable_wall_s[m]),
                          "hashed_at_commit": hashed[m]} for m in MODES},
            "enable_s": min(enable_s["user"]), "enable_wall_s": min(enable_wall_s["user"]),
            "peak_rss": max(rss), "base_rss": base_rss,
            "sha_s": sha_s, "reps": reps}


# --------------------------------------------------------------------------------- torch_dist
def fixture_blobs() -> tuple[dict, dict[str, bytes]]:
    """The fixture's common state and its byte objects (extra_state, rng_state)."""
    from mhc_convert.formats.torch_dist import read_torch_dist

    view = read_torch_dist(FIXTURE)
    blobs = {k: view.load(k) for k, e in view.entries.items()
             if e.kind == "bytes" and k != "common_state/shard_0_1"}
    return view.meta["common_state"], blobs


def _writer_class():
    from torch.distributed.checkpoint import FileSystemWriter

    class MegatronLikeWriter(FileSystemWriter):
        """torch 2.13's FileSystemWriter pickles ``StorageMeta.checkpoint_id`` as a
        ``pathlib.PosixPath``, which mhc-convert's allowlisted unpickler refuses; Megatron's
        writer stores a ``str`` (see the fixture), so store the str as Megatron does."""

        def storage_meta(self):
            meta = super().storage_meta()
            if meta is not None and meta.checkpoint_id is not None:
                meta.checkpoint_id = str(meta.checkpoint_id)
            return meta

    return MegatronLikeWriter


def write_torch_dist(run: Path, layers: int, hidden: int, ffn: int, vocab: int) -> int:
    """A Megatron-like torch_dist run dir written by DCP's FileSystemWriter. Returns data bytes."""
    import torch.distributed.checkpoint as dcp

    _MegatronLikeWriter = _writer_class()
    from mhc_convert.adapters.megatron_args import megatron_config
    from mhc_model.toggle.shapes import expected_model_shapes

    common, blobs = fixture_blobs()
    common = copy.deepcopy(common)
    args = copy.deepcopy(common["args"])
    args.hybrid_layer_pattern = "-" * layers
    args.num_layers = layers
    args.hidden_size = hidden
    args.ffn_hidden_size = ffn
    args.padded_vocab_size = vocab
    args.num_attention_heads = hidden // 128
    args.kv_channels = 128
    common["args"] = args
    cfg = megatron_config(args, run)
    shapes = expected_model_shapes(cfg)
    gen = torch.Generator().manual_seed(0)
    state: dict[str, object] = {k: _random(s, gen) for k, s in shapes.items()}
    # DCP's default planner stores every non-tensor value as torch.save(value) bytes, which is
    # how Megatron's ShardedObjects land on disk: common_state = torch.save([common_dict]).
    # The fixture's own blobs are decoded (trusted, read-only fixture) and handed over the same way.
    def decoded(blob: bytes):
        return torch.load(io.BytesIO(blob), weights_only=False)

    extra = decoded(blobs["decoder.layers.2.mlp.linear_fc1._extra_state/shard_0_1"])
    for i in range(layers):
        state[f"decoder.layers.{i}.mlp.linear_fc1._extra_state/shard_0_1"] = copy.copy(extra)
    state["rng_state/shard_0.0_1.1"] = decoded(blobs["rng_state/shard_0.0_1.1"])
    state["common_state/shard_0_1"] = [common]
    it_dir = run / "iter_0001000"
    it_dir.mkdir(parents=True)
    # flatten_state_dict=False: Megatron's keys are already flat, and the list must stay one item
    dcp.save(state, storage_writer=_MegatronLikeWriter(str(it_dir), thread_count=1),
             planner=dcp.DefaultSavePlanner(flatten_state_dict=False), no_dist=True)
    (it_dir / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist",
                                                      "sharded_backend_version": 1}))
    (run / "latest_checkpointed_iteration.txt").write_text("1000")
    return sum(math.prod(s) * 2 for s in shapes.values())


def bench_torch_dist(work: Path, reps: int) -> list[dict]:
    rows = []
    for hidden, ffn in ((1024, 3584), (4096, 14336)):
        run = work / f"dist-{hidden}"
        t0 = time.perf_counter()
        data = write_torch_dist(run, layers=8, hidden=hidden, ffn=ffn, vocab=32768)
        _sync()
        gen_s = time.perf_counter() - t0
        times, walls, rss, scan_times = [], [], [], []
        for r in range(reps):
            out = work / f"dist-{hidden}-scan{r}"  # default: NaN/Inf scan of the source (reads it)
            _sync()
            rep, _, _ = _child(ENABLE, str(run), str(out), "hardlink", "scan")
            scan_times.append(rep["seconds"])
            shutil.rmtree(out)
            out = work / f"dist-{hidden}-on{r}"
            _sync()
            rep, wall, peak = _child(ENABLE, str(run), str(out), "hardlink", "skip-finite-scan")
            hashed = rep["hashed_at_commit"]
            times.append(rep["seconds"])
            walls.append(wall)
            rss.append(peak)
            if r == 0:
                keys = len(json.loads((out / "mhc-manifest.json").read_text())["files"])
            shutil.rmtree(out)
        shutil.rmtree(run)
        rows.append({"hidden": hidden, "bytes": data, "gen_s": gen_s, "enable_s": min(times),
                     "enable_wall_s": min(walls), "peak_rss": max(rss), "files": keys,
                     "hashed_at_commit": hashed, "enable_scan_s": min(scan_times),
                     "reps": reps})
    return rows


# ------------------------------------------------------------------------------------- report
def cpu_name() -> str:
    with contextlib.suppress(OSError):  # no /proc (not Linux): fall back below
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def report(native: dict, dist: list[dict]) -> str:
    gb = native["bytes"] / 1e9
    ratio = native["cp_sync_s"] / native["enable_s"]
    ratio_nosync = native["cp_s"] / native["enable_s"]
    rss_target = 2 * native["largest"] + 300 * MB
    small, large = dist
    dist_ratio = large["enable_s"] / small["enable_s"]
    scan_ratio = large["enable_scan_s"] / small["enable_scan_s"]
    lines = [
        "# mhc-convert conversion benchmark (CPU box)",
        "",
        f"Machine: {cpu_name()}, {os.cpu_count()} cores, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM, "
        f"local disk; torch {torch.__version__}, Python {platform.python_version()}. "
        f"Generated by `bench/convert.py`; best of {native['reps']} runs; source files hot in "
        "the page cache for both the copy and the conversion (`sync` before each run).",
        "",
        "## Native (safetensors, sharded 1 GiB), full copy",
        "",
        f"Synthetic checkpoint: 8 MLP layers, C = 4096, F = 14336, vocab 32768, bf16, "
        f"{gb:.2f} GB in {native['bytes'] / native['tensor_bytes']:.4f}x tensor bytes; "
        f"largest tensor {native['largest'] / MB:.0f} MB.",
        "",
        "| measurement | value | target |",
        "|---|---|---|",
        f"| `cp -r` | {native['cp_s']:.2f} s ({gb / native['cp_s']:.2f} GB/s) | |",
        f"| `cp -r` + `sync` | {native['cp_sync_s']:.2f} s ({gb / native['cp_sync_s']:.2f} GB/s)"
        " | |",
        f"| `enable` (report.seconds; fsync + manifest incl.) | {native['enable_s']:.2f} s "
        f"({gb / native['enable_s']:.2f} GB/s) | |",
        *[f"| `enable` with `MHC_COPY_MODE={m}` | {r['enable_s']:.2f} s "
          f"({gb / r['enable_s']:.2f} GB/s), ratio to cp -r + sync "
          f"{native['cp_sync_s'] / r['enable_s']:.2f}; bytes hashed at commit "
          f"{r['hashed_at_commit']} | |" for m, r in native["modes"].items()],
        f"| `enable` child wall (incl. interpreter + torch import) | "
        f"{native['enable_wall_s']:.2f} s | |",
        f"| throughput ratio enable / (cp -r + sync) | **{ratio:.2f}** | >= 0.8 "
        f"{'PASS' if ratio >= 0.8 else 'FAIL'} |",
        f"| throughput ratio enable / cp -r (no sync) | {ratio_nosync:.2f} | (info) |",
        f"| one sha256 pass over the source (what the manifest costs) | {native['sha_s']:.2f} s "
        f"({gb / native['sha_s']:.2f} GB/s) | |",
        f"| peak RSS of the conversion child | **{native['peak_rss'] / MB:.0f} MB** | <= "
        f"{rss_target / MB:.0f} MB (2 x {native['largest'] / MB:.0f} + 300) "
        f"{'PASS' if native['peak_rss'] <= rss_target else 'FAIL'} |",
        f"| peak RSS of `import torch, mhc_convert` alone | {native['base_rss'] / MB:.0f} MB |"
        " (baseline) |",
        "",
        "## Megatron torch_dist, `--link hardlink` rename",
        "",
        "Written by torch DCP's FileSystemWriter (one `__0_0.distcp`), 8 MLP layers, vocab 32768, "
        "same keys at both sizes (only C/F differ); common state, `_extra_state` and `rng_state` "
        "byte objects as in the megatron-core 0.19.2 fixture; no optimizer state.",
        "",
        "| data | C | enable, --allow-nonfinite (report.seconds) | child wall | peak RSS "
        "| bytes hashed at commit | enable, default NaN/Inf scan on |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in dist:
        lines.append(f"| {row['bytes'] / 1e9:.2f} GB | {row['hidden']} | {row['enable_s']:.3f} s "
                     f"| {row['enable_wall_s']:.2f} s | {row['peak_rss'] / MB:.0f} MB "
                     f"| {row['hashed_at_commit']} | {row['enable_scan_s']:.3f} s |")
    lines += [
        "",
        f"Size ratio {large['bytes'] / small['bytes']:.1f}x -> time ratio **{dist_ratio:.2f}x** "
        f"(target: independent of size, i.e. ~1x): "
        f"{'PASS' if dist_ratio < 1.5 else 'FAIL'}. With the default NaN/Inf source scan "
        f"(validate.check_finite reads every tensor) the ratio is {scan_ratio:.2f}x.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default="/tmp")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench/results/convert_cpu.md"))
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mhc-bench-convert-", dir=args.workdir))
    try:
        native = bench_native(work, args.reps)
        print(f"native: {json.dumps(native)}", flush=True)
        dist = bench_torch_dist(work, args.reps)
        print(f"torch_dist: {json.dumps(dist)}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = report(native, dist)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
