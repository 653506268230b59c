"""The copy modes (``Hooks.copy_mode``: ``user`` pread/write, ``kernel`` copy_file_range,
``direct`` O_DIRECT staging buffers)
for an in-process native enable, against ``cp -r`` + ``sync`` of the same source in the same run;
used to choose the default. Not a test.

    PYTHONPATH=. python bench/copy_modes.py [LAYERS]   # 16 layers: 4.3 GB, 4 layers: 1.5 GB
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import convert as B  # noqa: E402  (bench/convert.py: the synthetic checkpoint and cp timing)

from mhc_convert import engine  # noqa: E402
from mhc_convert.hooks import Hooks  # noqa: E402

MODES = {"user": Hooks(copy_mode="user"), "kernel": Hooks(copy_mode="kernel"),
         "direct": Hooks(copy_mode="direct")}


def main() -> None:
    layers = int(sys.argv[1]) if len(sys.argv) > 1 else 16
    work = Path("/tmp/mhc_copy_modes")
    shutil.rmtree(work, ignore_errors=True)
    src = work / "src"
    B.write_native(src, layers, 1)
    B._sync()
    print(f"native, single file, {B._du(src) / 1e9:.2f} GB, page cache hot", flush=True)
    for rep in range(3):
        base = B.cp_sync(src, work / "cp")
        for mode, hooks in MODES.items():
            dst = work / f"on_{mode}"
            B._sync()
            t0 = time.perf_counter()
            engine.enable(src, dst, hooks=hooks)
            took = time.perf_counter() - t0
            shutil.rmtree(dst)
            print(f"rep {rep}: cp -r + sync {base:.2f} s, enable [{mode}] {took:.2f} s, "
                  f"ratio {base / took:.2f}", flush=True)
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
