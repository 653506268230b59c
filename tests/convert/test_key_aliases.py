"""megatron-core 0.19's module state dict spells the Mamba conv ``mixer.conv1d_weight`` /
``mixer.conv1d_bias`` (legacy .pt files); torch_dist stores ``mixer.conv1d.weight``. Both are
accepted, kept as spelled through a round trip, and load into the model."""

import torch
from safetensors.torch import load_file, save_file

import mhc_convert
from mhc_convert.parity import compare_checkpoints, load_model
from mhc_model import HybridModel
from tests.model.helpers import tiny_config


def test_conv1d_underscore_spelling_round_trips(tmp_path):
    torch.manual_seed(0)
    model = HybridModel(tiny_config("M-M*"))
    src = tmp_path / "src"
    model.save_pretrained(src)
    state = load_file(str(src / "model.safetensors"))
    renamed = {k.replace("mixer.conv1d.weight", "mixer.conv1d_weight")
                .replace("mixer.conv1d.bias", "mixer.conv1d_bias"): v for k, v in state.items()}
    assert renamed.keys() != state.keys()
    save_file(renamed, str(src / "model.safetensors"), metadata={"format": "pt"})

    mhc_convert.enable(src, tmp_path / "on")
    on_keys = load_file(str(tmp_path / "on" / "model.safetensors")).keys()
    assert "decoder.layers.0.inner_layer.mixer.conv1d_weight" in on_keys
    assert compare_checkpoints(src, tmp_path / "on")["max_abs"] <= 1e-5
    mhc_convert.disable(tmp_path / "on", tmp_path / "back")
    back = load_file(str(tmp_path / "back" / "model.safetensors"))
    assert back.keys() == renamed.keys()
    assert all(torch.equal(back[k], renamed[k]) for k in renamed)
    loaded = load_model(src)
    assert torch.equal(loaded.decoder.layers[0].mixer.conv1d.weight,
                       model.decoder.layers[0].mixer.conv1d.weight)


def test_model_load_state_dict_accepts_megatron_module_spelling():
    torch.manual_seed(0)
    model = HybridModel(tiny_config("M-*"))
    state = {k.replace("mixer.conv1d.weight", "mixer.conv1d_weight"): v
             for k, v in model.state_dict().items()}
    fresh = HybridModel(tiny_config("M-*"))
    fresh.load_state_dict(state, strict=True)
    assert torch.equal(fresh.decoder.layers[0].mixer.conv1d.weight,
                       model.decoder.layers[0].mixer.conv1d.weight)
    on = HybridModel(tiny_config("M-*", mhc=True))
    on.load_state_dict(state, strict=True)  # alias + in-process toggle together
