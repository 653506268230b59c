"""``Trainer`` checks where it will save before it trains: saving over an existing checkpoint
is a one-line ``UsageError`` up front, never an ``OSError: Directory not empty`` after the
training ran (the README's in-process flow used to reuse one ``--out`` and crash that way)."""

from __future__ import annotations

import pytest

from examples import toggle_mhc
from mhc_model.errors import UsageError
from mhc_model.model import HybridModel
from mhc_model.train import TrainConfig, Trainer
from tests.model.helpers import tiny_config


def _trainer() -> Trainer:
    return Trainer(HybridModel(tiny_config("M*")), TrainConfig(batch=2, seq=8))


def test_save_native_refuses_an_existing_directory(tmp_path):
    t = _trainer()
    t.step()
    first = t.save_native(tmp_path / "iter_0000001")
    before = sorted(p.name for p in first.iterdir())
    with pytest.raises(UsageError, match="already there"):
        t.save_native(first)
    assert sorted(p.name for p in first.iterdir()) == before
    assert not (tmp_path / "iter_0000001.tmp").exists()


def test_train_checks_every_save_before_the_first_step(tmp_path):
    t = _trainer()
    t.step()
    t.save(tmp_path)  # iteration 1, both formats
    t2 = _trainer()
    with pytest.raises(UsageError, match="iteration 1 is already there") as e:
        t2.train(2, save_dir=tmp_path, save_every=1)
    assert t2.iteration == 0  # refused before training, not after
    assert e.value.path.endswith("iter_0000001")


def test_example_refuses_up_front_with_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    assert toggle_mhc.main(["--out", str(out), "--steps", "2", "--pattern", "M-"]) == 0
    capsys.readouterr()
    code = toggle_mhc.main(["--out", str(out), "--steps", "2", "--pattern", "M-"])
    err = capsys.readouterr()
    assert code == 2
    assert err.out == ""  # no training step ran
    lines = err.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("toggle_mhc: error: ") and \
        "iteration 2 is already there" in lines[0]


def test_resume_missing_path(tmp_path):
    with pytest.raises(UsageError, match="no such file or directory"):
        Trainer.resume(tmp_path / "nope")
