"""Megatron legacy ``torch`` checkpoints: ``iter_*/mp_rank_XX[_YYY][_ZZZ]/model_optim_rng.pt``.

Layout (megatron/training/checkpointing.py ``get_checkpoint_name``): the rank directory is
``mp_rank_{tp:02d}``, plus ``_{pp:03d}`` when pipeline-parallel, plus ``_{ep:03d}`` when
expert-parallel; the run directory holds ``latest_checkpointed_iteration.txt`` (an integer or
``release``). Each rank file is a torch zip whose pickle holds ``args`` (argparse.Namespace with
megatron enums), ``checkpoint_version``, ``iteration``, ``model`` (or ``model0``, ``model1``...),
``optimizer``, ``opt_param_scheduler``, ``rng_state``, ... (``generate_state_dict``).

We load with ``weights_only=True`` plus an explicit allowlist. megatron is not installed, so its
enums are registered as stand-in classes under their real qualified names, and are pickled back
under those same names so the output loads in real Megatron. This module knows nothing about mHC.
"""

from __future__ import annotations

import enum
import io
import os
import pickle
import re
import threading
from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path, PosixPath
from signal import Signals
from types import SimpleNamespace
from typing import Any, Literal

import torch

from mhc_convert.errors import InvalidInputError, IOFailure

TRACKER = "latest_checkpointed_iteration.txt"
RANK_FILE = "model_optim_rng.pt"
DISTRIB_OPTIM = "distrib_optim.pt"
_ITER_RE = re.compile(r"iter_(\d{7,})")
_RANK_RE = re.compile(r"mp_rank_(\d{2,})(?:_(\d{3,}))?(?:_(\d{3,}))?")
_MAX_TRACKER_BYTES = 1024  # the tracker is one integer; anything larger is not a tracker

# --------------------------------------------------------------------------- stand-in classes


class _StandInEnum(enum.Enum):
    """Base of the megatron enum stand-ins. Unknown values (a newer Megatron added a member)
    become pseudo-members instead of failing, so they survive a load/save round trip."""

    @classmethod
    def _missing_(cls, value):
        member = str.__new__(cls, value) if issubclass(cls, str) else object.__new__(cls)
        member._value_ = value
        member._name_ = f"_unknown_{value}"
        cls._value2member_map_[value] = member  # cache: the same value yields the same object
        return member


class _StandInObject:
    """Stand-in for a plain megatron dataclass (pickled as NEWOBJ + BUILD of ``__dict__``)."""

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and vars(other) == vars(self)

    def __repr__(self) -> str:
        return f"{type(self).__qualname__}({vars(self)!r})"

    __hash__ = None  # type: ignore[assignment]  # mutable, like the dataclass it replaces


