"""dp_reshardable optimizer state carried by the torch_dist adapter (``formats.dp_optim``).

(a) Megatron's own fixtures (``fixtures/megatron/make_optim.py``, Megatron's DDP + distributed
    optimizer on a GPU, three buckets): our unpacking of the ``dp_reshardable`` save gives every
    parameter's fp32 main copy bitwise equal to its weight, and explains Megatron's own
    ``fully_reshardable`` save of the same state bitwise: equal in the first bucket, and in the
    others shifted exactly as Megatron's save shifts them (an upstream bug, see
    ``_megatron_fully_reshardable_read``); the common state equals Megatron's; ``enable``
    carries the moments.
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
from mhc_model.toggle import codec as K
from tests.convert import dp_synth
from tests.paths import ROOT

DEV = ROOT / "fixtures" / "external" / "megatron-dev-d48bd6be"
CASE = "fp32_buckets"  # fp32, overlap_grad_reduce, three buckets (make_optim.py)


def _opt(view) -> dict[str, torch.Tensor]:
    return {k: view.load(k) for k in view.entries if k.startswith("optimizer.state.")}


def _megatron_fully_reshardable_read(unpacked, dp_view) -> dict[str, torch.Tensor]:
    """What Megatron dev's fully_reshardable save makes of the same bucket state, modelled with
    our layout: ``get_parameter_state_dp_zero`` concatenates the buckets *without* the padding
    between them (zeros in the 64-alignment gaps, ``distrib_optimizer.py:1366-1451``), then
    ``sharded_param_state_fully_reshardable`` slices that at each parameter's *padded* buffer
    range (``buffer.param_index_map``, ``:1826-1852``; dsv4 ``:1666``), zero-filling past the end
    (``:1854-1868``). From the second bucket on, every parameter is read shifted by the
    padding of the buckets before it: an upstream bug (only one bucket, Megatron's default
    without --overlap-grad-reduce, is unaffected)."""
    from mhc_convert.formats import dp_layout as L

    args = dp_view.meta["common_state"]["args"]
    params = [L.Param(name, sum(torch.Size(dp_view.entries[p].shape).numel() for p in parts),
                      dp_view.entries[parts[0]].dtype) for name, parts, _ in unpacked.params]
    (buf,) = L.optimizer_buffers(L.layout(params, L.settings_from_args(args, 0)))[0]
    out = {}
    for state in unpacked.states:
        zeros = [torch.zeros(b.numel_unpadded) for b in buf.buckets]
        for name, parts, _ in unpacked.params:
            b, start, end = buf.ranges[name]
            zeros[b][start:end] = torch.cat([dp_view.load(f"optimizer.state.{state}.{p}")
                                             .reshape(-1) for p in parts])
        world = torch.cat(zeros)
        for name, parts, _ in unpacked.params:
            b, start, end = buf.ranges[name]
            g = buf.buckets[b].start + start
            flat = world[g:g + end - start]
            flat = torch.nn.functional.pad(flat, (0, end - start - len(flat)))
            for p in parts:
                n = torch.Size(dp_view.entries[p].shape).numel()
                out[f"optimizer.state.{state}.{p}"] = flat[:n].view(dp_view.entries[p].shape)
                flat = flat[n:]
    return out


def test_unpacked_is_megatrons_state():
    """Megatron's dp_reshardable save unpacked by us: every fp32 main copy is bitwise its
    model weight (``verify``), and our layout reproduces every tensor of Megatron's own
    fully_reshardable save of the same state bitwise, its bucket shift included."""
    raw = read_torch_dist(DEV / f"optim_{CASE}_dp")
    assert raw.meta["optimizer_sharding"] == "dp_reshardable"
    assert sum(".bucket_idx_" in k and k.endswith(".param") for k in raw.entries) == 3
    dp = TorchDistAdapter().read(DEV / f"optim_{CASE}_dp")
    full = read_torch_dist(DEV / f"optim_{CASE}_full")
    assert full.meta["optimizer_sharding"] == "fully_reshardable"
    TorchDistAdapter().check(dp, None, None, None)  # every fp32 main copy is its weight
    ours, theirs = _opt(dp), _opt(full)
    assert sorted(ours) == sorted(theirs) and len(ours) == 78
    modelled = _megatron_fully_reshardable_read(dp.meta["dp_unpacked"], dp)
    same, shifted = 0, 0
    for k, t in theirs.items():
        assert ours[k].dtype == t.dtype and torch.equal(modelled[k], t), k
        same += torch.equal(ours[k], t)
        shifted += not torch.equal(ours[k], t)
    assert (same, shifted) == (12, 66)  # bucket 0 (4 tensors x 3 states) agrees; 1, 2 shifted
    # the shift is Megatron's: its fully_reshardable fp32 copy is not its own weight there
    w = "decoder.layers.2.mlp.linear_fc1.layer_norm_weight"
    assert torch.equal(ours[f"optimizer.state.param.{w}"], full.load(w))
    assert not torch.equal(theirs[f"optimizer.state.param.{w}"], full.load(w))
    # model weights identical in both saves; our common state is Megatron's fully_reshardable one
    for k, e in full.entries.items():
        if e.kind == "tensor" and not k.startswith("optimizer."):
            assert torch.equal(dp.load(k), full.load(k)), k
    mine, megatron = dp.meta["common_state"], full.meta["common_state"]
    assert mine["optimizer"] == megatron["optimizer"]
    assert mine["content_metadata"] == megatron["content_metadata"]
    assert {k: v for k, v in mine.items() if k != "args"} == {
        k: v for k, v in megatron.items() if k != "args"}


def test_enable_carries_megatrons_moments(tmp_path):
    out = tmp_path / "on"
    report = mhc_convert.enable(DEV / f"optim_{CASE}_dp", out)
    assert report.optimizer.startswith("carried: 78 tensors")
    src = TorchDistAdapter().read(DEV / f"optim_{CASE}_dp")
    got = read_torch_dist(out)
    assert got.meta["optimizer_sharding"] == "fully_reshardable"
    assert got.meta["common_state"]["optimizer"] == src.meta["common_state"]["optimizer"]
    opt = _opt(got)
    for k, t in _opt(src).items():
        state, model_key = K.split_opt(k)
        assert torch.equal(opt.pop(K.opt_key(state, K.wrap(model_key))), t), k
    assert opt and all(K.is_mhc_param(K.split_opt(k)[1]) for k in opt)
    for k, t in opt.items():  # new parameters: fp32 copy = value, zero moments
        state, model_key = K.split_opt(k)
        if state == "param":
            assert torch.equal(t, got.load(model_key).float()), k
        else:
            assert not t.any(), k


def test_status_has_the_next_loss():
    status = json.loads((DEV / "optim_status.json").read_text())[CASE]
    assert isinstance(status["next_loss"], float) and status["steps"] == 3


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


def test_unmodelled_layout_inspects_then_refuses(ref, tmp_path):
    """A layout not modelled (here a run that used the precision-aware optimizer) is named by
    inspect and refused by enable before anything is written; --drop-optimizer converts it."""
    packed = dp_synth.repack(ref, tmp_path / "dp", dp=2,
                             args_after={"use_precision_aware_optimizer": True})
    report = mhc_convert.inspect(packed)
    assert "cannot be carried" in report.optimizer, report.optimizer
    assert "use_precision_aware_optimizer" in report.optimizer
    with pytest.raises(InvalidInputError, match="use_precision_aware_optimizer = True"):
        mhc_convert.enable(packed, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    mhc_convert.enable(packed, tmp_path / "out", drop_optimizer=True)


def test_synthetic_disable_bf16_two_buffers(tmp_path):
    """An mHC-on bf16 run (mHC parameters fp32: a second gradient buffer, gbuf_idx_1),
    dp_reshardable: disable carries every moment back to the mHC-off keys bitwise."""
    ref = dp_synth.reference(tmp_path / "ref", dtype="bfloat16")
    on = tmp_path / "on"
    mhc_convert.enable(ref, on)
    packed = dp_synth.repack(on, tmp_path / "dp", dp=4, bucket_size=2500)
    raw = read_torch_dist(packed)
    assert {k.split(".dtype_")[1].split(".bucket")[0] for k in raw.entries if ".dtype_" in k} == {
        "(torch.bfloat16, torch.bfloat16)", "(torch.float32, torch.float32)"}
    off = tmp_path / "off"
    mhc_convert.disable(packed, off)
    want, got = _opt(read_torch_dist(ref)), _opt(read_torch_dist(off))
    for k, t in want.items():
        state, model_key = K.split_opt(k)
        assert torch.equal(got[K.opt_key("param" if state == "fp32_param" else state,
                                         model_key)], t), k


def test_unpacked_state_is_checked_for_nan_before_the_write(tmp_path, monkeypatch):
    """Unpacked bucket slices are new values (not copied byte ranges): the NaN/Inf check reads
    them before anything is written, names the key, and the one-pass and reference modes agree
    on the output."""
    from mhc_convert.formats import dp_optim
    from mhc_convert.hooks import Hooks

    src = DEV / f"optim_{CASE}_dp"
    outs = {}
    for mode, hooks in {"one-pass": Hooks(), "reference": Hooks(finite_scan="reference")}.items():
        mhc_convert.enable(src, tmp_path / mode, hooks=hooks)
        outs[mode] = _opt(read_torch_dist(tmp_path / mode))
    assert outs["one-pass"].keys() == outs["reference"].keys()
    assert all(torch.equal(outs["one-pass"][k], t) for k, t in outs["reference"].items())

    make_loader = dp_optim.make_loader

    def poisoned(view, base):
        load = make_loader(view, base)

        def loader(entry):
            t = load(entry)
            if isinstance(entry.locator, dp_optim.Slice) and "exp_avg_sq" in entry.key:
                t = t.clone()
                t.view(-1)[0] = float("nan")
            return t
        return loader

    monkeypatch.setattr(dp_optim, "make_loader", poisoned)
    with pytest.raises(mhc_convert.errors.InvalidInputError, match=r"exp_avg_sq.*NaN"):
        mhc_convert.enable(src, tmp_path / "nan")
    assert not (tmp_path / "nan").exists()
