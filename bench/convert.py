"""Benchmark ``mhc-convert`` as an I/O job (DESIGN.md §7: "a full copy runs at disk speed; a DCP
rename is O(metadata)"; issue 11 item 5). Not a test.

For two data sizes (~1 GB and >= 4 GB: MLP-only hybrids, C = 4096, F = 14336, vocab 32768, bf16,
random finite bits; the model is never built) and four layouts (native single-file, native
sharded into 4 files, Megatron torch_dist written by torch DCP's own ``FileSystemWriter``
copied, and the same with ``--link hardlink``) the real CLI (``python -m mhc_convert enable``,
then ``disable`` of its output, both ``--json``, NaN/Inf check on as by default) is timed against
``cp -r`` + ``sync`` of the same source directory in the same run (enable fsyncs, so ``sync`` is
inside the baseline). Ratio = baseline time / conversion time (throughput ratio; target >= 0.8
for native). Two times per conversion: ``report.seconds`` (the conversion proper: open, plan,
check, write, fsync, manifest, rename) and the child's wall (plus interpreter start and
``import torch``). Peak RSS is ``ru_maxrss`` of exactly that child (``os.wait4`` in a tiny
launcher, so this multi-GB process's high-water mark is not inherited); target <= 2 x largest
tensor + 300 MB. Sources are page-cache hot (written just before; ``sync`` before every run);
one cold row (``posix_fadvise(DONTNEED)`` on every source file after ``sync``) shows the disk.

    PYTHONPATH=. python bench/convert.py [--workdir DIR] [--reps N] [--out FILE]

Everything is written under a temp dir in --workdir (default /tmp; hardlinks need the same
filesystem) and removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from convert_sources import write_native, write_torch_dist  # noqa: E402  (bench/copy_modes.py)

ROOT = Path(__file__).resolve().parents[1]
SIZES = {"1 GB": 2, "4 GB": 16}  # MLP layers: 1.01 GB and 4.29 GB of tensor bytes
MB = 1e6


# ------------------------------------------------------------------------------------ helpers
def _sync() -> None:
    subprocess.run(["sync"], check=True)


def _files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file())


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in _files(path))


def _evict(path: Path) -> None:
    """Drop ``path``'s clean pages from the page cache (after a sync: every page is clean)."""
    _sync()
    for p in _files(path):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# Linux carries a process's RSS high-water mark across fork+exec, so a child forked straight
# from this multi-GB process would report our RSS, not its own. A stdlib-only launcher in
# between starts the measured child from a ~10 MB process and reads its rusage with wait4.
_LAUNCHER = ("import json, os, subprocess, sys, time\n"
             "t = time.perf_counter()\n"
             "p = subprocess.Popen(sys.argv[1:], stdout=subprocess.PIPE)\n"
             "out = p.stdout.read()\n"
             "_, st, ru = os.wait4(p.pid, 0)\n"
             "print(json.dumps({'rc': os.waitstatus_to_exitcode(st), 'maxrss': ru.ru_maxrss,"
             " 'wall': time.perf_counter() - t, 'out': out.decode()}))")


def _child(*argv: str, env_extra: dict | None = None) -> tuple[dict, float, int]:
    """Run ``python argv...``; returns (its JSON stdout or {}, wall s, peak RSS bytes)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore",
           **(env_extra or {})}
    proc = subprocess.run([sys.executable, "-c", _LAUNCHER, sys.executable, *argv],
                          capture_output=True, text=True, env=env, check=True)
    res = json.loads(proc.stdout)
    if res["rc"] != 0:
        raise RuntimeError(f"child failed ({res['rc']}): {argv}\n{proc.stderr}\n{res['out']}")
    out = res["out"]
    return (json.loads(out) if out.strip().startswith("{") else {}), res["wall"], \
        res["maxrss"] * 1024


def _warm(path: Path) -> None:
    """Read ``path`` once so it is in the page cache, then ``sync``. This VM runs DAMON
    ``pageout`` on pages idle for ~60 s (kdamond; /sys/kernel/mm/damon), so a source written
    minutes ago is partly cold again; both sides of every comparison start from this."""
    buf = bytearray(16 << 20)
    for p in _files(path):
        with open(p, "rb", buffering=0) as f:
            got = 0
            while n := f.readinto(buf):
                got += n
        if got != p.stat().st_size:
            raise RuntimeError(f"{p}: read {got} of {p.stat().st_size} bytes while warming")
    _sync()


def _rm(path: Path) -> None:
    """Remove an output and let the filesystem settle: ext4 here is mounted ``discard``, and
    the TRIM of a freed multi-GB file slows the next run's writes if it is still in flight."""
    shutil.rmtree(path)
    _sync()
    time.sleep(1)


