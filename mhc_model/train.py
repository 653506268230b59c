"""A small real trainer: AdamW on a deterministic synthetic token task, periodic checkpoints in
both formats (native and Megatron ``torch_dist``), exact resume, and resume across an mHC toggle.

Exact resume rests on three things: the batch for step k is a pure function of (seed, k); the
checkpoint carries parameters, Adam moments and step bit for bit; the torch RNG state is saved.

Native checkpoint (the layout ``mhc-convert`` reads and writes)::

    config.json  model.safetensors  optimizer.safetensors  training_state.json

``optimizer.safetensors`` holds ``optimizer.state.{exp_avg,exp_avg_sq}.<model key>``: keyed by
name, so the state follows a parameter through a layout change. Adam's step is one count per
param group (as in Megatron); a parameter a toggle adds joins it with zero moments.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor

from mhc_model import checkpoint as dist_ckpt
from mhc_model.config import HybridConfig
from mhc_model.errors import UsageError
from mhc_model.megatron_files import MARKER
from mhc_model.model import CONFIG_NAME, HybridModel
from mhc_model.shim import carried_and_new

OPTIMIZER_NAME = "optimizer.safetensors"
TRAINING_STATE_NAME = "training_state.json"
MOMENTS = ("exp_avg", "exp_avg_sq")


@dataclass(frozen=True)
class TrainConfig:
    lr: float = 3e-3
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.0
    batch: int = 4
    seq: int = 16
    seed: int = 0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        d = dict(d)
        d["betas"] = tuple(d["betas"])
        return cls(**d)


def synthetic_batch(vocab: int, tcfg: TrainConfig, step: int) -> tuple[Tensor, Tensor]:
    """Step ``step``'s batch: sequences following x[t+1] = (5 x[t] + 3) mod V from a random start.
    Each next token is a fixed function of the current one, so even a tiny model learns it, and
    the batch depends only on (seed, step): a resumed run sees exactly the batches it would have."""
    g = torch.Generator().manual_seed(tcfg.seed * 1_000_003 + step)
    x = torch.empty(tcfg.batch, tcfg.seq + 1, dtype=torch.long)
    x[:, 0] = torch.randint(0, vocab, (tcfg.batch,), generator=g)
    for t in range(tcfg.seq):
        x[:, t + 1] = (5 * x[:, t] + 3) % vocab
    return x[:, :-1], x[:, 1:]


class Trainer:
    def __init__(self, model: HybridModel, tcfg: TrainConfig | None = None, *, iteration: int = 0):
        self.model, self.tcfg, self.iteration = model, tcfg or TrainConfig(), iteration
        t = self.tcfg
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=t.betas, eps=t.eps,
                                           weight_decay=t.weight_decay)

    # ---- steps --------------------------------------------------------------------------
    def loss(self, step: int | None = None) -> Tensor:
        ids, targets = synthetic_batch(self.model.config.vocab_size, self.tcfg,
                                       self.iteration if step is None else step)
        logits = self.model(ids).float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    def step(self) -> float:
        self.model.train()
        loss = self.loss()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # A parameter that got no gradient this step (an unrouted expert, the DSA indexer) gets
        # a zero one, as in Megatron's contiguous grad buffer: Adam then steps every parameter,
        # so all share one step count and every parameter has moments to checkpoint.
        for p in self.model.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self.optimizer.step()
        self.iteration += 1
        return loss.item()

    def train(self, steps: int, *, save_dir: str | Path | None = None, save_every: int = 0,
              formats: tuple[str, ...] = ("native", "torch_dist")) -> list[float]:
        """``steps`` steps; every ``save_every`` iterations a checkpoint per format under
        ``save_dir/native/iter_XXXXXXX`` and the torch_dist run dir ``save_dir/torch_dist``."""
        if save_dir is not None and save_every:
            self.check_save(save_dir, formats, [i for i in range(self.iteration + 1,
                                                                 self.iteration + steps + 1)
                                                if i % save_every == 0])
        losses = []
        for _ in range(steps):
            losses.append(self.step())
            if save_dir is not None and save_every and self.iteration % save_every == 0:
                self.save(save_dir, formats)
        return losses

    # ---- checkpoints --------------------------------------------------------------------
    @staticmethod
    def save_paths(save_dir: str | Path, formats: tuple[str, ...], iteration: int
                   ) -> dict[str, Path]:
        """Where ``save`` puts iteration ``iteration``: one directory per format."""
        name = dist_ckpt.iter_dir_name(iteration)
        return {fmt: Path(save_dir) / fmt / name for fmt in formats}

    def check_save(self, save_dir: str | Path, formats: tuple[str, ...],
                   iterations: list[int]) -> None:
        """Refuse, before any training step, to save where a checkpoint already is: a run
        must not train for an hour and then fail to save (or overwrite another run's files)."""
        for it in iterations:
            for fmt, path in self.save_paths(save_dir, formats, it).items():
                taken = path.exists() if fmt == "native" else (path / MARKER).exists()
                if taken:
                    raise UsageError(f"a checkpoint of iteration {it} is already there; save "
                                     f"somewhere else (another --out) or remove it first",
                                     path=path)

    def save(self, save_dir: str | Path, formats: tuple[str, ...] = ("native", "torch_dist")
             ) -> dict[str, Path]:
        out: dict[str, Path] = {}
        root = Path(save_dir)
        self.check_save(root, formats, [self.iteration])
        if "native" in formats:
            out["native"] = self.save_native(self.save_paths(root, ("native",),
                                                             self.iteration)["native"])
        if "torch_dist" in formats:
            out["torch_dist"] = dist_ckpt.save_dist(
                root / "torch_dist", self.model, self.optimizer, iteration=self.iteration,
                common_extra={"mhc_train": {"train": dataclasses.asdict(self.tcfg)}})
        return out

    def _group_step(self) -> int:
        steps = {int(self.optimizer.state[p]["step"].item()) for p in self.model.parameters()
                 if p in self.optimizer.state}
        if len(steps) > 1:
            raise RuntimeError(f"parameters disagree on the Adam step: {sorted(steps)}")
        return steps.pop() if steps else 0

    def save_native(self, directory: str | Path) -> Path:
        """Write to a sibling temp dir, then rename: a directory with config.json is complete.
        An existing ``directory`` is refused before anything is written."""
        final = Path(directory)
        if final.exists():
            raise UsageError("a checkpoint is already there; save somewhere else or remove it "
                             "first", path=final)
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        self.model.save_pretrained(tmp)
        names = dict(self.model.named_parameters())
        opt = {f"optimizer.state.{s}.{n}": self.optimizer.state[p][s].detach().contiguous()
               for n, p in names.items() if p in self.optimizer.state for s in MOMENTS}
        if opt:
            save_file(opt, str(tmp / OPTIMIZER_NAME), metadata={"format": "pt"})
        state = {"iteration": self.iteration, "optimizer_step": self._group_step(),
                 "train": dataclasses.asdict(self.tcfg),
                 "torch_rng_state": base64.b64encode(torch.get_rng_state().numpy().tobytes())
                 .decode("ascii")}
        (tmp / TRAINING_STATE_NAME).write_text(json.dumps(state, indent=2))
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, final)
        return final

    @classmethod
    def resume(cls, path: str | Path, *, config: HybridConfig | None = None,
               tcfg: TrainConfig | None = None, load_optimizer: bool = True) -> Trainer:
        """Resume from a native checkpoint directory or a torch_dist run/iteration directory.
        ``config`` (default: the checkpoint's) may differ in ``enable_hyper_connections``: the
        in-process toggle. mHC parameters a toggle adds start at the exact enable point with
        zero moments; a toggle off is allowed only where it is exact (``mhc_model.shim``)."""
        p = Path(path)
        if not p.exists():
            raise UsageError("no such file or directory", path=p)
        if (p / CONFIG_NAME).is_file():
            return cls._resume_native(p, config, tcfg, load_optimizer)
        return cls._resume_dist(p, config, tcfg, load_optimizer)

    @classmethod
    def _resume_native(cls, p: Path, config, tcfg, load_optimizer) -> Trainer:
        saved_cfg = HybridConfig.from_json((p / CONFIG_NAME).read_text())
        state = json.loads((p / TRAINING_STATE_NAME).read_text())
        trainer = cls(HybridModel(config or saved_cfg),
                      tcfg or TrainConfig.from_dict(state["train"]), iteration=state["iteration"])
        single = p / "model.safetensors"
        model_state = load_file(str(single)) if single.exists() else _load_sharded(p)
        trainer.model.load_state_dict(model_state, strict=True)  # the shim maps the layout
        if load_optimizer:
            opt = load_file(str(p / OPTIMIZER_NAME))
            trainer._install_moments(list(model_state),
                                     lambda s, k: opt[f"optimizer.state.{s}.{k}"],
                                     state["optimizer_step"])
        rng = base64.b64decode(state["torch_rng_state"])
        torch.set_rng_state(torch.frombuffer(bytearray(rng), dtype=torch.uint8).clone())
        return trainer

    @classmethod
    def _resume_dist(cls, p: Path, config, tcfg, load_optimizer) -> Trainer:
        common = dist_ckpt.read_common(p)
        saved_cfg = dist_ckpt.config_from_common(common)
        train = common.get("mhc_train", {}).get("train")
        trainer = cls(HybridModel(config or saved_cfg),
                      tcfg or (TrainConfig.from_dict(train) if train else TrainConfig()),
                      iteration=int(common["iteration"]))
        dist_ckpt.load_dist(p, trainer.model, trainer.optimizer if load_optimizer else None,
                            restore_rng=True)
        return trainer

    @torch.no_grad()
    def _install_moments(self, ckpt_keys: list[str], moment, step: int) -> None:
        """Adam state by name: carried parameters get their stored moments bit for bit, new
        mHC parameters zeros; every parameter gets the group's step."""
        carried, new = carried_and_new(self.model, ckpt_keys)
        for name, param in self.model.named_parameters():
            st = {"step": torch.tensor(float(step))}
            for s in MOMENTS:
                if name in carried:
                    value = moment(s, carried[name])
                    if value.shape != param.shape:
                        raise ValueError(f"{s} of {carried[name]!r}: shape {list(value.shape)}, "
                                         f"parameter {list(param.shape)}")
                    st[s] = value.to(param.dtype).clone()
                else:
                    st[s] = torch.zeros_like(param)
            self.optimizer.state[param] = st


def checkpoint_config(path: str | Path) -> HybridConfig:
    """The model config a native or torch_dist checkpoint describes."""
    p = Path(path)
    if not p.exists():
        raise UsageError("no such file or directory", path=p)
    if (p / CONFIG_NAME).is_file():
        return HybridConfig.from_json((p / CONFIG_NAME).read_text())
    return dist_ckpt.dist_config(p)


def _load_sharded(p: Path) -> dict[str, Tensor]:
    index = json.loads((p / "model.safetensors.index.json").read_text())
    out: dict[str, Tensor] = {}
    for name in sorted(set(index["weight_map"].values())):
        out.update(load_file(str(p / name)))
    return out


def is_decreasing(losses: list[float], window: int = 5) -> bool:
    """Finite, and the mean of the last ``window`` losses below the mean of the first."""
    return (all(math.isfinite(x) for x in losses)
            and sum(losses[-window:]) / window < sum(losses[:window]) / window)
