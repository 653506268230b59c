"""Toggling mHC mid-training (mhc_model.train): exact resume, toggle on by both routes (offline
``mhc-convert enable`` + resume, in-process resume into an mHC-on model), toggle straight back off.
Checkpoints in both formats (native, torch_dist). fp32 on CPU, tiny models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import mhc_convert
from mhc_model import HybridModel
from mhc_model.toggle.codec import is_mhc_param, unwrap
from mhc_model.train import TrainConfig, Trainer, is_decreasing
from tests.model.helpers import tiny_config

PATTERN = "*-"
TCFG = TrainConfig(lr=1e-2, batch=4, seq=16, seed=3)
SAVE_AT, TOTAL = 10, 20


def _run(tmp: Path, pattern: str, tcfg: TrainConfig, save_at: int, total: int,
         **mhc) -> dict:
    """An uninterrupted mHC-off run that checkpoints (both formats) at ``save_at``; returns its
    losses, the checkpoint paths and a snapshot of the optimizer state at the checkpoint."""
    torch.manual_seed(0)
    tr = Trainer(HybridModel(tiny_config(pattern, **mhc)), tcfg)
    losses = tr.train(save_at)
    paths = tr.save(tmp)
    snap = {n: {s: tr.optimizer.state[p][s].clone() for s in ("exp_avg", "exp_avg_sq")}
            for n, p in tr.model.named_parameters()}
    params = {k: v.clone() for k, v in tr.model.state_dict().items()}
    losses += tr.train(total - save_at)
    return {"losses": losses, "paths": paths, "moments": snap, "params": params,
            "cfg": tr.model.config}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("base"), PATTERN, TCFG, SAVE_AT, TOTAL)


def _toggle_on(base: dict, fmt: str, route: str, tmp: Path) -> Trainer:
    ckpt = base["paths"][fmt]
    on_cfg = base["cfg"].with_mhc(enable_hyper_connections=True)
    if route == "offline":
        src = ckpt if fmt == "native" else ckpt.parent  # torch_dist: the run directory
        tmp.mkdir(parents=True, exist_ok=True)
        mhc_convert.enable(src, tmp / "on", streams=on_cfg.mhc.num_residual_streams)
        tr = Trainer.resume(tmp / "on")
        assert tr.model.config.mhc_on
        return tr
    return Trainer.resume(ckpt, config=on_cfg)


def _check_toggled_on(tr: Trainer, base: dict, save_at: int) -> None:
    assert tr.iteration == save_at
    n_new = 0
    for name, p in tr.model.named_parameters():
        st = tr.optimizer.state[p]
        assert st["step"].item() == save_at
        if is_mhc_param(name):  # new: zero moments
            n_new += 1
            assert not st["exp_avg"].any() and not st["exp_avg_sq"].any(), name
            continue
        want = base["moments"][unwrap(name)]
        for s in ("exp_avg", "exp_avg_sq"):  # carried: bit for bit
            assert st[s].dtype == want[s].dtype and torch.equal(st[s], want[s]), (name, s)
        assert torch.equal(p.detach(), base["params"][unwrap(name)]), name
    assert n_new == 5 * tr.model.config.num_layers


def test_resume_reproduces_uninterrupted_run(base):
    for fmt in ("native", "torch_dist"):
        tr = Trainer.resume(base["paths"][fmt])
        assert tr.iteration == SAVE_AT
        assert tr.train(TOTAL - SAVE_AT) == base["losses"][SAVE_AT:], fmt  # exactly


def test_resume_from_run_directory_and_tracker(base):
    tr = Trainer.resume(base["paths"]["torch_dist"].parent)
    assert tr.train(2) == base["losses"][SAVE_AT:SAVE_AT + 2]


def _same_training_state(a: Trainer, b: Trainer) -> None:
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    for (na, pa), (nb, pb) in zip(a.model.named_parameters(), b.model.named_parameters()):
        assert na == nb
        for s in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(a.optimizer.state[pa][s], b.optimizer.state[pb][s]), (na, s)


@pytest.mark.parametrize("fmt", ["native", "torch_dist"])
def test_toggle_on_both_routes(base, fmt, tmp_path):
    """Offline (mhc-convert enable, resume) and in-process (resume into an mHC-on model) give
    the same parameters, moments and step bit for bit, so one 50-step run covers both."""
    off_loss = Trainer.resume(base["paths"][fmt]).loss().item()
    offline = _toggle_on(base, fmt, "offline", tmp_path / "a")
    inproc = _toggle_on(base, fmt, "inprocess", tmp_path / "b")
    for tr in (offline, inproc):
        _check_toggled_on(tr, base, SAVE_AT)
    _same_training_state(offline, inproc)
    tr = offline if fmt == "native" else inproc
    losses = tr.train(50)
    assert abs(losses[0] - off_loss) <= 1e-5  # same batch, function-preserving enable
    assert is_decreasing(losses), losses


@pytest.mark.parametrize("fmt", ["native", "torch_dist"])
@pytest.mark.parametrize("route", ["offline", "inprocess"])
def test_toggle_off_right_after_on(base, fmt, route, tmp_path):
    on = _toggle_on(base, fmt, route, tmp_path)
    if route == "offline":
        on_path = tmp_path / "on"
        mhc_convert.disable(on_path, tmp_path / "off")
        off = Trainer.resume(tmp_path / "off")
    else:
        saved = on.save(tmp_path / "saved", (fmt,))[fmt]
        off = Trainer.resume(saved, config=base["cfg"])
    assert not off.model.config.mhc_on
    for k, v in off.model.state_dict().items():
        assert torch.equal(v, base["params"][k]), k
    assert off.train(TOTAL - SAVE_AT) == base["losses"][SAVE_AT:]


def test_every_symbol_goes_through_the_whole_story(tmp_path):
    """M, G, *, D, -, E: exact resume, toggle on (offline torch_dist, in-process native), first
    loss preserved, moments carried, 50 decreasing steps, toggle off exact."""
    pattern, tcfg, save_at, total = "MG*D-E", TrainConfig(lr=1e-2, batch=2, seq=8, seed=5), 3, 6
    # 5 Sinkhorn iterations instead of 20 keep this CPU test fast; the matrix above uses 20
    b = _run(tmp_path / "base", pattern, tcfg, save_at, total, mhc_sinkhorn_iterations=5)
    for fmt in ("native", "torch_dist"):
        assert Trainer.resume(b["paths"][fmt]).train(total - save_at) == b["losses"][save_at:]
    off_loss = Trainer.resume(b["paths"]["native"]).loss().item()
    offline = _toggle_on(b, "torch_dist", "offline", tmp_path / "a")
    inproc = _toggle_on(b, "native", "inprocess", tmp_path / "b")
    for tr in (offline, inproc):
        _check_toggled_on(tr, b, save_at)
    _same_training_state(offline, inproc)  # both routes: the same model and optimizer state
    off_back = Trainer.resume(inproc.save(tmp_path / "c", ("torch_dist",))["torch_dist"],
                              config=b["cfg"])
    assert off_back.train(total - save_at) == b["losses"][save_at:]
    losses = inproc.train(50)
    assert abs(losses[0] - off_loss) <= 1e-5
    assert is_decreasing(losses), losses
