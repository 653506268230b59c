"""Exact disable with a constant H_post != 1 (DESIGN.md §4): the constant folds into each
layer's output projections; streams that differ or alphas != 0 still refuse."""

import pytest
import torch
from safetensors.torch import load_file, save_file

import mhc_convert
from mhc_convert.errors import VerificationError
from mhc_convert.parity import compare_checkpoints
from mhc_model import HybridModel
from tests.model.helpers import perturb_norms_, tiny_config

PATTERN = "M-*E"  # every kind of output projection: out_proj, linear_fc2, linear_proj, experts


def _enabled(tmp_path, contract="mean"):
    torch.manual_seed(0)
    model = HybridModel(tiny_config(PATTERN))
    perturb_norms_(model)
    model.save_pretrained(tmp_path / "off")
    mhc_convert.enable(tmp_path / "off", tmp_path / "on", contract=contract)
    return tmp_path / "on"


def _set_post_bias(ckpt, layers, value, n=4):
    path = ckpt / "model.safetensors"
    state = load_file(str(path))
    for i in layers:
        b = state[f"decoder.layers.{i}.hyper_connection.bias"].clone()
        b[n:2 * n] = value
        state[f"decoder.layers.{i}.hyper_connection.bias"] = b
    path.unlink()
    save_file(state, str(path), metadata={"format": "pt"})
    (ckpt / "mhc-manifest.json").unlink()  # we edited the files on purpose


@pytest.mark.parametrize("contract", ["mean", "learned"])
def test_constant_post_folds_exactly(tmp_path, contract):
    on = _enabled(tmp_path, contract)
    _set_post_bias(on, [0, 1, 2, 3], 0.7)  # H_post = 2 sigmoid(0.7) ~ 1.336 on every stream
    report = mhc_convert.disable(on, tmp_path / "back")
    assert any("folded" in note for note in report.notes)
    parity = compare_checkpoints(on, tmp_path / "back")
    assert parity["max_abs"] <= 1e-5, parity
    off = load_file(str(tmp_path / "off" / "model.safetensors"))
    back = load_file(str(tmp_path / "back" / "model.safetensors"))
    c = 2 * torch.sigmoid(torch.tensor(0.7)).item()
    w_in, w_out = off["decoder.layers.0.mixer.out_proj.weight"], \
        back["decoder.layers.0.mixer.out_proj.weight"]
    torch.testing.assert_close(w_out, w_in * c)
    assert torch.equal(off["decoder.layers.0.mixer.in_proj.weight"],
                       back["decoder.layers.0.mixer.in_proj.weight"])


def test_post_differing_between_streams_is_not_exact(tmp_path):
    on = _enabled(tmp_path)
    path = on / "model.safetensors"
    state = load_file(str(path))
    b = state["decoder.layers.2.hyper_connection.bias"].clone()
    b[4] = 0.5  # one stream's H_post differs
    state["decoder.layers.2.hyper_connection.bias"] = b
    path.unlink()
    save_file(state, str(path), metadata={"format": "pt"})
    with pytest.raises(VerificationError, match="differs between streams"):
        mhc_convert.disable(on, tmp_path / "back")
    assert not (tmp_path / "back").exists()


def test_fold_refuses_optimizer_state_without_drop(tmp_path):
    from mhc_model import checkpoint as C

    torch.manual_seed(0)
    model = HybridModel(tiny_config(PATTERN))
    opt = torch.optim.AdamW(model.parameters())
    C.save_dist(tmp_path / "off", model, opt, iteration=3)
    mhc_convert.enable(tmp_path / "off", tmp_path / "on")
    # raise every H_post to the same constant through the model loader, then save again
    on_model = HybridModel(tiny_config(PATTERN, mhc=True))
    C.load_dist(tmp_path / "on", on_model)
    with torch.no_grad():
        for layer in on_model.decoder.layers:
            layer.hyper_connection.bias[4:8] = 0.7
    C.save_dist(tmp_path / "on2", on_model, torch.optim.AdamW(on_model.parameters()),
                iteration=3)
    with pytest.raises(VerificationError, match="--drop-optimizer"):
        mhc_convert.disable(tmp_path / "on2", tmp_path / "back")
    report = mhc_convert.disable(tmp_path / "on2", tmp_path / "back", drop_optimizer=True)
    assert any("folded" in note for note in report.notes)
    assert compare_checkpoints(tmp_path / "on2", tmp_path / "back")["max_abs"] <= 1e-5


@pytest.mark.parametrize(("key", "folds"), [
    ("decoder.layers.3.mlp.experts.experts.linear_fc2.weight", True),  # torch_dist stack
    ("decoder.layers.3.mlp.experts.local_experts.2.linear_fc2.weight", True),  # SequentialMLP
    ("decoder.layers.3.mlp.experts.linear_fc2.weight1", True),
    ("decoder.layers.3.mlp.shared_experts.linear_fc2.weight", True),
    ("decoder.layers.3.mlp.experts.experts.linear_fc1.weight", False),
    ("decoder.layers.3.pre_mlp_layernorm.weight", False),
    ("decoder.layers.0.mixer.out_proj.weight", True),
    ("decoder.layers.0.norm.weight", False),
])
def test_output_projections_in_megatron_spellings(key, folds):
    from mhc_convert.engine import _is_output_projection

    assert _is_output_projection(tiny_config(PATTERN), key) is folds