# qualified name -> (mixin type or None, members). Values copied from megatron-core 0.19
# (core/enums.py, core/transformer/enums.py, core/rerun_state_machine.py); the set mirrors
# megatron/core/safe_globals.py plus the enums args can carry.
_ENUM_SPECS: dict[str, tuple[type | None, dict[str, Any]]] = {
    "megatron.core.enums.ModelType": (None, {"encoder_or_decoder": 1}),
    "megatron.core.enums.Fp8Recipe": (str, {k: k for k in
                                            ("delayed", "tensorwise", "mxfp8", "blockwise",
                                             "custom")}),
    "megatron.core.enums.Fp4Recipe": (str, {"nvfp4": "nvfp4", "custom": "custom"}),
    "megatron.core.transformer.enums.ModelType": (None, {"encoder_or_decoder": 1}),
    "megatron.core.transformer.enums.LayerType": (
        None, {"embedding": 1, "loss": 2, "encoder": 3, "decoder": 4, "mtp": 5}),
    "megatron.core.transformer.enums.AttnType": (None, {"self_attn": 1, "cross_attn": 2}),
    "megatron.core.transformer.enums.AttnMaskType": (
        None, {"padding": 1, "causal": 2, "no_mask": 3, "padding_causal": 4, "arbitrary": 5,
               "causal_bottom_right": 6}),
    "megatron.core.transformer.enums.AttnBackend": (
        None, {"flash": 1, "fused": 2, "unfused": 3, "local": 4, "auto": 5}),
    "megatron.core.transformer.enums.CudaGraphModule": (
        None, {"attn": 1, "mlp": 2, "moe": 3, "moe_router": 4, "moe_preprocess": 5,
               "mamba": 6}),
    "megatron.core.transformer.enums.CudaGraphScope": (
        None, {"full_iteration": 1, "attn": 2, "mlp": 3, "moe": 4, "moe_router": 5,
               "moe_preprocess": 6, "mamba": 7, "full_iteration_inference": 8}),
    "megatron.core.transformer.enums.InferenceCudaGraphScope": (
        None, {"none": 1, "layer": 2, "block": 3}),
    "megatron.core.rerun_state_machine.RerunDiagnostic": (
        str, {"CORRECT_RESULT": "correct_result", "TRANSIENT_ERROR": "transient_error",
              "PERSISTENT_ERROR": "persistent_error"}),
    "megatron.core.rerun_state_machine.RerunMode": (
        str, {"DISABLED": "disabled", "VALIDATE_RESULTS": "validate_results",
              "REPORT_DETERMINISM_STATS": "report_determinism_stats"}),
    "megatron.core.rerun_state_machine.RerunState": (
        None, {"NOT_RUNNING_YET": 0, "INITIAL_RUN": 1, "RERUNNING_IN_PLACE": 2,
               "WILL_RERUN_FROM_CHECKPOINT": 3, "RERUNNING_FROM_CHECKPOINT": 4,
               "RERUNNING_AGAIN_FROM_CHECKPOINT": 5}),
}
_OBJECT_SPECS = ("megatron.core.optimizer.optimizer_config.OptimizerConfig",)


def _make_standins() -> dict[str, type]:
    out: dict[str, type] = {}
    for full, (mixin, members) in _ENUM_SPECS.items():
        module, _, name = full.rpartition(".")
        out[full] = _StandInEnum(name, list(members.items()), module=module, qualname=name,
                                 type=mixin)
    for full in _OBJECT_SPECS:
        module, _, name = full.rpartition(".")
        out[full] = type(name, (_StandInObject,), {"__module__": module, "__qualname__": name})
    return out


STANDINS: dict[str, type] = _make_standins()
"""Qualified megatron name -> stand-in class, e.g. ``STANDINS["megatron.core.enums.ModelType"]``."""
_STANDIN_NAME = {cls: full for full, cls in STANDINS.items()}


def _numpy_globals() -> list[Any]:
    """numpy classes Megatron's own allowlist admits for ``rng_state['np_rng_state']``
    (the MT19937 key is a uint32 ndarray). Registered under both numpy 1.x and 2.x paths."""
    try:
        import numpy as np
        from numpy.dtypes import UInt32DType
    except ImportError:  # numpy is optional for torch; without it such files cannot load
        return []
    reconstruct = np._core.multiarray._reconstruct if hasattr(np, "_core") else None
    if reconstruct is None:  # pragma: no cover - numpy 1.x
        reconstruct = np.core.multiarray._reconstruct
    return [(reconstruct, "numpy.core.multiarray._reconstruct"),
            (reconstruct, "numpy._core.multiarray._reconstruct"),
            np.ndarray, np.dtype, UInt32DType]


def safe_globals() -> list[Any]:
    """The full allowlist for rank files: Megatron's own (``megatron/core/safe_globals.py``)
    with stand-ins for its classes. ``io.BytesIO`` carries TransformerEngine ``_extra_state``."""
    standins = [(cls, full) for full, cls in STANDINS.items()]
    standins.append((STANDINS[_OBJECT_SPECS[0]], "megatron.core.optimizer.OptimizerConfig"))
    return [Namespace, SimpleNamespace, PosixPath, Signals, io.BytesIO, torch._C.Generator,
            *standins, *_numpy_globals()]


_ALLOWLIST_LOCK = threading.Lock()


# --------------------------------------------------------------------------- load / save


