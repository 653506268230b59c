from __future__ import annotations

from pathlib import Path

import pytest

from mhc_model.model import HybridModel
from mhc_model.train import TrainConfig, Trainer
from tests.cli.helpers import make_native
from tests.model.helpers import tiny_config


@pytest.fixture
def src(tmp_path: Path) -> Path:
    return make_native(tmp_path / "src")


@pytest.fixture(scope="session")
def run(tmp_path_factory) -> Path:
    """A training run's --out root: native/iter_000000{1,2} and the torch_dist run directory
    torch_dist/ (tracker: 2). Read-only for the tests (copy before changing it)."""
    root = tmp_path_factory.mktemp("run") / "off"
    trainer = Trainer(HybridModel(tiny_config("M*-")), TrainConfig(batch=2, seq=8))
    for _ in range(2):
        trainer.step()
        trainer.save(root)
    return root
