"""Megatron ``torch_dist`` checkpoints straight from the model (DESIGN.md §5), via
``torch.distributed.checkpoint`` (DCP).

On disk it is what megatron-core 0.19 writes: ``iter_XXXXXXX/{.metadata, __0_0.distcp,
metadata.json}`` + ``latest_checkpointed_iteration.txt``; model keys with Megatron's factory
splits (``in_proj.weight.{z,x,B,C,dt}``, ``conv1d.{weight,bias}.{x,B,C}``, GDN splits);
model-space optimizer state ``optimizer.state.{fp32_param,exp_avg,exp_avg_sq}.<key>`` (fp32,
``fully_reshardable``); ``common_state/shard_0_1`` = ``torch.save([common])`` with an ``args``
namespace and the iteration; ``rng_state/shard_0.0_1.1``; ``metadata.json`` written last.

Loading goes through ``RemapLoadPlanner``: the destination dict holds *views* of the model's
parameters and optimizer moments (a factory split is a set of row views), keyed by model name and
mapped to the stored name, so DCP copies each stored chunk straight into place and nothing beyond
the tensors being loaded is materialised. The stored layout may be mHC-off or mHC-on whatever the
model's layout; toggles follow ``mhc_model.shim`` (exact fill on enable, exactness-checked drop on
disable; new parameters get zero moments).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import random
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.planner import ReadItem

from mhc_model.config import HybridConfig
from mhc_model.errors import ToggleError
from mhc_model.megatron_args import MHC_META_KEY, config_from_megatron_args, megatron_args
from mhc_model.megatron_files import COMMON_PT
from mhc_model.safe_unpickle import safe_pickle_load, safe_torch_load
from mhc_model.toggle.codec import Source, disk_views, head_key, model_sources
from mhc_model.toggle.plan import plan_for_model
from mhc_model.toggle.values import values_for
from mhc_model.toggle.verdict import check_disable_exact

TRACKER = "latest_checkpointed_iteration.txt"
MARKER = "metadata.json"
COMMON_KEY = "common_state/shard_0_1"
RNG_KEY = "rng_state/shard_0.0_1.1"
OPT_STATES = ("fp32_param", "exp_avg", "exp_avg_sq")
MOMENTS = ("exp_avg", "exp_avg_sq")
CONFIG_KEY = "mhc_model_config"  # our full config; the mHC flags are always re-read from args


def iter_dir_name(iteration: int) -> str:
    return f"iter_{int(iteration):07d}"


# ------------------------------------------------------------------------------------- save
@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """DCP warns on every call without a process group; single-process is a supported mode."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _adam_state(optimizer: torch.optim.Optimizer, p: Tensor) -> dict[str, Tensor]:
    st = optimizer.state.get(p) or {}
    return {s: st[s] if s in st else torch.zeros_like(p) for s in MOMENTS}


def _rng_state() -> dict[str, Any]:
    out: dict[str, Any] = {"random_rng_state": random.getstate(),
                           "torch_rng_state": torch.get_rng_state(), "rng_tracker_states": {}}
    if torch.cuda.is_available():
        out["cuda_rng_state"] = torch.cuda.get_rng_state()
    return out


def _param_groups(optimizer: torch.optim.Optimizer | None, step: int) -> list[dict[str, Any]]:
    if optimizer is None:
        return []
    return [{"lr": g["lr"], "weight_decay": g.get("weight_decay", 0.0),
             "betas": tuple(g.get("betas", (0.9, 0.999))), "eps": g.get("eps", 1e-8),
             "wd_mult": 1.0, "lr_mult": 1.0, "is_decoupled_lr": False,
             "is_expert_parallel": False, "step": step} for g in optimizer.param_groups]


def state_for_save(model: nn.Module, optimizer: torch.optim.Optimizer | None = None
                   ) -> dict[str, Tensor]:
    """On-disk key -> tensor (views where split). Optimizer state is fp32, as Megatron keeps it."""
    cfg: HybridConfig = model.config
    out: dict[str, Tensor] = {}
    for name, t in model.state_dict().items():
        out.update(disk_views(cfg, name, t.detach()))
    if optimizer is not None:
        for name, p in model.named_parameters():
            values = {"fp32_param": p.detach().float(), **_adam_state(optimizer, p)}
            for s in OPT_STATES:
                for k, v in disk_views(cfg, name, values[s].float()).items():
                    out[f"optimizer.state.{s}.{k}"] = v
    return out