def safe_load_rank(path: str | Path, *, mmap: bool = False) -> dict:
    """Load one rank file with ``weights_only=True`` and the explicit allowlist. Never falls
    back to unrestricted unpickling: a refused global is an attack or an unknown class, and
    either way no code from the file runs."""
    path = Path(path)
    try:
        # torch's allowlist is process-global and leaving ``safe_globals`` removes what it
        # added: add only what is absent, so we never unregister another module's globals.
        with _ALLOWLIST_LOCK:
            present = set(torch.serialization.get_safe_globals())
            with torch.serialization.safe_globals([g for g in safe_globals()
                                                   if g not in present]):
                # weights_only explicit: TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD cannot flip it
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise InvalidInputError(_describe_refusal(str(e)), path=path) from None
    except OSError as e:  # ENOENT/EACCES/EIO: the OS, not the content
        raise IOFailure(f"cannot read: {e.strerror or e}", path=path) from None
    except Exception as e:  # corrupt zip, truncated storage, bad pickle opcodes, ...
        first = (str(e).strip() or type(e).__name__).splitlines()[0].split(". ")[0]
        raise InvalidInputError(f"not a readable torch checkpoint (truncated or corrupt): "
                                f"{first[:160]}", path=path) from None
    if not isinstance(obj, dict):
        raise InvalidInputError(f"root object is {type(obj).__name__}, expected dict", path=path)
    return obj


def _describe_refusal(msg: str) -> str:
    m = re.search(r"GLOBAL (\S+?) whose module", msg) or re.search(r"GLOBAL (\S+)", msg)
    if m:
        name = m.group(1) if "." in m.group(1) else f"builtins.{m.group(1)}"  # torch strips it
        return (f"refused pickle global '{name}' (not on the allowlist); nothing from the "
                f"file was executed")
    m = re.search(r"WeightsUnpickler error: (.*)", msg)
    detail = (m.group(1) if m else msg.strip().splitlines()[0] if msg.strip() else "")[:200]
    return f"refused by the weights_only unpickler: {detail}"


class _Pickler(pickle._Pickler):
    """Pure-Python pickler that writes stand-in classes under their megatron names. The stock
    pickler would try to import ``megatron`` to verify the name, which is not installed."""

    def save_global(self, obj: Any, name: str | None = None) -> None:
        full = _STANDIN_NAME.get(obj)
        if full is None:
            return super().save_global(obj, name)
        module, _, qual = full.rpartition(".")
        if self.proto >= 4:
            self.save(module)
            self.save(qual)
            self.write(pickle.STACK_GLOBAL)
        else:
            self.write(pickle.GLOBAL + f"{module}\n{qual}\n".encode("ascii"))
        self.memoize(obj)


class _PickleModule:
    """Just enough of the ``pickle`` module interface for ``torch.save(pickle_module=...)``."""

    __name__ = "mhc_convert_pickle"
    Pickler = _Pickler
    dump = staticmethod(pickle.dump)


def save_rank(path: str | Path, obj: dict) -> None:
    """``torch.save`` ``obj`` to ``path`` and fsync it. Stand-ins pickle as megatron globals."""
    path = Path(path)
    try:
        with open(path, "wb") as f:
            torch.save(obj, f, pickle_module=_PickleModule)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise IOFailure(f"cannot write: {e.strerror or e}", path=path) from None


# --------------------------------------------------------------------------- layout


def _read_tracker(tracker: Path) -> str:
    try:
        raw = tracker.read_bytes()[: _MAX_TRACKER_BYTES + 1]
    except OSError as e:
        raise IOFailure(f"cannot read: {e.strerror or e}", path=tracker) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidInputError("tracker is not UTF-8 text", path=tracker) from None
    value = text.strip()
    if len(raw) > _MAX_TRACKER_BYTES or not (value == "release" or value.isdigit()):
        raise InvalidInputError(f"tracker must hold an iteration number or 'release', got "
                                f"{value[:40]!r}", path=tracker)
    return text


