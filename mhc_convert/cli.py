"""``mhc-convert``: a thin CLI over ``mhc_convert.engine``. One place maps the exception
hierarchy to exit codes (DESIGN.md §6): 0 ok, 2 usage/aliasing, 3 invalid input, 4 already in
layout, 5 I/O, 6 verification failed, 130 interrupted."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from mhc_convert.errors import ConvertError, Interrupted

app = typer.Typer(
    add_completion=False, no_args_is_help=True, rich_markup_mode=None,
    help="Move hybrid-model checkpoints between the mHC-off and mHC-on layouts, exactly.\n\n"
         "Formats: native (config.json + safetensors), Megatron torch_dist, Megatron legacy .pt.",
)
err = Console(stderr=True)
out = Console()

JsonOpt = Annotated[bool, typer.Option("--json", help="Print a machine-readable JSON report.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or table.")]
DryOpt = Annotated[bool, typer.Option("--dry-run", help="Print the plan; write nothing.")]
OverOpt = Annotated[bool, typer.Option("--overwrite", help="Replace an existing DST (atomically).")]
PassOpt = Annotated[str | None, typer.Option("--passthrough", metavar="REGEX",
                                             help="Carry keys matching REGEX unchanged.")]
DropOptOpt = Annotated[bool, typer.Option(
    "--drop-optimizer", help="Leave optimizer state out of the output (resume with "
    "--no-load-optim); needed when it cannot be carried (e.g. dp_reshardable).")]
NonfiniteOpt = Annotated[bool, typer.Option(
    "--allow-nonfinite", help="Convert even if a tensor holds NaN/Inf (carried bit-exactly); "
    "by default such a checkpoint is refused (exit 3).")]
LinkOpt = Annotated[str, typer.Option(
    "--link", help="torch_dist data files: copy|hardlink|reflink.")]


def _run(fn: Callable[[], Any], *, as_json: bool) -> Any:
    """Call fn; map our exceptions to exit codes with a one-line message."""
    try:
        return fn()
    except KeyboardInterrupt:
        exc: ConvertError = Interrupted("interrupted; temporary output removed")
    except ConvertError as e:
        exc = e
    if as_json:
        print(json.dumps({"ok": False, "error": type(exc).__name__, "exit_code": exc.exit_code,
                          "message": exc.one_line(), "path": exc.path, "key": exc.key}))
    else:
        err.print(f"mhc-convert: error: {exc.one_line()}", markup=False, highlight=False,
                  soft_wrap=True)
    raise typer.Exit(exc.exit_code)


def _progress(quiet: bool, as_json: bool):
    if quiet or as_json or not sys.stderr.isatty():
        return None, None
    bar = Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                   TransferSpeedColumn(), TimeRemainingColumn(), console=err, transient=True)

    def factory(total: int):
        task = bar.add_task("converting", total=total)
        return lambda n: bar.advance(task, n)

    return bar, factory


def _summary(report: dict[str, Any]) -> None:
    table = Table(title=f"mhc-convert {report['command']}" + (" (dry run)" if report["dry_run"]
                                                              else ""))
    table.add_column("item")
    table.add_column("value")
    for k in ("source", "output", "format"):
        table.add_row(k, str(report[k]))
    for k, v in report["plan"].items():
        table.add_row(f"keys {k}", str(v))
    if not report["dry_run"]:
        table.add_row("bytes", f"{report['bytes_total']:,}")
        table.add_row("seconds", f"{report['seconds']:.2f}")
    if report.get("parity"):
        p = report["parity"]
        table.add_row("parity max-abs", f"{p['max_abs']:.3e}")
        table.add_row("parity top-1", f"{p['top1_agreement']:.4f}")
    out.print(table)
    for note in report["notes"]:
        out.print(f"note: {note}", markup=False, highlight=False, soft_wrap=True)


def _convert(fn: Callable[..., Any], kwargs: dict[str, Any], *, as_json: bool, quiet: bool,
             dry_run: bool, ctx: typer.Context) -> None:
    from mhc_convert import distributed
    from mhc_convert.hooks import NO_HOOKS, Hooks

    # the hooks ``main`` read (tests: ``CliRunner().invoke(app, obj=Hooks(...))``), else none
    hooks = ctx.obj if isinstance(ctx.obj, Hooks) else NO_HOOKS
    main = not distributed.launched_rank(hooks)  # under torchrun only rank 0 prints (errors: all)
    bar, factory = _progress(quiet or not main, as_json)

    def call():
        with distributed.session(hooks):
            if bar is None:
                return fn(progress=factory, hooks=hooks, **kwargs)
            with bar:
                return fn(progress=factory, hooks=hooks, **kwargs)

    report = _run(call, as_json=as_json and main).to_dict()
    if not main:
        return
    if as_json:
        print(json.dumps({"ok": True, **report}, default=str))
        return
    if dry_run:
        for row in report["plan_detail"] or []:
            out.print(" ".join(f"{k}={v}" for k, v in row.items()), markup=False, highlight=False,
                      soft_wrap=True)
    if not quiet:
        _summary(report)


@app.command(epilog="Examples:\n\n  mhc-convert enable ckpt/ ckpt-mhc/\n\n"
                    "  mhc-convert enable run/ run-mhc/ --streams 4 --contract learned\n\n"
                    "  mhc-convert enable run/ run-mhc/ --dry-run --json")
def enable(
    ctx: typer.Context,
    src: Annotated[Path, typer.Argument(help="mHC-off checkpoint (directory).")],
    dst: Annotated[Path, typer.Argument(help="Output directory (must not exist).")],
    streams: Annotated[int, typer.Option("--streams", "-n", help="Residual streams n.")] = 4,
    convention: Annotated[str, typer.Option(help="deepseek | megatron_dsv4")] = "deepseek",
    contract: Annotated[str, typer.Option(help="Output contract: mean | learned")] = "mean",
    init: Annotated[str, typer.Option(help="exact (function-preserving) | megatron")] = "exact",
    dry_run: DryOpt = False, as_json: JsonOpt = False, quiet: QuietOpt = False,
    overwrite: OverOpt = False, passthrough: PassOpt = None, link: LinkOpt = "copy",
    drop_optimizer: DropOptOpt = False, allow_nonfinite: NonfiniteOpt = False,
) -> None:
    """Wrap every layer (inner_layer.*) and add hyper-connection parameters at the exact
    enable point: the converted model computes what the source computes."""
    from mhc_convert import engine

    _check_choice("convention", convention, ("deepseek", "megatron_dsv4"))
    _check_choice("contract", contract, ("mean", "learned"))
    _check_choice("init", init, ("exact", "megatron"))
    _check_choice("link", link, ("copy", "hardlink", "reflink"))
    _convert(engine.enable, dict(src=src, dst=dst, streams=streams, convention=convention,
                                 contract=contract, init=init, dry_run=dry_run,
                                 overwrite=overwrite, passthrough=passthrough, link=link,
                                 drop_optimizer=drop_optimizer, allow_nonfinite=allow_nonfinite),
             as_json=as_json, quiet=quiet, dry_run=dry_run, ctx=ctx)


@app.command(epilog="Examples:\n\n  mhc-convert disable ckpt-mhc/ ckpt/\n\n"
                    "  mhc-convert disable ckpt-mhc/ ckpt/ --allow-lossy --json")
def disable(
    ctx: typer.Context,
    src: Annotated[Path, typer.Argument(help="mHC-on checkpoint (directory).")],
    dst: Annotated[Path, typer.Argument(help="Output directory (must not exist).")],
    allow_lossy: Annotated[bool, typer.Option("--allow-lossy", help="Drop the hyper-connections "
                                              "even when that changes the function; the measured "
                                              "parity loss is reported.")] = False,
    dry_run: DryOpt = False, as_json: JsonOpt = False, quiet: QuietOpt = False,
    overwrite: OverOpt = False, passthrough: PassOpt = None, link: LinkOpt = "copy",
    drop_optimizer: DropOptOpt = False, allow_nonfinite: NonfiniteOpt = False,
) -> None:
    """Unwrap every layer and drop the hyper-connection parameters; exact only when the
    streams provably stay identical (otherwise exit 6)."""
    from mhc_convert import engine

    _check_choice("link", link, ("copy", "hardlink", "reflink"))
    _convert(engine.disable, dict(src=src, dst=dst, allow_lossy=allow_lossy, dry_run=dry_run,
                                  overwrite=overwrite, passthrough=passthrough, link=link,
                                  drop_optimizer=drop_optimizer, allow_nonfinite=allow_nonfinite),
             as_json=as_json, quiet=quiet, dry_run=dry_run, ctx=ctx)


@app.command(epilog="Examples:\n\n  mhc-convert inspect ckpt/\n\n  mhc-convert inspect ckpt/ "
                    "--verify --json")
def inspect(
    path: Annotated[Path, typer.Argument(help="Checkpoint directory.")],
    verify: Annotated[bool, typer.Option("--verify", help="Re-hash every file against "
                                         "mhc-manifest.json (exit 6 on mismatch).")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Format, layout, pattern, streams, iteration, optimizer kind, sizes, manifest check."""
    from mhc_convert import engine
    from mhc_convert.errors import VerificationError

    report = _run(lambda: engine.inspect(path, verify=verify), as_json=as_json).to_dict()
    if as_json:
        print(json.dumps({"ok": not report["problems"], **report}))
    else:
        table = Table(title=f"mhc-convert inspect {path}")
        table.add_column("field")
        table.add_column("value")
        for k, v in report.items():
            if k != "problems":
                table.add_row(k, f"{v:,}" if isinstance(v, int) and k == "bytes" else str(v))
        out.print(table)
        for p in report["problems"]:
            err.print(f"manifest: {p}", markup=False, soft_wrap=True)
    if report["problems"]:
        raise typer.Exit(VerificationError.exit_code)