def save_dist(run_dir: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
              *, iteration: int, common_extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``run_dir/iter_XXXXXXX`` and point the tracker at it. Under a process group every
    rank calls this with the same (replicated) state; DCP writes each item once."""
    cfg: HybridConfig = model.config
    iter_dir = Path(run_dir) / iter_dir_name(iteration)
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if rank0 and (iter_dir / MARKER).exists():
        raise FileExistsError(f"{iter_dir} already holds a complete checkpoint")
    step = int(iteration)
    groups = _param_groups(optimizer, step)
    common = {
        "args": megatron_args(cfg, iteration=step, lr=groups[0]["lr"] if groups else None),
        "checkpoint_version": 3.0, "iteration": step,
        "optimizer": {"param_groups": groups},
        "opt_param_scheduler": {"max_lr": groups[0]["lr"] if groups else 0.0,
                                "min_lr": groups[0]["lr"] if groups else 0.0,
                                "num_steps": step, "decay_style": "constant"},
        "num_floating_point_operations_so_far": 0.0,
        "content_metadata": {"distrib_optim_sharding_type": "fully_reshardable",
                             "singleton_local_shards": False, "chained_optim_avoid_prefix": True},
        CONFIG_KEY: cfg.to_dict(),
        **(common_extra or {}),
    }
    state: dict[str, Any] = state_for_save(model, optimizer)
    # Megatron's ShardedObject encoding: torch.save([obj]) (DCP torch.saves the list for us)
    state[COMMON_KEY] = [common]
    state[RNG_KEY] = [[_rng_state()]]
    iter_dir.mkdir(parents=True, exist_ok=True)
    with _quiet():
        dcp.save(state, storage_writer=_Writer(str(iter_dir), single_file_per_rank=True),
                 planner=DefaultSavePlanner(flatten_state_dict=False,
                                            flatten_sharded_tensors=False),
                 no_dist=not dist.is_initialized())
    if rank0:  # completion marker last, then the tracker (what Megatron's loader looks at)
        (iter_dir / MARKER).write_text(json.dumps({"sharded_backend": "torch_dist",
                                                   "sharded_backend_version": 1}))
        (Path(run_dir) / TRACKER).write_text(str(step))
    if dist.is_initialized():
        dist.barrier()
    return iter_dir


class _Writer(FileSystemWriter):
    """Records the checkpoint id as a str, as Megatron's files do: DCP's default pickles a
    ``PosixPath`` into ``.metadata``, which allowlisted readers (ours, mhc-convert's) refuse."""

    def storage_meta(self) -> StorageMeta | None:
        meta = super().storage_meta()
        if meta is not None:
            meta.checkpoint_id = str(meta.checkpoint_id)
        return meta


# ------------------------------------------------------------------------------------- load
class SafeFileSystemReader(FileSystemReader):
    """``.metadata`` is raw pickle: read it with the allowlisted unpickler (DESIGN.md §5)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:

        path = Path(self.path) / ".metadata"
        md = safe_pickle_load(path.read_bytes(), source=path)
        if not isinstance(md, Metadata):
            raise ValueError(f"{path}: not a DCP Metadata")
        return md


class RemapLoadPlanner(DefaultLoadPlanner):
    """Load a destination dict keyed by *our* names from items stored under other names.

    ``rename`` maps destination key -> stored key (identity where absent). Destination tensors
    are usually views into live parameters/moments, so DCP's ``copy_`` lands in place; byte
    items are decoded with the allowlisted ``torch.load`` instead of DCP's ``weights_only=False``.
    """

    def __init__(self, rename: Mapping[str, str]):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False,
                         allow_partial_load=False)
        self.rename = dict(rename)
        self.dest: dict[str, Any] = {}
        self.back: dict[str, str] = {}

    def set_up_planner(self, state_dict: dict[str, Any], metadata: Metadata | None = None,
                       is_coordinator: bool = False) -> None:
        self.dest = state_dict
        self.back = {self.rename.get(k, k): k for k in state_dict}
        if len(self.back) != len(state_dict):
            raise ValueError("two destination keys map to the same stored key")
        stored = {self.rename.get(k, k): v for k, v in state_dict.items()}
        super().set_up_planner(stored, metadata, is_coordinator)

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:

        fqn = read_item.dest_index.fqn
        self.dest[self.back[fqn]] = safe_torch_load(value.getvalue(), source="torch_dist",
                                                    key=fqn)


def resolve(path: str | Path) -> Path:
    """A run directory (tracker) or an iteration directory -> the iteration directory."""
    p = Path(path)
    if (p / TRACKER).is_file() and not (p / ".metadata").exists():
        p = p / iter_dir_name(int((p / TRACKER).read_text().strip()))
    if not (p / ".metadata").is_file() or not (p / MARKER).is_file():
        raise FileNotFoundError(f"{p}: not a complete torch_dist checkpoint (.metadata and "
                                f"{MARKER} required)")
    return p


def _load(iter_dir: Path, dest: dict[str, Any], rename: Mapping[str, str]) -> dict[str, Any]:
    with _quiet():
        dcp.load(dest, storage_reader=SafeFileSystemReader(str(iter_dir)),
                 planner=RemapLoadPlanner(rename), no_dist=not dist.is_initialized())
    return dest


def read_common(path: str | Path) -> dict[str, Any]:
    """The common state: the ``common_state`` item (megatron-core >= 0.19) or ``common.pt``."""
    iter_dir = resolve(path)
    if (iter_dir / COMMON_PT).is_file():
        out = [safe_torch_load(iter_dir / COMMON_PT, source=iter_dir / COMMON_PT)]
    else:
        out = _load(iter_dir, {COMMON_KEY: None}, {})[COMMON_KEY]
    if not isinstance(out, list) or len(out) != 1 or not isinstance(out[0], dict):
        raise ValueError(f"{path}: {COMMON_KEY} is not a one-element list holding a dict")
    return out[0]


def config_from_common(common: Mapping[str, Any]) -> HybridConfig:
    """Our stored config when present (it has fields Megatron args lack), with every mHC field
    that args carry taken from args: ``mhc-convert`` flips those, never our copy."""
    meta = common.get(MHC_META_KEY)
    from_args = config_from_megatron_args(common["args"], meta)
    if CONFIG_KEY not in common:
        return from_args
    ours = HybridConfig.from_dict(common[CONFIG_KEY])
    a, m = common["args"], from_args.mhc
    flips = {f.name: getattr(m, f.name) for f in dataclasses.fields(m)
             if hasattr(a, f.name) or (isinstance(meta, dict) and f.name in meta)
             or f.name in ("enable_hyper_connections", "num_residual_streams")}
    return ours.with_mhc(**flips)


def dist_config(path: str | Path) -> HybridConfig:
    """The config of a torch_dist checkpoint. Megatron records no output contract: without
    our stored config, the learned head's keys (``decoder.hc_head_*``) say it is learned."""
    common = read_common(path)
    cfg = config_from_common(common)
    if cfg.mhc_on and CONFIG_KEY not in common and not isinstance(common.get(MHC_META_KEY), dict):
        md = SafeFileSystemReader(str(resolve(path))).read_metadata()
        if head_key("hc_head_fn") in md.state_dict_metadata:
            cfg = cfg.with_mhc(mhc_output_contract="learned")
    return cfg


def _stored_sources(md: Metadata, cfg: HybridConfig) -> dict[str, Source]:
    """Model-space names present on disk (our names: splits merged, stacks expanded, aliases
    resolved) -> where each is stored."""
    return model_sources((k for k, v in md.state_dict_metadata.items()
                          if isinstance(v, TensorStorageMetadata)
                          and not k.startswith("optimizer.")), cfg)


class _Destinations:
    """The DCP destination dict: model-named views into the live tensors (a factory split is a
    set of row views), mapped to the stored names; a stacked stored tensor is loaded once into
    a temporary and its rows copied into place afterwards (``finish``)."""

    def __init__(self, cfg: HybridConfig, md: Metadata):
        self.cfg, self.md = cfg, md
        self.dest: dict[str, Any] = {}
        self.rename: dict[str, str] = {}
        self.rows: list[tuple[Tensor, str, int]] = []

    def add(self, name: str, t: Tensor, src: Source, prefix: str = "") -> None:
        """``prefix``: the optimizer namespace of a moment. KeyError(stored name) when a stored
        item is absent."""
        missing = [prefix + p for p in src.parts if prefix + p not in self.md.state_dict_metadata]
        if missing:
            raise KeyError(missing[0])
        if src.index is not None:
            stored = prefix + src.parts[0]
            if stored not in self.dest:
                sm = self.md.state_dict_metadata[stored]
                self.dest[stored] = torch.empty(tuple(sm.size), dtype=sm.properties.dtype)
            self.rows.append((t, stored, src.index))
            return
        views = disk_views(self.cfg, name, t)
        if len(views) != len(src.parts):
            raise ValueError(f"{name!r} is stored as {list(src.parts)}, not as {len(views)} "
                             f"items")
        for (k, v), stored in zip(views.items(), src.parts):
            self.dest[prefix + k], self.rename[prefix + k] = v, prefix + stored

    def finish(self) -> None:
        for t, stored, i in self.rows:
            t.copy_(self.dest[stored][i])


@torch.no_grad()
def load_dist(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
              *, strict: bool = True, restore_rng: bool = False) -> dict[str, Any]:
    """Load model (and optimizer) state in place from a torch_dist checkpoint of either layout,
    ours or Megatron's (its spellings, splits and stacked experts: ``codec.model_sources``).
    Returns the common state (``iteration``, ``args``, ...)."""
    cfg: HybridConfig = model.config
    iter_dir = resolve(path)
    md = SafeFileSystemReader(str(iter_dir)).read_metadata()
    sources = _stored_sources(md, cfg)
    stored = set(sources)
    plan = plan_for_model(dict.fromkeys(stored), cfg)  # the toggle, when layouts differ
    if plan is not None and plan.reshapes:  # an MTP projection built from two stored tensors
        raise ToggleError(f"{path}: toggling mHC on an MTP checkpoint reshapes "
                          f"{plan.reshapes[0].srcs[0]}; convert it with mhc-convert first")
    source_of = {r.dst: r.src for r in plan.renames} if plan else {k: k for k in stored}
    common = read_common(iter_dir)

    own = model.state_dict(keep_vars=True)
    dest = _Destinations(cfg, md)
    fills: dict[str, Tensor] = values_for(plan.adds, cfg) if plan else {}
    new_names: set[str] = set()
    for name, t in own.items():
        src = source_of.get(name)
        if src is None:
            if name in fills:
                new_names.add(name)
                continue
            if strict:
                raise KeyError(f"{iter_dir}: no stored value for {name!r}")
            continue
        dest.add(name, t.detach(), sources[src])
    consumed = {source_of[n] for n in own if n in source_of}
    extra = sorted(stored - consumed)
    if plan is not None and plan.drops:  # disable: the mHC tensors must allow an exact drop
        hc = list(plan.model_drops())
        values = _load(iter_dir, {k: torch.empty(tuple(md.state_dict_metadata[k].size),
                                                 dtype=torch.float32) for k in hc}, {})
        check_disable_exact(cfg, values)
        extra = [k for k in extra if k not in values]
    if extra and strict:
        raise KeyError(f"{iter_dir}: stored model keys the model does not have: {extra[:5]}")

    if optimizer is not None:
        _prepare_optimizer_state(optimizer, model)
        for name, p in model.named_parameters():
            if name in new_names:
                continue  # fresh zero moments (DESIGN.md §5)
            st = optimizer.state[p]
            for s in MOMENTS:
                prefix = f"optimizer.state.{s}."
                try:
                    dest.add(name, st[s], sources[source_of[name]], prefix)
                except KeyError as e:
                    raise KeyError(f"{iter_dir}: no optimizer state {e.args[0]!r}; load with "
                                   "optimizer=None to start the optimizer afresh") from None
    _load(iter_dir, dest.dest, dest.rename)
    dest.finish()
    for name in new_names:
        own[name].copy_(fills[name])
    if optimizer is not None:
        _apply_param_groups(optimizer, common)
    if restore_rng:
        rng = _load(iter_dir, {RNG_KEY: None}, {})[RNG_KEY][0][0]
        torch.set_rng_state(rng["torch_rng_state"])
        random.setstate(rng["random_rng_state"])
        if "cuda_rng_state" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda_rng_state"])
    return common


def _prepare_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
    """Adam state for every parameter (zeros), so stored moments can be loaded in place."""
    for p in model.parameters():
        optimizer.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                              "exp_avg_sq": torch.zeros_like(p)}


def _apply_param_groups(optimizer: torch.optim.Optimizer, common: Mapping[str, Any]) -> None:
    """Megatron keeps one step per param group; a new parameter joins its group's count."""
    groups = common.get("optimizer", {}).get("param_groups", [])
    if len(groups) != len(optimizer.param_groups):
        raise ValueError(f"checkpoint has {len(groups)} optimizer param groups, the optimizer "
                         f"{len(optimizer.param_groups)}")
    for saved, group in zip(groups, optimizer.param_groups):
        for k in ("lr", "weight_decay", "eps"):
            if k in saved:
                group[k] = saved[k]
        if "betas" in saved:
            group["betas"] = tuple(saved["betas"])
        for p in group["params"]:
            optimizer.state[p]["step"] = torch.tensor(float(saved.get("step", 0)))


__all__ = ["RemapLoadPlanner", "SafeFileSystemReader", "ToggleError", "config_from_common",
           "dist_config", "load_dist", "read_common", "resolve", "save_dist", "state_for_save"]
