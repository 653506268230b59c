"""``mhc-convert``: a thin CLI over ``mhc_convert.engine`` and ``mhc_convert.parity``.

One error path: every failure is an error of the one hierarchy (``mhc_convert.errors``),
printed as one line naming the file and key, and exits with the code the class carries (the
table in ``mhc-convert -h``). Typer's own usage errors get the same one-line form (``_Group``).
Inputs are checked before any work (``mhc_convert.inputs``). Start-up imports neither torch nor
rich: ``--help``, ``--version`` and ``version`` return at once, and the engine (torch) is
imported only by the commands that use it.
"""

from __future__ import annotations

import contextlib
import enum
import json
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperCommand, TyperGroup

from mhc_convert import ui
from mhc_convert.errors import (
    AlreadyInLayoutError,
    ConvertError,
    Interrupted,
    InvalidInputError,
    IOFailure,
    UsageError,
    VerificationError,
)
from mhc_convert.hooks import NO_HOOKS, Hooks
from mhc_model.config import CONTRACTS
from mhc_model.conventions import CONVENTIONS
from mhc_model.targets import TARGETS

# Choices come from the tables that define them (import-light: no torch)
Convention = enum.StrEnum("Convention", {n: n for n in CONVENTIONS})
Contract = enum.StrEnum("Contract", {n: n for n in CONTRACTS})
Target = enum.StrEnum("Target", {n: n for n in TARGETS})


class Init(enum.StrEnum):
    exact = "exact"
    megatron = "megatron"


class Link(enum.StrEnum):
    copy = "copy"
    hardlink = "hardlink"
    reflink = "reflink"


class Device(enum.StrEnum):
    cpu = "cpu"
    cuda = "cuda"


class Dtype(enum.StrEnum):
    fp32 = "fp32"
    bf16 = "bf16"


class LogLevel(enum.StrEnum):
    debug = "debug"
    info = "info"
    warning = "warning"
    error = "error"


TERMINATED = 128 + signal.SIGTERM  # 143, as a shell reports a process killed by SIGTERM
EXIT_CODES_HELP = "\n".join([
    "\b", "Exit codes:",
    "  0    ok",
    f"  {UsageError.exit_code}    usage error, missing path, or SRC/DST aliasing",
    f"  {InvalidInputError.exit_code}    invalid input: malformed, hostile or foreign checkpoint",
    f"  {AlreadyInLayoutError.exit_code}    already in the target layout",
    f"  {IOFailure.exit_code}    I/O: ENOSPC, EACCES, locked destination",
    f"  {VerificationError.exit_code}    verification failed (parity, manifest, lossy disable)",
    f"  {Interrupted.exit_code}  interrupted (Ctrl-C)",
    f"  {TERMINATED}  terminated (SIGTERM)",
])


def _examples(*lines: str) -> str:
    return "\n".join(["\b", "Examples:", *(f"  {ln}" for ln in lines), "", EXIT_CODES_HELP])


# ------------------------------------------------------------------------------ error path
class _SignalWatch:
    """While a command runs: SIGTERM raises KeyboardInterrupt (so temporary output is cleaned
    up on the way out, as for Ctrl-C), and every signal's number is also written to a wakeup
    pipe, so which signal stopped us is known even when a handler installed meanwhile (the
    commit protocol's) ran instead of ours. Also records whether the failure was reported."""

    def __init__(self) -> None:
        self.read_fd: int | None = None
        self.seen: set[int] = set()
        self.reported = False

    def __enter__(self) -> _SignalWatch:
        self.seen, self.reported = set(), False
        if sys.platform == "win32" or not _is_main_thread():
            return self
        self.read_fd, self.write_fd = os.pipe()
        for fd in (self.read_fd, self.write_fd):
            os.set_blocking(fd, False)
        self.old_fd = signal.set_wakeup_fd(self.write_fd, warn_on_full_buffer=False)
        self.old_term = signal.signal(signal.SIGTERM, _raise_interrupt)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.read_fd is None:
            return
        signal.signal(signal.SIGTERM, self.old_term)
        signal.set_wakeup_fd(self.old_fd)
        os.close(self.read_fd)
        os.close(self.write_fd)
        self.read_fd = None

    def terminated(self) -> bool:
        """Whether SIGTERM arrived while this command ran."""
        if self.read_fd is not None:
            with contextlib.suppress(OSError):  # BlockingIOError: nothing arrived
                self.seen.update(os.read(self.read_fd, 1024))
        return signal.SIGTERM in self.seen


