"""``mhc-convert``: a thin CLI over ``mhc_convert.engine`` and ``mhc_convert.parity``. This module
holds the conversions (enable, disable) and the entry point; the app, its options and the one
error path are ``cli_app``, the read-only commands ``cli_read``. Inputs are checked before any
work (``mhc_convert.inputs``); the engine (torch) is imported only by the commands that use it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from mhc_convert import (
    cli_read,  # noqa: F401 (registers the read-only commands on the app)
    ui,
)
from mhc_convert.cli_app import (
    _WATCH,
    Contract,
    Convention,
    DropOptOpt,
    DryOpt,
    Init,
    IterOpt,
    JsonOpt,
    Link,
    LinkOpt,
    ListOpt,
    LossyOpt,
    NonfiniteOpt,
    OverOpt,
    PassOpt,
    QuietOpt,
    Target,
    _command,
    _exit_now,
    _run,
    app,
)
from mhc_convert.hooks import NO_HOOKS, Hooks


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
          "mhc-convert enable run/ run-mhc/ --iteration 2000 --dry-run",
          "mhc-convert enable mtp-run/ mtp-run-mhc/ --allow-lossy")
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
    allow_nonfinite: NonfiniteOpt = False, allow_lossy: LossyOpt = False,
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
                            iteration=iteration, allow_lossy=allow_lossy),
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
    allow_lossy: LossyOpt = False,
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


def main() -> None:
    """The process entry (``mhc-convert``, ``python -m mhc_convert``, ``torchrun -m
    mhc_convert``): the only place the test/fault hooks are read from the environment."""

    _WATCH.process_entry = True
    hooks = Hooks.from_env(os.environ)
    try:
        app(obj=hooks)
    except SystemExit as e:
        if e.code in (0, None) or _WATCH.reported_code is None:
            raise
        from mhc_convert import distributed

        if distributed.launched_rank(hooks) is None:
            raise
        # Under torchrun the failure is decided, reported and cleaned up: leave now, before
        # interpreter teardown (slow with torch loaded), or torchrun's SIGTERM to the ranks
        # still alive replaces their exit code with a signal's.
        _exit_now(_WATCH.reported_code)