def cli(command: str, src: Path, dst: Path, link: str, env: dict | None = None,
        warm: bool = True) -> dict:
    if warm:
        _warm(src)
    rep, wall, rss = _child("-m", "mhc_convert", command, str(src), str(dst), "--json",
                            "--link", link, env_extra=env)
    return {"s": rep["seconds"], "wall": wall, "rss": rss, "notes": rep.get("notes", [])}


def cp_sync(src: Path, dst: Path, warm: bool = True) -> float:
    if warm:
        _warm(src)
    t0 = time.perf_counter()
    subprocess.run(["cp", "-r", str(src), str(dst)], check=True)
    _sync()
    t = time.perf_counter() - t0
    _rm(dst)
    return t


# -------------------------------------------------------------------------------- measuring
def _load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def measure(work: Path, src: Path, link: str, reps: int, extra: dict[str, dict]) -> dict:
    """``reps`` interleaved rounds of cp -r + sync, enable, cp -r + sync of enable's output,
    disable (of that output) and the ``extra`` enables (other modes, info rows); every run of
    a round is compared with that round's cp (table: medians and ranges)."""
    on, off, cp = work / "on", work / "off", work / "cp"
    runs: dict[str, list[dict]] = {}
    load = _load()
    for _ in range(reps):
        runs.setdefault("cp", []).append({"s": cp_sync(src, cp)})
        runs.setdefault("enable", []).append(cli("enable", src, on, link))
        runs.setdefault("cp_on", []).append({"s": cp_sync(on, cp)})
        runs.setdefault("disable", []).append(cli("disable", on, off, link))
        _rm(on)
        _rm(off)
        for name, env in extra.items():
            runs.setdefault(name, []).append(cli("enable", src, on, link, env))
            _rm(on)
    return {"bytes": _du(src), "runs": runs, "load": (load, _load())}


def measure_cold(work: Path, src: Path, reps: int) -> dict:
    cp, on = work / "cp", work / "on"
    runs: dict[str, list[dict]] = {"cp": [], "enable": []}
    load = _load()
    for _ in range(reps):
        _evict(src)
        runs["cp"].append({"s": cp_sync(src, cp, warm=False)})
        _evict(src)
        runs["enable"].append(cli("enable", src, on, "copy", warm=False))
        _rm(on)
    return {"bytes": _du(src), "runs": runs, "load": (load, _load())}


# Where the in-process time of one enable goes: cProfile of the main thread, one file at a time
# so that the copy runs on it (the sha256 and O_DIRECT write threads run beside it: the main
# thread's waits for them are the queue gets and lock acquires).
_PROFILE = ("import cProfile, json, pstats, sys, time\n"
            "t = time.perf_counter(); import mhc_convert.engine as e\n"
            "imp = time.perf_counter() - t\n"
            "from mhc_convert.hooks import Hooks\n"
            "pr = cProfile.Profile(); pr.enable()\n"
            "r = e.enable(sys.argv[1], sys.argv[2], hooks=Hooks(file_writers=1))\n"
            "pr.disable(); tot = {}\n"
            "for (f, _, name), v in pstats.Stats(pr).stats.items():\n"
            "    k = f'{f.rsplit(\"/\", 1)[-1]}:{name}'\n"
            "    tot[k] = tot.get(k, 0) + (v[3] if name == 'feed' else v[2])\n"
            "print(json.dumps({'import': imp, 'seconds': r.seconds, 'split': tot}))")
