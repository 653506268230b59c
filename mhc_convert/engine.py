"""enable / disable: plan over the lazy view, compute the few new tensors, write through the
format adapter inside the atomic-commit protocol (``inspect`` lives in ``inspection``). No
tensor data is decoded except the new parameters and, for disable, the hyper-connection
parameters being checked."""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from mhc_convert import commit, distributed, targeting
from mhc_convert.adapters import ReadOptions, open_checkpoint
from mhc_convert.errors import InvalidInputError, VerificationError
from mhc_convert.hooks import NO_HOOKS, Hooks
from mhc_convert.inputs import check_regex, check_streams, existing, local_path
from mhc_convert.inspection import InspectReport, inspect, iteration_of  # noqa: F401 (API)
from mhc_convert.validate import OnePassScan, check_finite, is_floating, naming_files
from mhc_convert.view import CheckpointView, OutItem
from mhc_model import __version__
from mhc_model.config import HybridConfig, MHCConfig
from mhc_model.specs import LAYER_SPECS
from mhc_model.toggle import codec as K
from mhc_model.toggle.plan import Plan, make_plan
from mhc_model.toggle.values import NewValues, extra_state_sources, reshape_values
from mhc_model.toggle.verdict import check_disable, check_mtp_norms, mtp_norm_keys

# (total bytes, what is being done) -> per-chunk callback
ProgressFactory = Callable[[int, str], Callable[[int], None]]


@dataclass
class Report:
    command: str
    source: str
    output: str | None
    format: str
    dry_run: bool
    plan: dict[str, int]
    tensors_written: int = 0
    bytes_total: int = 0
    bytes_to_write: int = 0
    iteration: int | str | None = None
    optimizer: str = "none in the source"
    seconds: float = 0.0
    config: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    parity: dict[str, float] | None = None
    plan_detail: list[dict[str, str]] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _open(src: Path, drop_optimizer: bool = False, iteration: int | None = None
          ) -> tuple[str, Any, CheckpointView, HybridConfig, list[str]]:
    adapter, view, note = open_checkpoint(src, iteration=iteration,
                                          options=ReadOptions(drop_optimizer=drop_optimizer))
    return adapter.name, adapter, view, adapter.config(view), [note] if note else []


def _optimizer_fate(view: CheckpointView, plan: Plan, drop_optimizer: bool) -> str:
    """What happens to the optimizer state, in words (dry-run summary, report)."""
    present = view.meta.get("optimizer_present") or any(k.startswith("optimizer.")
                                                        for k in view.entries)
    if not present:
        return "none in the source"
    if drop_optimizer:
        return "dropped (--drop-optimizer): resume with --no-load-optim"
    carried = sum(r.src.startswith("optimizer.") for r in plan.renames)
    if not carried:
        return f"carried ({view.meta.get('optimizer_sharding') or 'format-specific'})"
    added = sum(a.opt_state is not None for a in plan.adds)
    dropped = sum(d.opt_state is not None for d in plan.drops)
    return (f"carried: {carried} tensors ({', '.join(plan.opt_states)})"
            + (f"; {added} new for the added parameters (fp32 copy = value, moments = 0)"
               if added else "") + (f"; {dropped} dropped with the hyper-connections"
                                    if dropped else ""))


def _scan(view: CheckpointView, keys: list[str], progress: ProgressFactory | None) -> None:
    """Refuse NaN/Inf (validate.check_finite), with a progress bar over the bytes read."""
    if not keys:  # everything is checked in the copy: no bar for an empty pass
        return
    entries = [view.entries[k] for k in keys if k in view.entries]
    total = sum(e.nbytes for e in entries if e.kind == "tensor" and is_floating(e.dtype))
    cb = progress(total, "checking for NaN/Inf") if progress else None
    check_finite(view, keys, path=view.path, on_bytes=cb)


