"""mhc-convert on native checkpoints with MTP depths: enable/disable round trip bitwise (the
MTP input projection split and joined), main logits kept, and the refusal where the norm before
an MTP depth is not uniform (``verdict.check_mtp_norms``) unless ``allow_lossy``.
Megatron-written MTP fixtures (torch_dist):
test_megatron_mtp_fixtures.py and test_megatron_fixtures.py."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import mhc_convert
from mhc_convert.errors import VerificationError
from mhc_model import HybridConfig, HybridModel

CFG = HybridConfig(hybrid_layer_pattern="M*-E/*-/*-", hidden_size=32, vocab_size=64)


def test_enable_disable_round_trip_bitwise(tmp_path):
    model = HybridModel(CFG)
    model.save_pretrained(tmp_path / "off")
    report = mhc_convert.enable(tmp_path / "off", tmp_path / "on")
    assert report.plan["reshaped"] == 2
    on = HybridModel.from_pretrained(tmp_path / "on")
    assert on.config.mtp_num_depths == 2 and on.config.mhc_on
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(ids) - on(ids)).abs().max().item() <= 1e-5
    mhc_convert.disable(tmp_path / "on", tmp_path / "back")
    a = load_file(str(tmp_path / "off" / "model.safetensors"))
    b = load_file(str(tmp_path / "back" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_non_uniform_final_norm_refused_unless_lossy(tmp_path):
    model = HybridModel(CFG)
    with torch.no_grad():
        model.decoder.final_norm.weight.mul_(torch.linspace(0.9, 1.1, 32))
    model.save_pretrained(tmp_path / "off")
    with pytest.raises(VerificationError, match="MTP logits change"):
        mhc_convert.enable(tmp_path / "off", tmp_path / "on")
    assert not (tmp_path / "on").exists()
    report = mhc_convert.enable(tmp_path / "off", tmp_path / "on", allow_lossy=True)
    assert any(n.startswith("LOSSY: MTP logits change") for n in report.notes)


@pytest.mark.parametrize("direction", ["enable", "disable"])
def test_nan_in_the_mtp_projection_is_refused(tmp_path, direction):
    """The split/joined MTP projections are written as new values, not copies: their sources
    are checked for NaN/Inf before anything is written, like every carried tensor."""
    from safetensors.torch import save_file

    from mhc_convert.errors import InvalidInputError

    HybridModel(CFG).save_pretrained(tmp_path / "off")
    src = tmp_path / "off"
    if direction == "disable":
        mhc_convert.enable(src, tmp_path / "on")
        src = tmp_path / "on"
    state = load_file(str(src / "model.safetensors"))
    key = next(k for k in state if k.startswith("mtp.layers.1.") and
               k.endswith(("eh_proj.weight", "e_proj.weight")))
    state[key] = state[key].clone()
    state[key].view(-1)[3] = float("nan")
    save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(InvalidInputError, match="NaN") as e:
        getattr(mhc_convert, direction)(src, tmp_path / "out")
    assert e.value.key == key and not (tmp_path / "out").exists()
