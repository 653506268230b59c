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
import itertools
import math
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
from mhc_convert.formats.legacy_optim import remap_index_optimizer  # noqa: F401 (re-export)
from mhc_model import pickle_guard
from mhc_model.megatron_files import TRACKER, iter_dir_name, read_tracker

RANK_FILE = "model_optim_rng.pt"
DISTRIB_OPTIM = "distrib_optim.pt"
_ITER_RE = re.compile(r"iter_(\d{7,})")
_RANK_RE = re.compile(r"mp_rank_(\d{2,})(?:_(\d{3,}))?(?:_(\d{3,}))?")

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
    if (why := pickle_guard.refusal(path)) is not None:
        raise InvalidInputError(why, path=path)
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
    value, text = read_tracker(tracker)
    name = iter_dir_name(value)
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
    n_missing = math.prod(sizes) - len(have)
    if n_missing:
        # Lazily, and only the first few: a hostile ``mp_rank_1000000000`` implies a grid of 1e9
        # cells, and the present ones are few, so the first missing cells come at once.
        cells = ((t, p, e) for p in range(sizes[1]) for e in range(sizes[2])
                 for t in range(sizes[0]))
        first = [rank_dirname(t, p if ranks[0].pp is not None else None,
                              e if ranks[0].ep is not None else None)
                 for t, p, e in itertools.islice((c for c in cells if c not in have), 4)]
        more = f" and {n_missing - len(first)} more" if n_missing > len(first) else ""
        raise InvalidInputError(f"incomplete rank grid (TP={sizes[0]} PP={sizes[1]} "
                                f"EP={sizes[2]}); missing {', '.join(first)}{more}",
                                path=iter_dir)


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