def _finite(view: CheckpointView, copied: list[str], other: list[str],
            progress: ProgressFactory | None, *, allow: bool, dry_run: bool, hooks: Hooks
            ) -> OnePassScan | None:
    """The NaN/Inf refusal (validate.py). ``copied`` keys are checked in the copy's own read
    (the returned ``OnePassScan`` goes to the writer) where their bytes lie plainly in a file;
    the rest, ``other`` (read but not written) and everything in a dry run, a distributed run
    (each rank writes only its files) or ``Hooks.finite_scan == "reference"`` are read and
    checked now, before anything is written."""
    if allow:
        return None
    if dry_run or hooks.finite_scan == "reference" or distributed.active() is not None:
        _scan(view, copied + other, progress)
        return None
    scan = OnePassScan(view, copied)
    _scan(view, scan.upfront + other, progress)
    return scan


def _linked_note(finite: OnePassScan | None, link: str) -> list[str]:
    if finite is None or not finite.linked_bytes:
        return []
    return [f"--link {link}: {finite.linked_bytes} bytes of tensor data are the source's own "
            f"bytes, unchanged and not read; the NaN/Inf check covered the bytes written"]


def _plan_keys(view: CheckpointView, drop_optimizer: bool) -> dict[str, Any]:
    """Keys and shapes the planner sees. With ``drop_optimizer`` the model-space optimizer
    keys (``optimizer.*``) are left out, so they are neither planned nor written."""
    return {k: e.shape if e.kind == "tensor" else None for k, e in view.entries.items()
            if not (drop_optimizer and k.startswith("optimizer."))}


def _check(adapter, view: CheckpointView, plan: Plan, cfg: HybridConfig,
           target: HybridConfig, report: Report, drop_optimizer: bool) -> None:
    """Format checks that need the plan (legacy: per-rank optimizer order, TP shapes), run
    before anything is written so bad input leaves no trace, dry runs included."""
    adapter.check(view, plan, cfg, target)
    if drop_optimizer and (view.meta.get("optimizer_present")
                           or any(k.startswith("optimizer.") for k in view.entries)):
        report.notes.append("optimizer state dropped (--drop-optimizer): resume with "
                            "--no-load-optim")


def _reshaped(view: CheckpointView, plan: Plan) -> list[OutItem]:
    """The MTP input projections in the target layout (``toggle.plan.Reshape``); their
    linears' ``_extra_state`` entries are carried as stored (``extra_state_sources``)."""
    out = []
    for rs in plan.reshapes:
        srcs = [view.load(s) for s in rs.srcs]
        if K.is_extra_state(rs.srcs[0]):
            out += [OutItem(dst, source=view.entries[src])
                    for dst, src in extra_state_sources(rs, srcs).items()]
        else:
            out += [OutItem(dst, value=v) for dst, v in reshape_values(rs, srcs).items()]
    return out


def _reshape_srcs(plan: Plan) -> list[str]:
    """Sources of the reshaped MTP projections: written as new values, so not checked in the
    copy's read; they are checked before the write (``_finite``'s ``other``)."""
    return [s for rs in plan.reshapes for s in rs.srcs]


def _mtp_norms(view: CheckpointView, cfg: HybridConfig) -> dict[str, torch.Tensor]:
    return {k: view.load(k) for k in mtp_norm_keys(cfg)}


def _plan_detail(plan: Plan) -> list[dict[str, str]]:
    rows = [{"op": "rename", "src": r.src, "dst": r.dst} for r in plan.renames if r.src != r.dst]
    rows += [{"op": "add", "dst": a.dst} for a in plan.adds]
    rows += [{"op": "drop", "src": d.src} for d in plan.drops]
    return rows