_SPLIT = {"pread(2) into the staging buffer (direct copy, the default)":
          "~:<built-in method posix.preadv>",
          "NaN/Inf bit test (validate.RangeScan.feed, in the copy thread)": "validate.py:feed",
          "waiting for a free staging buffer (sha256 and O_DIRECT write threads)":
          "~:<method 'get' of '_queue.SimpleQueue' objects>",
          "waiting for the last buffers at the end of a file":
          "~:<method 'acquire' of '_thread.lock' objects>",
          "fsync(2)": "~:<built-in method posix.fsync>",
          "copy_file_range(2) (kernel copy; not used by direct)":
          "~:<built-in method posix.copy_file_range>",
          "write(2) into the page cache (user copy)":
          "~:<built-in method posix.write>"}


def profile(work: Path, src: Path) -> dict:
    _warm(src)
    res, _, _ = _child("-c", _PROFILE, str(src), str(work / "prof"))
    _rm(work / "prof")
    split = {label: sum(v for k, v in res["split"].items() if k == key)
             for label, key in _SPLIT.items()}
    return {"import": res["import"], "seconds": res["seconds"], "split": split,
            "bytes": _du(src)}


def startup() -> dict:
    helps = [_child("-m", "mhc_convert", "--help")[1] for _ in range(5)]
    imports = [_child("-c", "import mhc_convert.engine")[1] for _ in range(3)]
    return {"help": min(helps), "import_engine": min(imports)}


def run_all(work: Path, reps: int) -> dict:
    rows = []
    for size, layers in SIZES.items():
        for shards in (1, 4):
            src = work / f"native-{shards}"
            largest = write_native(src, layers, shards)
            extra = {"enable, MHC_COPY_MODE=kernel": {"MHC_COPY_MODE": "kernel"}}
            if shards == 4:
                extra |= {"enable, MHC_FINITE_SCAN=reference (two passes)":
                          {"MHC_FINITE_SCAN": "reference"},
                          "enable, MHC_COPY_MODE=user": {"MHC_COPY_MODE": "user"}}
            res = measure(work, src, "copy", reps, extra)
            rows.append({"layout": "native, single file" if shards == 1 else
                         "native, 4 shards", "size": size, "largest": largest, **res})
            if shards == 4 and size == list(SIZES)[-1]:
                cold = {"layout": "native, 4 shards (cold cache)", "size": size,
                        "largest": largest, **measure_cold(work, src, reps)}
                prof = profile(work, src)
            shutil.rmtree(src)
            print(json.dumps(rows[-1], default=str), flush=True)
        run = work / "dist"
        largest = write_torch_dist(run, layers)
        for link in ("copy", "hardlink"):
            rows.append({"layout": f"torch_dist, --link {link}", "size": size,
                         "largest": largest, **measure(work, run, link, reps, {})})
            print(json.dumps(rows[-1], default=str), flush=True)
        shutil.rmtree(run)
    return {"rows": rows, "cold": cold, "profile": prof, "startup": startup()}