_WATCH = _SignalWatch()


def _is_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


class _Group(TyperGroup):
    """Runs every command with ``standalone_mode=False`` so that click's usage errors, like
    ours, become one line and the right exit code; maps SIGTERM to exit 143."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True,
             **extra):
        argv = list(sys.argv[1:] if args is None else args)
        as_json = "--json" in argv
        with _WATCH:
            try:
                rv = super().main(args=argv, prog_name=prog_name, complete_var=complete_var,
                                  standalone_mode=False, **extra)
            except typer.TyperException as e:  # click's UsageError and friends
                ctx = getattr(e, "ctx", None)
                where = f" (see '{ctx.command_path} -h')" if ctx is not None else ""
                rv = _fail(UsageError(f"{e.format_message()}{where}"), as_json=as_json)
            if rv == Interrupted.exit_code and not _WATCH.reported:  # outside _run (imports)
                rv = _fail(Interrupted("interrupted"), as_json=as_json)
        sys.exit(rv if isinstance(rv, int) else 0)


class _Command(TyperCommand):
    """Usage lines as people write them: ``enable [OPTIONS] SRC DST`` (typer 0.29 would print
    ``{SRC} {DST}``)."""

    def collect_usage_pieces(self, ctx):
        return [p[1:-1] if p.startswith("{") and p.endswith("}") else p
                for p in super().collect_usage_pieces(ctx)]


def _fail(exc: ConvertError, *, as_json: bool) -> int:
    """Report ``exc`` (one line on stderr, or one JSON document on stdout); its exit code."""
    code = exc.exit_code
    if isinstance(exc, Interrupted) and _WATCH.terminated():
        msg = exc.message.replace("interrupted", "terminated (SIGTERM)", 1)
        code, exc = TERMINATED, Interrupted(msg, path=exc.path, key=exc.key)
    _WATCH.reported = True
    if as_json:
        print(json.dumps({"ok": False, "error": type(exc).__name__, "exit_code": code,
                          "message": exc.one_line(), "path": exc.path, "key": exc.key}))
    else:
        print(f"mhc-convert: error: {exc.one_line()}", file=sys.stderr, flush=True)
    return code


def _run(fn: Callable[[], Any], *, as_json: bool) -> Any:
    """Call ``fn``; any failure leaves through ``_fail`` and ``typer.Exit``."""
    try:
        return fn()
    except KeyboardInterrupt:
        exc: ConvertError = Interrupted("interrupted")
    except ConvertError as e:
        exc = e
    except OSError as e:  # an OS error outside the commit protocol (reading a source file)
        import errno

        exc = IOFailure(f"{errno.errorcode.get(e.errno or 0, 'OSError')}: {e.strerror or e}",
                        path=e.filename)
    raise typer.Exit(_fail(exc, as_json=as_json))


# ------------------------------------------------------------------------------ app, options
app = typer.Typer(
    cls=_Group, add_completion=True, no_args_is_help=False, rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Move hybrid-model checkpoints between the mHC-off and mHC-on layouts, exactly.\n\n"
         "Formats: native (config.json + safetensors), Megatron torch_dist, Megatron "
         "legacy .pt.",
    epilog=_examples("mhc-convert inspect ckpt/",
                     "mhc-convert enable ckpt/ ckpt-mhc/ --streams 4",
                     "mhc-convert verify ckpt/ ckpt-mhc/ --dtype bf16",
                     "mhc-convert disable ckpt-mhc/ ckpt-back/",
                     "mhc-convert COMMAND -h"),
)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one machine-readable JSON "
                                       "document on stdout (errors too).")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors and "
                                        "warnings: no progress, no summary.")]
DryOpt = Annotated[bool, typer.Option("--dry-run", help="Check everything and print the plan "
                                      "(counts, bytes, optimizer state); write nothing.")]
ListOpt = Annotated[bool, typer.Option("--list-keys", help="Also print every key of the plan, "
                                       "one 'op=... src=... dst=...' line each.")]
OverOpt = Annotated[bool, typer.Option("--overwrite", help="Replace an existing DST (atomically).")]
PassOpt = Annotated[str | None, typer.Option("--passthrough", metavar="REGEX",
                                             help="Carry keys matching REGEX unchanged.")]
DropOptOpt = Annotated[bool, typer.Option(
    "--drop-optimizer", help="Leave optimizer state out of the output (resume with "
    "--no-load-optim); needed when it cannot be carried (e.g. dp_reshardable).")]
NonfiniteOpt = Annotated[bool, typer.Option(
    "--allow-nonfinite", help="Convert even if a tensor holds NaN/Inf (carried bit-exactly); "
    "by default such a checkpoint is refused (exit 3).")]
LinkOpt = Annotated[Link, typer.Option("--link", help="torch_dist data files: copy them, or "
                                       "hardlink/reflink them from SRC.")]
IterOpt = Annotated[int | None, typer.Option(
    "--iteration", min=0, metavar="N", help="In a run directory, use iter_N instead of the "
    "latest (the tracker's); the output's tracker names N.")]
LogOpt = Annotated[LogLevel | None, typer.Option("--log-level", help="Log threshold on "
                                                 "stderr [default: warning].")]
VerboseOpt = Annotated[int, typer.Option("--verbose", "-v", count=True, show_default=False,
                                         help="More log output: -v info, -vv debug.")]


def _version_callback(value: bool) -> None:
    if value:
        from mhc_model.version import __version__

        print(f"mhc-convert {__version__}")
        raise typer.Exit(0)


class _StderrHandler(logging.StreamHandler):
    """Writes to ``sys.stderr`` as it is when a record is emitted (not when the handler was
    made), so redirected or captured stderr gets the log too."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _logging(log_level: LogLevel | None, verbose: int) -> None:
    level = (logging.DEBUG if verbose > 1 else logging.INFO if verbose == 1
             else getattr(logging, log_level.value.upper()) if log_level else None)
    logger = logging.getLogger("mhc_convert")
    if not logger.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("mhc-convert: %(levelname)s: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(level if level is not None else logging.WARNING)  # per invocation


@app.callback(invoke_without_command=True)
def _root(
    ctx: typer.Context,
    version: Annotated[bool, typer.Option("--version", "-V", callback=_version_callback,
                                          is_eager=True, help="Print the version and exit.")]
    = False,
    log_level: LogOpt = None, verbose: VerboseOpt = 0,
) -> None:
    _logging(log_level, verbose)
    if ctx.invoked_subcommand is None:  # bare `mhc-convert`: the help, as a usage error
        print(ctx.get_help())
        raise typer.Exit(UsageError.exit_code)


def _command(*examples: str) -> Callable[[Callable[..., Any]], Any]:
    """A subcommand whose help ends with ``examples`` and the exit-code table."""
    return app.command(cls=_Command, epilog=_examples(*examples))


# ------------------------------------------------------------------------------ conversions
def _hooks(ctx: typer.Context) -> Hooks:
    """The hooks ``main`` read (tests: ``CliRunner().invoke(app, obj=Hooks(...))``), else none."""
    return ctx.obj if isinstance(ctx.obj, Hooks) else NO_HOOKS


def _convert(command: str, kwargs: dict[str, Any], *, as_json: bool, quiet: bool,
             dry_run: bool, list_keys: bool, hooks: Hooks = NO_HOOKS) -> None:
    from mhc_convert import distributed

    main = not distributed.launched_rank(hooks)  # under torchrun only rank 0 prints (errors: all)
    with ui.Activity(enabled=main and not (quiet or as_json)) as activity:
        activity.step("loading torch")
        from mhc_convert import engine

        if main and not dry_run:
            stale = ui.stale_output(kwargs["dst"])
            if stale:
                ui.log.warning("stale temporary output of an interrupted run beside the "
                               "destination: %s (`mhc-convert clean %s` removes it)",
                               ", ".join(p.name for p in stale), kwargs["dst"].parent)
        activity.step(f"reading {kwargs['src']}")

        def call():
            with distributed.session(hooks):
                return getattr(engine, command)(progress=activity.bar if main else None,
                                                hooks=hooks, **kwargs)

        report = _run(call, as_json=as_json and main).to_dict()
    if not main:
        return
    if as_json:
        print(json.dumps({"ok": True, **report}, default=str))
        return
    if list_keys:
        for row in report["plan_detail"] or []:
            ui.emit(" ".join(f"{k}={v}" for k, v in row.items()))
    if not quiet:
        ui.emit(_summary(report))


def _summary(r: dict[str, Any]) -> str:
    plan = r["plan"]
    keys = (f"{plan['renamed']} renamed, {plan['unchanged']} unchanged, {plan['added']} added, "
            f"{plan['dropped']} dropped")
    mhc = r["config"]
    layout = ("mhc-off -> mhc-on: " f"{mhc['num_residual_streams']} streams, "
              f"{mhc['mhc_convention']} convention, {mhc['mhc_output_contract']} output contract"
              if r["command"] == "enable" else "mhc-on -> mhc-off")
    pairs: list[tuple[str, Any]] = [("format", r["format"])]
    if r["iteration"] is not None:
        pairs.append(("iteration", r["iteration"]))
    pairs += [("layout", layout), ("keys", keys), ("optimizer", r["optimizer"])]
    if r["dry_run"]:
        head = (f"dry run: {r['command']} {r['source']} -> {r['output']}; nothing written "
                f"(--list-keys or --json for every key)")
        pairs.append(("would write", f"{ui.human_bytes(r['bytes_to_write'])} "
                                     f"({r['bytes_to_write']:,} bytes)"))
    else:
        head = f"{r['command']}d mHC: {r['source']} -> {r['output']}"
        pairs.append(("wrote", f"{ui.human_bytes(r['bytes_total'])} in {r['tensors_written']} "
                               f"tensors, {r['seconds']:.2f} s"))
    if r.get("parity"):
        p = r["parity"]
        pairs.append(("parity", f"max-abs {p['max_abs']:.3e}, top-1 {p['top1_agreement']:.4f} "
                                f"(fp32, against the source)"))
    text = head + "\n" + ui.rows(pairs)
    return "\n".join([text, *(f"note: {n}" for n in r["notes"])])


def _paths(src: Path, dst: Path, passthrough: str | None, streams: int | None = None
           ) -> tuple[Path, Path]:
    """The checks every conversion makes before any work (the engine repeats them for API
    callers): SRC exists and is local, DST is local, the regex compiles, n >= 2."""
    from mhc_convert import inputs

    if streams is not None:
        inputs.check_streams(streams)
    inputs.check_regex(passthrough)
    return inputs.existing(src, role="source"), inputs.local_path(dst, role="destination")


@_command("mhc-convert enable ckpt/ ckpt-mhc/",
          "mhc-convert enable run/ run-mhc/ --streams 4 --contract learned",
          "mhc-convert enable run/ run-mhc/ --iteration 2000 --dry-run")
def enable(
    ctx: typer.Context,
    src: Annotated[Path, typer.Argument(metavar="SRC", help="mHC-off checkpoint directory "
                                        "(or run directory).")],
    dst: Annotated[Path, typer.Argument(metavar="DST", help="Output directory (must not "
                                        "exist).")],
    *,
    streams: Annotated[int, typer.Option("--streams", "-n", help="Residual streams n (>= 2).")]
    = 4,
    target: Annotated[Target | None, typer.Option(
        help="Where the output runs (default: proven from the source: a Megatron run's args "
        "name its branch; native otherwise). Fixes the convention and contract.")] = None,
    convention: Annotated[Convention | None, typer.Option(
        help="mHC convention (default: the target's).")] = None,
    contract: Annotated[Contract | None, typer.Option(
        help="Output contract (default: the target's; Megatron targets: learned).")] = None,
    init: Annotated[Init, typer.Option(help="exact: function-preserving; megatron: Megatron's "
                                       "approximate init.")] = Init.exact,
    iteration: IterOpt = None, dry_run: DryOpt = False, list_keys: ListOpt = False,
    as_json: JsonOpt = False, quiet: QuietOpt = False, overwrite: OverOpt = False,
    passthrough: PassOpt = None, link: LinkOpt = Link.copy, drop_optimizer: DropOptOpt = False,
    allow_nonfinite: NonfiniteOpt = False,
) -> None:
    """Wrap every layer (inner_layer.*) and add hyper-connection parameters at the exact
    enable point: the converted model computes what the source computes."""
    src, dst = _run(lambda: _paths(src, dst, passthrough, streams), as_json=as_json)
    _convert("enable", dict(src=src, dst=dst, streams=streams,
                            target=target.value if target else None,
                            convention=convention.value if convention else None,
                            contract=contract.value if contract else None,
                            init=init.value, dry_run=dry_run,
                            overwrite=overwrite, passthrough=passthrough, link=link.value,
                            drop_optimizer=drop_optimizer, allow_nonfinite=allow_nonfinite,
                            iteration=iteration),
             as_json=as_json, quiet=quiet, dry_run=dry_run, list_keys=list_keys,
             hooks=_hooks(ctx))


@_command("mhc-convert disable ckpt-mhc/ ckpt/",
          "mhc-convert disable ckpt-mhc/ ckpt/ --allow-lossy --json")
def disable(
    ctx: typer.Context,
    src: Annotated[Path, typer.Argument(metavar="SRC", help="mHC-on checkpoint directory "
                                        "(or run directory).")],
    dst: Annotated[Path, typer.Argument(metavar="DST", help="Output directory (must not "
                                        "exist).")],
    *,
    allow_lossy: Annotated[bool, typer.Option("--allow-lossy", help="Drop the hyper-connections "
                                              "even when that changes the function; the measured "
                                              "parity loss is reported.")] = False,
    iteration: IterOpt = None, dry_run: DryOpt = False, list_keys: ListOpt = False,
    as_json: JsonOpt = False, quiet: QuietOpt = False, overwrite: OverOpt = False,
    passthrough: PassOpt = None, link: LinkOpt = Link.copy, drop_optimizer: DropOptOpt = False,
    allow_nonfinite: NonfiniteOpt = False,
) -> None:
    """Unwrap every layer and drop the hyper-connection parameters; exact only when the
    streams provably stay identical (otherwise exit 6)."""
    src, dst = _run(lambda: _paths(src, dst, passthrough), as_json=as_json)
    _convert("disable", dict(src=src, dst=dst, allow_lossy=allow_lossy, dry_run=dry_run,
                             overwrite=overwrite, passthrough=passthrough, link=link.value,
                             drop_optimizer=drop_optimizer, allow_nonfinite=allow_nonfinite,
                             iteration=iteration),
             as_json=as_json, quiet=quiet, dry_run=dry_run, list_keys=list_keys,
             hooks=_hooks(ctx))


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


def main() -> None:
    """The process entry (``mhc-convert``, ``python -m mhc_convert``, ``torchrun -m
    mhc_convert``): the only place the test/fault hooks are read from the environment."""
    import os

    app(obj=Hooks.from_env(os.environ))