def _write(src: Path, dst: Path, view, adapter, plan: Plan, items: list[OutItem],
           target: HybridConfig, *, direction: str, overwrite: bool, link: str,
           progress: ProgressFactory | None, hooks: Hooks = NO_HOOKS,
           finite: OnePassScan | None = None) -> int:
    needed = _needed(items)

    def output() -> commit.AtomicOutput:
        commit.check_free_space(dst.parent, 0 if link == "hardlink" else needed, hooks=hooks)
        return commit.AtomicOutput(dst, fingerprint=commit.source_fingerprint(src),
                                   direction=direction, tool_version=__version__,
                                   overwrite=overwrite, src=src, expected_bytes=needed,
                                   hooks=hooks)

    ctx = distributed.active()
    cb = progress(needed, "writing") if progress and (ctx is None or ctx.is_main) else None
    if ctx is not None:  # torchrun: each rank writes its share of the files (distributed.py)
        distributed.write_shared(ctx, output, lambda tmp, assign, pcb: adapter.write(
            tmp, view, items, target, link=link, progress=pcb, assign=assign),
            progress=cb, digest=distributed.plan_digest(items))
        return needed
    ao = output()
    with ao as tmp:
        marker = adapter.write(tmp, view, items, target, link=link, progress=cb, finite=finite)
        if finite is not None:
            finite.finish()  # every range read to its end (or linked) before the seal
        ao.commit(marker)
    return needed


def _needed(items: list[OutItem]) -> int:
    return sum(it.source.nbytes if it.source else _size(it.value) for it in items)


