"""dp_reshardable optimizer state carried by the torch_dist adapter (``formats.dp_optim``).

(a) Megatron's own fixtures (``fixtures/megatron/make_optim.py``, Megatron's DDP + distributed
    optimizer on a GPU): our unpacking of the ``dp_reshardable`` save equals Megatron's own
    ``fully_reshardable`` save of the same state, bitwise, for every parameter and moment; the
    common state's param groups too; ``enable`` carries them.
(b) Synthetic re-packs (``dp_synth``): DP >= 2 layouts, several buckets, refusals.
"""

from __future__ import annotations

import argparse
import json

import pytest
import torch

import mhc_convert
from mhc_convert.adapters.torch_dist import TorchDistAdapter
from mhc_convert.errors import InvalidInputError
from mhc_convert.formats.torch_dist import read_torch_dist
from tests.convert import dp_synth
from tests.paths import ROOT

DEV = ROOT / "fixtures" / "external" / "megatron-dev-d48bd6be"
CASES = ("fp32_buckets", "bf16")


def _opt(view) -> dict[str, torch.Tensor]:
    return {k: view.load(k) for k in view.entries if k.startswith("optimizer.state.")}


@pytest.mark.parametrize("case", CASES)
def test_unpacked_equals_megatrons_fully_reshardable(case):
    dp = TorchDistAdapter().read(DEV / f"optim_{case}_dp")
    full = read_torch_dist(DEV / f"optim_{case}_full")
    assert read_torch_dist(DEV / f"optim_{case}_dp").meta["optimizer_sharding"] == \
        "dp_reshardable"
    assert full.meta["optimizer_sharding"] == "fully_reshardable"
    ours, theirs = _opt(dp), _opt(full)
    assert sorted(ours) == sorted(theirs) and len(ours) > 0
    for k, t in theirs.items():
        assert ours[k].dtype == t.dtype and torch.equal(ours[k], t), k
    # model weights identical in both saves; our common optimizer state is Megatron's
    for k, e in full.entries.items():
        if e.kind == "tensor" and not k.startswith("optimizer."):
            assert torch.equal(dp.load(k), full.load(k)), k
    mine, megatron = dp.meta["common_state"], full.meta["common_state"]
    assert mine["optimizer"] == megatron["optimizer"]
    assert mine["content_metadata"]["distrib_optim_sharding_type"] == "fully_reshardable"
    TorchDistAdapter().check(dp, None, None, None)  # every fp32 main copy is its weight


def test_enable_carries_megatrons_moments(tmp_path):
    a, b = tmp_path / "from_dp", tmp_path / "from_full"
    mhc_convert.enable(DEV / "optim_fp32_buckets_dp", a)
    mhc_convert.enable(DEV / "optim_fp32_buckets_full", b)
    va, vb = read_torch_dist(a), read_torch_dist(b)
    assert va.meta["optimizer_sharding"] == "fully_reshardable"
    oa, ob = _opt(va), _opt(vb)
    assert sorted(oa) == sorted(ob)
    assert any(".inner_layer." in k for k in oa) and any(".hyper_connection." in k for k in oa)
    for k in ob:
        assert torch.equal(oa[k], ob[k]), k


def test_status_has_the_next_loss():
    status = json.loads((DEV / "optim_status.json").read_text())
    for case in CASES:
        assert isinstance(status[case]["next_loss"], float), case


# ------------------------------------------------------------------------------- synthetic
@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    return dp_synth.reference(tmp_path_factory.mktemp("ref"))


@pytest.mark.parametrize("dp,bucket", [(1, None), (2, 3000), (3, 700), (16, 20000)])
def test_synthetic_round_trip(ref, tmp_path, dp, bucket):
    packed = dp_synth.repack(ref, tmp_path / "dp", dp=dp, bucket_size=bucket)
    view = TorchDistAdapter().read(packed)
    TorchDistAdapter().check(view, None, None, None)
    want = read_torch_dist(ref)
    ours = _opt(view)
    for k, t in _opt(want).items():
        name, model_key = k.split(".", 3)[2], k.split(".", 3)[3]
        mine = ours[f"optimizer.state.{'param' if name == 'fp32_param' else name}.{model_key}"]
        assert torch.equal(mine, t), k
    out = tmp_path / "on"
    report = mhc_convert.enable(packed, out)
    assert "carried" in report.optimizer
    assert read_torch_dist(out).meta["optimizer_sharding"] == "fully_reshardable"


def test_synthetic_wrong_layout_refused(ref, tmp_path):
    packed = dp_synth.repack(ref, tmp_path / "dp", dp=2, bucket_size=3000)
    view = read_torch_dist(packed)
    args = view.meta["common_state"]["args"]
    for field, value, match in (("ddp_bucket_size", 2000, "buckets"),
                                ("overlap_grad_reduce", False, "buckets"),
                                ("use_precision_aware_optimizer", True, "not modelled")):
        bad = argparse.Namespace(**{**vars(args), field: value})
        view.meta["common_state"]["args"] = bad
        adapter = TorchDistAdapter()
        with pytest.raises(InvalidInputError, match=match):
            from mhc_convert.adapters.torch_dist import _unpacked_view

            view.meta["megatron_args"] = bad
            _unpacked_view(view, adapter.config(view))


def test_synthetic_swapped_contents_caught_by_verify(ref, tmp_path):
    """Same layout, wrong contents (two parameters' bucket slices exchanged): the fp32 main
    copy check refuses before anything is written."""
    packed = dp_synth.repack(ref, tmp_path / "dp", dp=1, bucket_size=None)
    view = TorchDistAdapter().read(packed)
    unpacked = view.meta["dp_unpacked"]
    keys = [k for k in unpacked.entries if k.startswith("optimizer.state.param.")
            and unpacked.entries[k].shape == (32,)]
    a, b = keys[0], keys[1]
    ea, eb = unpacked.entries[a], unpacked.entries[b]
    unpacked.entries[a], unpacked.entries[b] = (ea.__class__(**{**ea.__dict__,
                                                               "locator": eb.locator}),
                                                eb.__class__(**{**eb.__dict__,
                                                               "locator": ea.locator}))
    with pytest.raises(InvalidInputError, match="fp32 main copy"):
        TorchDistAdapter().check(view, None, None, None)


def test_drop_optimizer_still_works(ref, tmp_path):
    packed = dp_synth.repack(ref, tmp_path / "dp", dp=2)
    out = tmp_path / "on"
    mhc_convert.enable(packed, out, drop_optimizer=True)
    assert not any(k.startswith("optimizer.") for k in read_torch_dist(out).entries)