@app.command(epilog="Examples:\n\n  mhc-convert verify ckpt/ ckpt-mhc/\n\n"
                    "  mhc-convert verify ckpt/ ckpt-mhc/ --device cuda --dtype bf16 --json")
def verify(
    a: Annotated[Path, typer.Argument(help="Reference checkpoint.")],
    b: Annotated[Path, typer.Argument(help="Converted checkpoint.")],
    device: Annotated[str, typer.Option(help="cpu | cuda")] = "cpu",
    dtype: Annotated[str, typer.Option(help="fp32 | bf16")] = "fp32",
    batch: Annotated[int, typer.Option(help="Batch size.")] = 2,
    seq: Annotated[int, typer.Option(help="Sequence length.")] = 64,
    seed: Annotated[int, typer.Option(help="Token seed.")] = 0,
    as_json: JsonOpt = False,
) -> None:
    """Run the same tokens through both models; report max/mean-abs logit difference, KL(A||B),
    top-1 agreement. Fails (exit 6) above the threshold for the dtype."""
    from mhc_convert.errors import VerificationError
    from mhc_convert.parity import compare_checkpoints

    _check_choice("device", device, ("cpu", "cuda"))
    _check_choice("dtype", dtype, ("fp32", "bf16"))
    res = _run(lambda: compare_checkpoints(a, b, device=device, dtype=dtype, batch=batch,
                                           seq=seq, seed=seed), as_json=as_json)
    limits = {"fp32": {"max_abs": 1e-4, "top1_agreement": 1.0},
              "bf16": {"max_abs": float("inf"), "top1_agreement": 0.999}}[dtype]
    ok = res["max_abs"] <= limits["max_abs"] and res["top1_agreement"] >= limits["top1_agreement"]
    if as_json:
        print(json.dumps({"ok": ok, "thresholds": limits, **res}))
    else:
        table = Table(title=f"mhc-convert verify ({device}, {dtype})")
        table.add_column("metric")
        table.add_column("value")
        for k in ("max_abs", "mean_abs", "kl", "top1_agreement", "seconds"):
            table.add_row(k, f"{res[k]:.4g}")
        out.print(table)
        out.print("PASS" if ok else f"FAIL (thresholds {limits})")
    if not ok:
        raise typer.Exit(VerificationError.exit_code)


@app.command(epilog="Example:\n\n  mhc-convert clean /checkpoints/")
def clean(parent: Annotated[Path, typer.Argument(help="Directory holding outputs.")],
          as_json: JsonOpt = False) -> None:
    """Remove stale temporary directories left by killed conversions (only ones carrying our
    marker whose process is gone)."""
    from mhc_convert.commit import clean_stale

    removed = _run(lambda: clean_stale(parent), as_json=as_json)
    if as_json:
        print(json.dumps({"ok": True, "removed": [str(p) for p in removed]}))
    else:
        for p in removed:
            out.print(f"removed {p}", markup=False, soft_wrap=True)
        out.print(f"{len(removed)} stale temporary director{'y' if len(removed) == 1 else 'ies'}"
                  " removed")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        err.print(f"mhc-convert: error: --{name} must be one of {', '.join(choices)}; "
                  f"got {value!r}", markup=False)
        raise typer.Exit(2)


def main() -> None:
    """The process entry (``mhc-convert``, ``python -m mhc_convert``, ``torchrun -m
    mhc_convert``): the only place the test/fault hooks are read from the environment."""
    import os

    from mhc_convert.hooks import Hooks

    app(obj=Hooks.from_env(os.environ))