def resolve_legacy(path: str | Path) -> tuple[Path, Path | None, str | None]:
    """Return ``(iter_dir, run_dir, tracker_text)``. ``path`` is either an ``iter_XXXXXXX`` /
    ``release`` directory (then run_dir and tracker_text are None) or a run directory with
    ``latest_checkpointed_iteration.txt``; ``tracker_text`` is its exact content, so a writer
    can reproduce the tracker byte for byte."""
    path = Path(path)
    if not path.is_dir():
        raise InvalidInputError("not a directory", path=path)
    if _ITER_RE.fullmatch(path.name) or path.name == "release":
        return path, None, None
    tracker = path / TRACKER
    if not tracker.is_file():
        raise InvalidInputError(f"neither an iter_XXXXXXX/release directory nor a run "
                                f"directory with {TRACKER}", path=path)
    text = _read_tracker(tracker)
    value = text.strip()
    name = "release" if value == "release" else f"iter_{int(value):07d}"
    iter_dir = path / name
    if not iter_dir.is_dir() or iter_dir.is_symlink():
        raise InvalidInputError(f"tracker names {name!r} but that directory is missing",
                                path=tracker)
    return iter_dir, path, text


@dataclass(frozen=True)
class RankFile:
    """One ``model_optim_rng.pt``. ``pp``/``ep`` are None when the directory name has no such
    part (Megatron omits them when that parallelism is 1); ``distrib_optim`` is the relative
    path of a ``distrib_optim.pt`` beside it, if any."""

    rel: str
    path: Path
    tp: int
    pp: int | None
    ep: int | None
    distrib_optim: str | None = None

    @property
    def dirname(self) -> str:
        return rank_dirname(self.tp, self.pp, self.ep)


def rank_dirname(tp: int, pp: int | None = None, ep: int | None = None) -> str:
    """Megatron's rank directory name (``get_checkpoint_name``)."""
    name = f"mp_rank_{tp:02d}"
    if pp is not None:
        name += f"_{pp:03d}"
    if ep is not None:
        name += f"_{ep:03d}"
    return name


def list_rank_files(iter_dir: str | Path, *, two_part: Literal["pp", "ep"] = "pp",
                    allow_distrib_optim: bool = False) -> list[RankFile]:
    """List every rank file under ``iter_dir``, sorted by (pp, ep, tp).

    ``mp_rank_XX_YYY`` is ambiguous in Megatron (pipeline *or* expert rank); ``two_part`` says
    which (the engine can confirm with ``args`` via ``check_ranks_against_args``). Raises
    InvalidInputError when no rank exists, when the TP x PP (x EP) grid has holes, or when any
    other file is present: nothing is silently ignored. ``distrib_optim.pt`` (bucket-space
    distributed-optimizer state) is refused unless ``allow_distrib_optim``."""
    iter_dir = Path(iter_dir)
    unexpected: list[str] = []
    ranks: list[RankFile] = []
    try:
        children = sorted(iter_dir.iterdir())
    except OSError as e:
        raise IOFailure(f"cannot list: {e.strerror or e}", path=iter_dir) from None
    for child in children:
        m = _RANK_RE.fullmatch(child.name)
        if not m or child.is_symlink() or not child.is_dir():
            unexpected.append(child.name)
            continue
        tp, a, b = (int(g) if g is not None else None for g in m.groups())
        pp, ep = (a, b) if two_part == "pp" or b is not None else (None, a)
        if rank_dirname(tp, pp, ep) != child.name:  # e.g. mp_rank_001: not Megatron's spelling
            unexpected.append(child.name)
            continue
        try:
            found = {p.name: p for p in child.iterdir()}
        except OSError as e:
            raise IOFailure(f"cannot list: {e.strerror or e}", path=child) from None
        for fname, p in found.items():
            if fname not in (RANK_FILE, DISTRIB_OPTIM) or p.is_symlink() or not p.is_file():
                unexpected.append(f"{child.name}/{fname}")
        if RANK_FILE not in found:
            raise InvalidInputError(f"rank directory has no {RANK_FILE}", path=child)
        dist = f"{child.name}/{DISTRIB_OPTIM}" if DISTRIB_OPTIM in found else None
        if dist and not allow_distrib_optim:
            raise InvalidInputError(
                "distributed-optimizer state (bucket-space) cannot follow a parameter change; "
                "re-run with --drop-optimizer", path=iter_dir / dist)
        ranks.append(RankFile(f"{child.name}/{RANK_FILE}", child / RANK_FILE, tp, pp, ep, dist))
    if unexpected:
        raise InvalidInputError(f"unexpected entries in a legacy checkpoint: "
                                f"{', '.join(unexpected)}", path=iter_dir)
    if not ranks:
        raise InvalidInputError("no mp_rank_*/model_optim_rng.pt found", path=iter_dir)
    _check_grid(iter_dir, ranks)
    return sorted(ranks, key=lambda r: (r.pp or 0, r.ep or 0, r.tp))