def _size(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    return len(value)


def enable(src: str | Path, dst: str | Path, *, streams: int = 4, target: str | None = None,
           convention: str | None = None, contract: str | None = None, init: str = "exact",
           dry_run: bool = False,
           overwrite: bool = False, passthrough: str | None = None, link: str = "copy",
           progress: ProgressFactory | None = None, drop_optimizer: bool = False,
           allow_nonfinite: bool = False, iteration: int | None = None,
           hooks: Hooks = NO_HOOKS, allow_lossy: bool = False) -> Report:
    """Convert an mHC-off checkpoint into the mHC-on wrapper layout, function-preserving
    (``init="exact"``) or with Megatron's approximate init (``init="megatron"``), for
    ``target`` (``mhc_model.targets``; None: proven from the source, see ``targeting``), whose
    convention and contract apply unless compatible ones are named.
    ``drop_optimizer`` discards optimizer state that cannot follow the parameter change.
    NaN/Inf in any carried tensor is refused unless ``allow_nonfinite``; the check runs on the
    bytes as they are copied (one read serves copy, sha256 and check; a refusal discards the
    temp dir), on a dry run before anything (validate.py); linked files are not read.
    ``iteration`` picks ``iter_XXXXXXX`` of a run directory instead of the tracker's.
    With MTP, an enable keeps the MTP logits only where the norms before each depth are
    uniform (``verdict.check_mtp_norms``); otherwise it is refused unless ``allow_lossy``."""
    t0 = time.perf_counter()
    src, dst = existing(src, role="source"), local_path(dst, role="destination")
    check_streams(streams)
    check_regex(passthrough)
    commit.preflight(src, dst, overwrite=overwrite)
    fmt, adapter, view, cfg, notes = _open(src, drop_optimizer, iteration)
    choice = targeting.choose(cfg, view.meta.get("megatron_args"), name=target, streams=streams,
                              convention=convention, contract=contract, path=view.path)
    target = choice.cfg
    with naming_files(view):
        plan = make_plan(_plan_keys(view, drop_optimizer), cfg, "enable", target,
                         passthrough=passthrough, path=str(view.path))
    finite = _finite(view, [r.src for r in plan.renames], _reshape_srcs(plan), progress,
                     allow=allow_nonfinite, dry_run=dry_run, hooks=hooks)
    items = [OutItem(r.dst, source=view.entries[r.src]) for r in plan.renames]
    new_value = NewValues(target, init, param_dtype=choice.param_dtype)
    items += [OutItem(a.dst, value=new_value(a)) for a in plan.adds]
    items += _reshaped(view, plan)
    mtp_loss = check_mtp_norms(cfg, _mtp_norms(view, cfg)) if cfg.mtp_num_depths else None
    if mtp_loss and not allow_lossy:
        raise VerificationError(f"enable would change what the model computes: {mtp_loss}; "
                                f"pass --allow-lossy to enable anyway", path=view.path)
    report = Report("enable", str(src), str(dst), fmt, dry_run, plan.summary(),
                    config=target.to_dict()["mhc"], plan_detail=_plan_detail(plan),
                    notes=notes, bytes_to_write=_needed(items), iteration=iteration_of(view),
                    optimizer=_optimizer_fate(view, plan, drop_optimizer))
    report.notes.extend(choice.notes)
    if mtp_loss:
        report.notes.append(f"LOSSY: {mtp_loss}")
    _check(adapter, view, plan, cfg, target, report, drop_optimizer)
    if init != "exact":
        report.notes.append("init=megatron is only approximately function-preserving; run "
                            "`mhc-convert verify` to measure the parity")
    if not dry_run:
        report.bytes_total = _write(src, dst, view, adapter, plan, items, target,
                                    direction="enable", overwrite=overwrite, link=link,
                                    progress=progress, hooks=hooks, finite=finite)
        report.tensors_written = len(items)
        report.notes.extend(_linked_note(finite, link))
    report.seconds = time.perf_counter() - t0
    return report


def _fold_post(adapter, view: CheckpointView, cfg: HybridConfig, items: list[OutItem],
               folds: dict[int, float], plan: Plan, drop_optimizer: bool) -> list[OutItem]:
    """H_post = c (constant over streams) at layer l: F(u) is linear in the layer's output
    projections, so W <- c W reproduces H_post * F(u) without the wrapper (DESIGN.md §4)."""
    if adapter.fold_refusal is not None:
        raise VerificationError(adapter.fold_refusal, path=view.path)
    if plan.opt_states and not drop_optimizer:
        raise VerificationError(
            f"H_post != 1 at {len(folds)} layer(s) folds into the output projections, and Adam "
            f"state cannot follow a rescaled weight exactly; pass --drop-optimizer (resume with "
            f"--no-load-optim)", path=view.path)
    out, folded = [], set()
    for it in items:
        m = K.LAYER_RE.match(it.key)
        layer = int(m.group(1)) if m and not it.key.startswith("optimizer.") else None
        if layer in folds and _is_output_projection(cfg, it.key):
            w = view.load(it.source.key)
            out.append(OutItem(it.key, value=(w.double() * folds[layer]).to(w.dtype)))
            folded.add(layer)
            continue
        out.append(it)
    missing = sorted(set(folds) - folded)
    if missing:
        raise InvalidInputError(f"no output projection found to fold H_post into at layer(s) "
                                f"{missing}", path=view.path)
    return out


def _is_output_projection(cfg: HybridConfig, key: str) -> bool:
    """Whether the stored layer key holds an output projection of its layer (in our names:
    every model tensor a stacked one stands for, or its canonical spelling)."""
    layer = int(K.LAYER_RE.match(key).group(1))
    prefix = f"decoder.layers.{layer}."
    names = K.stacked(cfg, key) or (K.canonical_key(cfg, key),)
    rxs = LAYER_SPECS[cfg.layer_symbols[layer]].output_projections
    return all(any(re.fullmatch(rx, n[len(prefix):]) for rx in rxs) for n in names)


def disable(src: str | Path, dst: str | Path, *, allow_lossy: bool = False,
            dry_run: bool = False, overwrite: bool = False, passthrough: str | None = None,
            link: str = "copy", progress: ProgressFactory | None = None,
            drop_optimizer: bool = False, allow_nonfinite: bool = False,
            iteration: int | None = None, hooks: Hooks = NO_HOOKS) -> Report:
    """Convert an mHC-on checkpoint back to the plain layout. Exact only at a point where the
    streams provably stay identical (DESIGN.md §4); otherwise refuse unless ``allow_lossy``.
    ``drop_optimizer`` discards optimizer state that cannot follow the parameter change.
    NaN/Inf in any source tensor is refused unless ``allow_nonfinite``; carried tensors are
    checked as they are copied, the dropped ones before anything is written (validate.py)."""
    t0 = time.perf_counter()
    src, dst = existing(src, role="source"), local_path(dst, role="destination")
    check_regex(passthrough)
    commit.preflight(src, dst, overwrite=overwrite)
    fmt, adapter, view, cfg, notes = _open(src, drop_optimizer, iteration)
    with naming_files(view):
        plan = make_plan(_plan_keys(view, drop_optimizer), cfg, "disable", cfg,
                         passthrough=passthrough, path=str(view.path))
    finite = _finite(view, [r.src for r in plan.renames],
                     [d.src for d in plan.drops] + _reshape_srcs(plan), progress,
                     allow=allow_nonfinite, dry_run=dry_run, hooks=hooks)
    verdict = check_disable(cfg, {what: view.load(src)
                                  for src, what in plan.model_drops().items()},
                            _mtp_norms(view, cfg))
    # mHC-off: the other mHC fields have no effect, so they return to their defaults (those of
    # Megatron's TransformerConfig too); then disable(enable(x)) restores x's config exactly
    target = dataclasses.replace(cfg, mhc=MHCConfig())
    report = Report("disable", str(src), str(dst), fmt, dry_run, plan.summary(),
                    config=target.to_dict()["mhc"], plan_detail=_plan_detail(plan),
                    notes=notes, iteration=iteration_of(view),
                    optimizer=_optimizer_fate(view, plan, drop_optimizer))
    _check(adapter, view, plan, cfg, target, report, drop_optimizer)
    report.notes.extend(verdict.notes)
    reset = {f.name: (getattr(cfg.mhc, f.name), getattr(target.mhc, f.name))
             for f in dataclasses.fields(MHCConfig) if f.name != "enable_hyper_connections"
             and getattr(cfg.mhc, f.name) != getattr(target.mhc, f.name)}
    if reset:
        report.notes.append("mHC settings back to their defaults (no effect with mHC off): " +
                            ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in reset.items()))
    if not verdict.exact and not verdict.exact_with_folds:
        if not allow_lossy:
            raise VerificationError(f"disable would change what the model computes: "
                                    f"{verdict.reason}; pass --allow-lossy to drop the "
                                    f"hyper-connections anyway (parity loss is measured and "
                                    f"reported)", path=view.path)
        report.notes.append(f"LOSSY: {verdict.reason}")
    items = [OutItem(r.dst, source=view.entries[r.src]) for r in plan.renames]
    items += _reshaped(view, plan)
    if verdict.folds and verdict.exact_with_folds:
        items = _fold_post(adapter, view, cfg, items, verdict.folds, plan, drop_optimizer)
        if finite is not None:  # folded weights are written as new values, not copied
            copied = {it.source.key for it in items if it.source is not None}
            _scan(view, finite.exclude([r.src for r in plan.renames if r.src not in copied]),
                  progress)
    report.bytes_to_write = _needed(items)
    if not dry_run:
        report.bytes_total = _write(src, dst, view, adapter, plan, items, target,
                                    direction="disable", overwrite=overwrite, link=link,
                                    progress=progress, hooks=hooks, finite=finite)
        report.tensors_written = len(items)
        report.notes.extend(_linked_note(finite, link))
        if not verdict.exact_with_folds and getattr(distributed.active(), "is_main", True):
            from mhc_convert.parity import compare_checkpoints

            report.parity = compare_checkpoints(src, dst, device="cpu", dtype="fp32")
    report.seconds = time.perf_counter() - t0
    return report
