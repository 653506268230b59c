"""The ``mhc-convert`` application: its choices (read from the tables that define them), the one
error path, the options every command shares, logging and the root callback. The commands live
in ``cli`` (conversions) and ``cli_read`` (read-only); ``cli.main`` is the entry point.

One error path: every failure is an error of the one hierarchy (``mhc_convert.errors``),
printed as one line naming the file and key, and exits with the code the class carries (the
table in ``mhc-convert -h``). Typer's own usage errors get the same one-line form (``_Group``).
Start-up imports neither torch nor rich.
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
from typing import Annotated, Any

import typer
from typer.core import TyperCommand, TyperGroup

from mhc_convert.errors import (
    AlreadyInLayoutError,
    ConvertError,
    Interrupted,
    InvalidInputError,
    IOFailure,
    UsageError,
    VerificationError,
)
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
        self.reported_code: int | None = None
        self.process_entry = False  # set by cli.main: we own the process and its exit code

    def __enter__(self) -> _SignalWatch:
        self.seen, self.reported, self.reported_code = set(), False, None
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
        if self.reported_code is not None and self.process_entry:
            # The failure is decided, reported and cleaned up: a SIGTERM during the rest of the
            # process's life (torchrun terminates the other ranks as soon as one exits) must
            # not replace its exit code with a signal's.
            code = self.reported_code
            signal.signal(signal.SIGTERM, lambda signum, frame: _exit_now(code))
        else:
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


def _exit_now(code: int) -> None:
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


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

    def get_params(self, ctx):
        """The root's logging options are accepted after the subcommand too (``mhc-convert
        inspect SRC -v``), as users of git/hf expect: the very option objects of the root
        (one definition); ``invoke`` takes their values back out."""
        root = ctx.parent.command.params if ctx.parent is not None else []
        return [*super().get_params(ctx), *(p for p in root if p.name in _LOG_PARAMS)]

    def invoke(self, ctx):
        level, verbose = (ctx.params.pop(name, None) for name in _LOG_PARAMS)
        if level is not None or verbose:
            _logging(LogLevel(level) if level is not None else None, verbose or 0)
        return super().invoke(ctx)


_LOG_PARAMS = ("log_level", "verbose")


def _fail(exc: ConvertError, *, as_json: bool) -> int:
    """Report ``exc`` (one line on stderr, or one JSON document on stdout); its exit code."""
    code = exc.exit_code
    if isinstance(exc, Interrupted) and _WATCH.terminated():
        msg = exc.message.replace("interrupted", "terminated (SIGTERM)", 1)
        code, exc = TERMINATED, Interrupted(msg, path=exc.path, key=exc.key)
    _WATCH.reported, _WATCH.reported_code = True, code
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
    "--no-load-optim); needed when it cannot be carried (a legacy distrib_optim.pt, a "
    "dp_reshardable layout that is not modelled: `inspect` says).")]
NonfiniteOpt = Annotated[bool, typer.Option(
    "--allow-nonfinite", help="Convert even if a tensor holds NaN/Inf (carried bit-exactly); "
    "by default such a checkpoint is refused (exit 3).")]
LossyOpt = Annotated[bool, typer.Option(
    "--allow-lossy", help="Convert even when the output only approximates the source, and "
    "report the measured parity loss. disable: drop hyper-connections whose streams differ "
    "(H_res/H_pre not uniform). enable with MTP: Megatron feeds each MTP depth the streams "
    "before the final norm when mHC is on, so the MTP logits match only up to the RMSNorm "
    "eps (the main logits stay exact).")]
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
        """logging.StreamHandler assigns ``self.stream`` in __init__; the stream is always the
        current ``sys.stderr`` (the getter), so the assignment is deliberately ignored."""


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