def _check_grid(iter_dir: Path, ranks: list[RankFile]) -> None:
    """Every TP x PP (x EP) combination must be present, and naming must be uniform."""
    if len({(r.pp is None, r.ep is None) for r in ranks}) != 1:
        raise InvalidInputError("rank directories mix naming schemes (with and without "
                                "pipeline/expert suffixes)", path=iter_dir)
    sizes = [max(v) + 1 for v in zip(*[(r.tp, r.pp or 0, r.ep or 0) for r in ranks])]
    have = {(r.tp, r.pp or 0, r.ep or 0) for r in ranks}
    missing = [rank_dirname(t, p if ranks[0].pp is not None else None,
                            e if ranks[0].ep is not None else None)
               for p in range(sizes[1]) for e in range(sizes[2]) for t in range(sizes[0])
               if (t, p, e) not in have]
    if missing:
        raise InvalidInputError(f"incomplete rank grid (TP={sizes[0]} PP={sizes[1]} "
                                f"EP={sizes[2]}); missing {', '.join(missing)}", path=iter_dir)


def check_ranks_against_args(ranks: list[RankFile], args: Any, *, path: str | Path) -> None:
    """Confirm the directory grid matches ``args`` (tensor/pipeline/expert parallel sizes),
    which also settles the ``mp_rank_XX_YYY`` ambiguity."""
    want = {"tensor_model_parallel_size": max(r.tp for r in ranks) + 1,
            "pipeline_model_parallel_size": max(r.pp or 0 for r in ranks) + 1,
            "expert_model_parallel_size": max(r.ep or 0 for r in ranks) + 1}
    for key, n in want.items():
        got = getattr(args, key, None)
        if got is not None and int(got) != n:
            raise InvalidInputError(f"args say {got} but the rank directories give {n}",
                                    path=path, key=f"args.{key}")


# --------------------------------------------------------------------------- optimizer remap

_MOMENTS = frozenset({"exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer"})
_ADVICE = "re-run with --drop-optimizer to discard the optimizer state"
_HALF = (torch.float16, torch.bfloat16)


def remap_index_optimizer(opt_state: dict, old_order: list[str], new_order: list[str],
                          new_params: dict[str, torch.Tensor], *,
                          renames: dict[str, str] | None = None, dropped: Any = (),
                          new_param_groups: dict[str, int | str] | None = None,
                          path: str | Path | None = None) -> dict:
    """Remap an index-keyed optimizer state dict to a new parameter list. Pure: the input is
    not modified; carried state tensors are the *same objects* in the output.

    ``opt_state``: a torch ``Optimizer.state_dict()`` (``{'state', 'param_groups'}``), or
    Megatron's mixed-precision wrapper ``{'optimizer': <that>, 'fp32_from_fp16_params':
    [[fp32 main param, ...] per group], 'grad_scaler'?}``.
    ``old_order[i]``: name of optimizer index ``i`` (torch numbers params group by group, so for
    a one-group optimizer this is ``model.parameters()`` order).
    ``new_order``: the new model's parameter names in ``parameters()`` order. Output indices are
    numbered the way torch would: group by group, members in ``new_order`` order.
    ``renames``: old name -> new name; an old name present in ``new_order`` carries unchanged.
    ``dropped``: old names allowed to disappear; any other vanishing name is an error.
    ``new_param_groups``: added name -> group index, or the name of a neighbour whose group it
    joins (default group 0). ``new_params``: values of the added params (shape, dtype, fp32
    main copy); entries for carried names are used to check shapes.
    Added params get zero moments and a copy of their group neighbour's ``step``. A group left
    empty is removed (Megatron builds no empty groups)."""
    if isinstance(opt_state, dict) and "optimizer" in opt_state:
        return _remap_wrapped(opt_state, old_order, new_order, new_params, renames or {},
                              set(dropped), new_param_groups or {}, path)
    plan = _plan(opt_state, old_order, new_order, new_params, renames or {}, set(dropped),
                 new_param_groups or {}, path)
    return _build_plain(opt_state, plan, new_params, path)


