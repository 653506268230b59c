"""The convention an enabled Megatron checkpoint was converted for is read back from it (our
metadata beside Megatron's args, ``with_mhc_meta``), for every convention and both Megatron
formats: a resumed run, ``inspect`` and ``disable`` must all see the math the new mHC
parameters were initialised for, not the default of the args' branch."""

from __future__ import annotations

import pytest

from fixtures.hostile_sources import build_legacy, copy_megatron
from mhc_convert import engine
from mhc_convert.adapters import detect
from mhc_model.conventions import CONVENTIONS

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.mark.parametrize("fmt", ["torch_dist", "torch_legacy"])
@pytest.mark.parametrize("convention", sorted(CONVENTIONS))
def test_enabled_checkpoint_records_its_convention(tmp_path, fmt, convention):
    src = copy_megatron(tmp_path) if fmt == "torch_dist" else build_legacy(tmp_path)
    out = tmp_path / "on"
    engine.enable(src, out, convention=convention, contract="learned", streams=3)
    assert engine.inspect(out).convention == convention
    adapter = detect(out)
    mhc = adapter.config(adapter.read(out)).mhc
    assert (mhc.mhc_convention, mhc.num_residual_streams, mhc.mhc_output_contract) == \
        (convention, 3, "learned")