# ------------------------------------------------------------------------------------- report
def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def _fs(path: Path) -> str:
    out = subprocess.run(["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True)
    return out.stdout.strip() or "?"


def _span(xs: list[float]) -> str:
    return f"{min(xs):.2f}-{max(xs):.2f}"


def _line(row: dict, name: str, base: str) -> str:
    """Medians over the rounds; the ratio is the median of each round's base / conversion
    (the runs of one round are adjacent in time), with its range."""
    gb, runs, bases = row["bytes"] / 1e9, row["runs"][name], row["runs"][base]
    target = 2 * row["largest"] + 300 * MB
    s = [r["s"] for r in runs]
    b = [r["s"] for r in bases]
    ratios = [x / y for x, y in zip(b, s)]
    ratio, ratio_wall = median(ratios), median(x / r["wall"] for x, r in zip(b, runs))
    rss = max(r["rss"] for r in runs)
    native = row["layout"].startswith("native")
    verdict = ("PASS" if ratio >= 0.8 else "FAIL") if native else "(info)"
    return (f"| {row['layout']} | {row['size']} ({gb:.2f}) | {name} | {median(b):.2f} s "
            f"({gb / median(b):.2f} GB/s; {_span(b)}) | {median(s):.2f} s "
            f"({gb / median(s):.2f} GB/s; {_span(s)}) | **{ratio:.2f}** ({_span(ratios)}) "
            f"{verdict} | {median(r['wall'] for r in runs):.2f} s | {ratio_wall:.2f} | "
            f"{rss / MB:.0f} MB | {target / MB:.0f} MB {'PASS' if rss <= target else 'FAIL'} |")


def report(res: dict, reps: int, work: Path, load: tuple[str, str]) -> str:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    lines = [
        "# mhc-convert conversion benchmark (CPU box)", "",
        f"Machine: {platform.node()}: {_cpu()}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, "
        f"{_fs(work)} on a local virtual disk (kernel {platform.release()}); torch "
        f"{torch.__version__}, Python {platform.python_version()}. Generated by "
        f"`bench/convert.py`: {reps} interleaved rounds per layout (cp, enable, cp of its "
        "output, disable, the info rows), medians with the range over the rounds. Page "
        "cache: **hot** (every source is read once and `sync`ed right before each timed run: "
        "this VM's DAMON pageout evicts pages idle for ~60 s; each output is removed, "
        "`sync`ed and left 1 s for ext4's online discard before the next run) except the "
        f"cold rows. Load average {load[0]} before, {load[1]} after the run; per layout "
        "below the table.",
        "",
        "Baseline = `cp -r SRC` + `sync` of the directory being converted (disable: enable's "
        "output), in the same run. Ratio = baseline time / conversion time (throughput "
        "ratio). *in-process* is the report's `seconds` (open, plan, NaN/Inf check, copy + "
        "sha256, fsync, manifest, rename); *CLI wall* adds interpreter start and `import "
        "torch`. Peak RSS: the CLI child's `ru_maxrss`; target 2 x largest tensor + 300 MB.",
        "",
        "| layout | size (GB) | command | cp -r + sync | in-process | ratio (target >= 0.8, "
        "native) | CLI wall | ratio (wall) | peak RSS | RSS target |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in res["rows"]:
        lines.append(_line(row, "enable", "cp"))
        lines.append(_line(row, "disable", "cp_on"))
        lines += [_line(row, k, "cp") for k in row["runs"] if k.startswith("enable, ")]
    cold = res["cold"]
    lines.append(_line(cold, "enable", "cp"))
    lines += ["", "Load average (1, 5, 15 min) before / after each layout: " + "; ".join(
        f"{r['layout']} {r['size']}: {r['load'][0]} / {r['load'][1]}"
        for r in [*res["rows"], cold]) + "."]
    for row in res["rows"]:  # what --link reported
        if "hardlink" in row["layout"]:
            lines += ["", f"`{row['layout']}` ({row['size']}) enable note: "
                      + "; ".join(n for n in row["runs"]["enable"][0]["notes"]
                                  if "--link" in n)]
    prof = res["profile"]
    lines += ["", f"Where the time goes: one in-process `enable` (direct copy, one file at a "
              f"time: `file_writers=1`) of native 4 shards "
              f"({prof['bytes'] / 1e9:.2f} GB, hot), cProfile of the main thread: "
              f"{prof['seconds']:.2f} s in all (`import torch` + engine before it: "
              f"{prof['import']:.2f} s).", "", "| main thread | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in prof["split"].items()]
    st = res["startup"]
    lines += ["", f"Start-up: `python -m mhc_convert --help` {st['help']:.2f} s (best of 5); "
              f"`import mhc_convert.engine` (torch) {st['import_engine']:.2f} s (best of 3).",
              ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default="/tmp")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "bench/results/convert_cpu.md"))
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mhc-bench-convert-", dir=args.workdir))
    before = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    try:
        res = run_all(work, args.reps)
        after = " ".join(Path("/proc/loadavg").read_text().split()[:3])
        text = report(res, args.reps, work, (before, after))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