def _refuse(msg: str, path: Any, key: str | None = None) -> InvalidInputError:
    return InvalidInputError(msg, path=path, key=key)


def _plan(sd: Any, old_order: list[str], new_order: list[str], new_params: dict, renames: dict,
          dropped: set, group_spec: dict, path: Any) -> list[tuple[int, list[tuple[str, Any]]]]:
    """Validate and return ``[(old_group_index, [(new_name, old_index | None), ...]), ...]``."""
    if not isinstance(sd, dict) or set(sd) != {"state", "param_groups"} or not (
            isinstance(sd["param_groups"], list) and isinstance(sd["state"], dict)
            and all(isinstance(g, dict) and isinstance(g.get("params"), list)
                    for g in sd["param_groups"])):
        raise _refuse(f"optimizer state has an unrecognised structure; {_ADVICE}", path,
                      "optimizer")
    group_of = {i: g for g, grp in enumerate(sd["param_groups"]) for i in grp["params"]}
    flat = [i for grp in sd["param_groups"] for i in grp["params"]]
    if len(flat) != len(group_of) or set(flat) != set(range(len(old_order))):
        raise _refuse(f"optimizer indexes {len(flat)} params but {len(old_order)} names were "
                      f"given (or indexes are not 0..N-1); {_ADVICE}", path, "optimizer")
    stray = [k for k in sd["state"] if k not in group_of]
    if stray:
        raise _refuse(f"state entries {stray[:5]} belong to no param group; {_ADVICE}", path,
                      "optimizer.state")
    new_pos = {n: i for i, n in enumerate(new_order)}
    if len(new_pos) != len(new_order) or len(set(old_order)) != len(old_order):
        raise _refuse("duplicate parameter names in old_order/new_order", path)
    for o, n in renames.items():
        if o not in old_order or n not in new_pos:
            raise _refuse(f"rename {o!r} -> {n!r}: source not an old param or target not a new "
                          f"param", path, o)
    carried: dict[str, int] = {}  # new name -> old index
    for i, o in enumerate(old_order):
        t = renames.get(o, o)
        if t in new_pos:
            if o in dropped:
                raise _refuse("listed as dropped but it is carried to the new model", path, o)
            if t in carried:
                raise _refuse(f"two old params map to {t!r}", path, o)
            carried[t] = i
        elif o not in dropped:
            raise _refuse("optimizer state would be dropped silently (not in the new model, "
                          "not renamed, not declared dropped)", path, o)
    unknown = sorted(dropped - set(old_order))
    if unknown:
        raise _refuse("declared dropped but not an old param", path, unknown[0])
    groups: dict[str, int] = {}
    for n in new_order:
        if n in carried:
            groups[n] = group_of[carried[n]]
    for n in new_order:
        if n in carried:
            continue
        if n not in new_params:
            raise _refuse("new param has no value in new_params", path, n)
        spec = group_spec.get(n, 0)
        if isinstance(spec, str):
            nb = renames.get(spec, spec) if spec in old_order else spec
            if nb not in groups:
                raise _refuse(f"neighbour {spec!r} is not a carried param", path, n)
            spec = groups[nb]
        if not 0 <= spec < len(sd["param_groups"]):
            raise _refuse(f"param group {spec} does not exist", path, n)
        groups[n] = spec
    plan = []
    for g, grp in enumerate(sd["param_groups"]):
        members = [(n, carried.get(n)) for n in new_order if groups[n] == g]
        if members or not grp["params"]:
            plan.append((g, members))
    return plan


