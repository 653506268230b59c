"""``mhc-convert`` read-only commands: inspect, verify, clean, version (registered on the app of
``cli_app``; ``cli`` imports this module)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from mhc_convert import ui
from mhc_convert.cli_app import (
    Device,
    Dtype,
    IterOpt,
    JsonOpt,
    _command,
    _run,
)
from mhc_convert.errors import VerificationError


# ----------------------------------------------------------------------------- read-only
@_command("mhc-convert inspect ckpt/",
          "mhc-convert inspect ckpt/ --verify --json",
          "mhc-convert inspect run/ --iteration 2000")
def inspect(
    path: Annotated[Path, typer.Argument(metavar="PATH", help="Checkpoint (or run) directory.")],
    *,
    verify: Annotated[bool, typer.Option("--verify", help="Re-hash every file against "
                                         "mhc-manifest.json (exit 6 on mismatch).")] = False,
    iteration: IterOpt = None, as_json: JsonOpt = False,
) -> None:
    """Format, layout, pattern, streams, iteration, optimizer kind, sizes, manifest check."""
    from mhc_convert import inputs

    path = _run(lambda: inputs.existing(path, role="source"), as_json=as_json)
    with ui.Activity(enabled=not as_json) as activity:
        activity.step(f"reading {path}" + (" and re-hashing every file" if verify else ""))
        from mhc_convert import inspection

        report = _run(lambda: inspection.inspect(path, verify=verify, iteration=iteration),
                      as_json=as_json).to_dict()
    if as_json:
        print(json.dumps({"ok": not report["problems"], **report}))
    else:
        shown = {k: v for k, v in report.items() if k not in ("problems", "notes", "path")}
        shown["bytes"] = f"{ui.human_bytes(report['bytes'])} ({report['bytes']:,} bytes)"
        ui.emit(f"{report['path']}\n" + ui.rows(shown.items()))
        for n in report["notes"]:
            ui.emit(f"note: {n}")
        for p in report["problems"]:
            print(f"manifest: {p}", file=sys.stderr)
    if report["problems"]:
        raise typer.Exit(VerificationError.exit_code)


@_command("mhc-convert verify ckpt/ ckpt-mhc/",
          "mhc-convert verify ckpt/ ckpt-mhc/ --device cuda --dtype bf16 "
          "--json")
def verify(
    a: Annotated[Path, typer.Argument(metavar="A", help="Reference (source) checkpoint.")],
    b: Annotated[Path, typer.Argument(metavar="B", help="Converted checkpoint.")],
    *,
    device: Annotated[Device, typer.Option(help="Where to run the models.")] = Device.cpu,
    dtype: Annotated[Dtype, typer.Option(help="Precision both models run in.")] = Dtype.fp32,
    batch: Annotated[int, typer.Option(min=1, help="Batch size.")] = 2,
    seq: Annotated[int, typer.Option(min=1, help="Sequence length.")] = 64,
    seed: Annotated[int, typer.Option(help="Token seed.")] = 0,
    as_json: JsonOpt = False,
) -> None:
    """Run the same tokens through A and B in the same precision; report max/mean-abs logit
    difference, KL(A||B) and top-1 agreement, beside the source's own bf16-vs-fp32 noise floor
    (A in fp32 against A in bf16). fp32 passes at max-abs <= 1e-4 and full top-1 agreement;
    bf16 passes when B is within 2x that noise floor (4x for KL). Fails with exit 6."""
    from mhc_convert import inputs

    a, b = _run(lambda: (inputs.existing(a, role="source"), inputs.existing(b, role="source")),
                  as_json=as_json)
    with ui.Activity(enabled=not as_json) as activity:
        activity.step("loading torch")
        from mhc_convert.parity import compare_checkpoints

        res = _run(lambda: compare_checkpoints(a, b, device=device.value, dtype=dtype.value,
                                               batch=batch, seq=seq, seed=seed,
                                               status=activity.step), as_json=as_json)
    ok, limits = res["ok"], res["thresholds"]
    if as_json:
        print(json.dumps(res))
    else:
        ui.emit(_verify_table(a, b, res))
    if not ok:
        failed = ", ".join(f"{_METRIC[k]} {res[k]:.3g} (limit {v:.3g})"
                           for k, v in limits.items()
                           if (res[k] < v if k == "top1_agreement" else res[k] > v))
        if not as_json:
            print(f"mhc-convert: error: verification failed: {failed}", file=sys.stderr)
        raise typer.Exit(VerificationError.exit_code)


_METRIC = {"max_abs": "max-abs", "mean_abs": "mean-abs", "kl": "KL(A||B)",
           "top1_agreement": "top-1 agreement"}


def _verify_table(a: Path, b: Path, res: dict[str, Any]) -> str:
    dt, limits, floor = res["dtype"], res["thresholds"], res["noise_floor"] or {}
    names = _METRIC
    head = [f"B vs A ({dt})", "noise floor (A fp32 vs bf16)", "limit"]
    lines = [("", *head)]
    for k, label in names.items():
        lim = limits.get(k)
        val = (lambda x: f"{x:.4f}") if k == "top1_agreement" else (lambda x: f"{x:.3g}")
        lines.append((label, val(res[k]), val(floor[k]) if k in floor else "-",
                      "-" if lim is None else (f">= {lim:.4g}" if k == "top1_agreement"
                                               else f"<= {lim:.3g}")))
    widths = [max(len(row[i]) for row in lines) for i in range(4)]
    table = "\n".join("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()
                      for row in lines)
    if dt == "fp32":
        rule = "fp32: max-abs <= 1e-4 and every top-1 token the same"
    else:
        rule = ("bf16: B may differ from A by 2x the source's own bf16 noise floor, 4x in KL; "
                "top-1 is reported, not gated")
    verdict = "PASS" if res["ok"] else "FAIL"
    return (f"verify {a} vs {b} ({dt}, {res['device']}, {res['batch']}x{res['seq']} tokens, "
            f"seed {res['seed']}, {res['seconds']:.1f} s)\n{table}\n{verdict} ({rule})")


@_command("mhc-convert clean /checkpoints/")
def clean(parent: Annotated[Path, typer.Argument(metavar="DIR", help="Directory holding "
                                                 "outputs.")],
          *, as_json: JsonOpt = False) -> None:
    """Remove stale temporary directories left by killed conversions (only ones carrying our
    marker whose process is gone)."""
    from mhc_convert import inputs

    parent = _run(lambda: inputs.existing_dir(parent, role="directory"), as_json=as_json)
    from mhc_convert.commit import clean_stale

    removed = _run(lambda: clean_stale(parent), as_json=as_json)
    if as_json:
        print(json.dumps({"ok": True, "removed": [str(p) for p in removed]}))
    else:
        for p in removed:
            ui.emit(f"removed {p}")
        ui.emit(f"{len(removed)} stale temporary director{'y' if len(removed) == 1 else 'ies'}"
                " removed")


@_command("mhc-convert version", "mhc-convert version --json")
def version(as_json: JsonOpt = False) -> None:
    """Print the versions of mhc-convert and of the libraries it runs on."""
    import platform
    from importlib import metadata

    from mhc_model.version import DISTRIBUTION, __version__

    libs = {}
    for name in ("torch", "safetensors", "typer", "rich", "numpy"):
        try:
            libs[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            libs[name] = None
    if as_json:
        print(json.dumps({"ok": True, "mhc-convert": __version__, "distribution": DISTRIBUTION,
                          "python": platform.python_version(), **libs}))
        return
    ui.emit(f"mhc-convert {__version__} ({DISTRIBUTION})\n"
            + ui.rows([("python", platform.python_version()), *libs.items()]))