def _new_state(template: dict, shape: torch.Size, name: str, path: Any) -> dict:
    """Fresh per-param state: zero moments of the new shape, the neighbour's step."""
    out = {}
    for k, v in template.items():
        if k == "step":
            out[k] = v.clone() if torch.is_tensor(v) else v
        elif k in _MOMENTS and torch.is_tensor(v):
            out[k] = torch.zeros(shape, dtype=v.dtype, device=v.device)
        else:
            raise _refuse(f"unknown per-param optimizer state {k!r}; cannot initialise it for "
                          f"a new param; {_ADVICE}", path, name)
    return out


def _build_plain(sd: dict, plan: list, new_params: dict, path: Any) -> dict:
    state, groups, idx = {}, [], 0
    any_state = next(iter(sd["state"].values()), None)
    for g, members in plan:
        first = next((sd["state"][o] for _, o in members if o in sd["state"]), any_state)
        params = []
        for name, old in members:
            if old is not None:
                if old in sd["state"]:
                    st = sd["state"][old]
                    ref = new_params.get(name)
                    if ref is not None and "exp_avg" in st and st["exp_avg"].shape != ref.shape:
                        raise _refuse(f"state shape {tuple(st['exp_avg'].shape)} != param shape "
                                      f"{tuple(ref.shape)}; is old_order right?", path, name)
                    state[idx] = dict(st)  # new dict, same tensor objects
            elif first is not None:
                state[idx] = _new_state(first, new_params[name].shape, name, path)
            params.append(idx)
            idx += 1
        groups.append({**sd["param_groups"][g], "params": params})
    return {"state": state, "param_groups": groups}


def _remap_wrapped(opt: dict, old_order, new_order, new_params, renames, dropped, group_spec,
                   path) -> dict:
    """Megatron ``Float16OptimizerWithFloat16Params.state_dict()``: the torch state under
    ``optimizer`` plus fp32 main copies per group, aligned with each group's ``params``."""
    extra = set(opt) - {"optimizer", "grad_scaler", "fp32_from_fp16_params"}
    if extra:  # e.g. distributed-optimizer or chained forms: not index-keyed torch state
        raise _refuse(f"optimizer wrapper has unrecognised keys {sorted(extra)}; {_ADVICE}",
                      path, "optimizer")
    inner = opt["optimizer"]
    plan = _plan(inner, old_order, new_order, new_params, renames, dropped, group_spec, path)
    out = dict(opt)
    out["optimizer"] = _build_plain(inner, plan, new_params, path)
    fp32 = opt.get("fp32_from_fp16_params")
    if fp32 is None:
        return out
    n_groups = len(inner["param_groups"])
    if not (isinstance(fp32, list) and len(fp32) == n_groups
            and all(isinstance(x, list) for x in fp32)):
        raise _refuse(f"fp32_from_fp16_params is not one list per param group; {_ADVICE}",
                      path, "optimizer.fp32_from_fp16_params")
    main_of: dict[int, torch.Tensor] = {}
    half_group: dict[int, bool | None] = {}
    for g, (grp, mains) in enumerate(zip(inner["param_groups"], fp32)):
        if len(mains) == len(grp["params"]) and mains:
            main_of.update(zip(grp["params"], mains))
            half_group[g] = True
        elif not mains:
            half_group[g] = False if grp["params"] else None
        else:  # a mixed fp16/fp32 group: which params own the copies is not recorded
            raise _refuse(f"param group {g} mixes fp16/bf16 and fp32 params; {_ADVICE}", path,
                          "optimizer.fp32_from_fp16_params")
    new_fp32 = []
    for g, members in plan:
        mains, half = [], half_group[g]
        for name, old in members:
            if old is not None:
                if half:
                    mains.append(main_of[old])
                continue
            v = new_params[name]
            is_half = v.dtype in _HALF
            if half is None:
                half = half_group[g] = is_half
            if is_half != half:
                raise _refuse(f"new param dtype {v.dtype} does not match its param group's "
                              f"precision; {_ADVICE}", path, name)
            if half:
                mains.append(v.detach().to(torch.float32, copy=True))
        new_fp32.append(mains if half else [])
    out["fp32_from_fp16_params"] = new_fp32
    return out
