"""Megatron legacy torch format: layout discovery, safe load/save, optimizer index remap."""

from __future__ import annotations

import copy
import io
import shutil
import sys
import time
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch

from fixtures.legacy_writer import (
    fake_megatron_modules,
    make_adamw_state,
    make_rank_payload,
    tiny_model,
    write_hostile_pt,
    write_legacy_checkpoint,
    write_truncated_pt,
)
from mhc_convert.errors import InvalidInputError, IOFailure
from mhc_convert.formats.torch_legacy import (
    STANDINS,
    check_ranks_against_args,
    list_rank_files,
    remap_index_optimizer,
    resolve_legacy,
    safe_load_rank,
    save_rank,
)


def _deep_equal(a, b) -> bool:
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, dict):
        return (isinstance(b, dict) and list(a) == list(b)
                and all(_deep_equal(a[k], b[k]) for k in a))
    if isinstance(a, list | tuple):
        return (type(a) is type(b) and len(a) == len(b)
                and all(_deep_equal(x, y) for x, y in zip(a, b)))
    if hasattr(a, "__dict__") and not isinstance(a, type) and type(a).__module__ == "argparse":
        return type(a) is type(b) and _deep_equal(vars(a), vars(b))
    return type(a) is type(b) and a == b


@pytest.fixture
def tp2pp2(tmp_path):
    """A TP=2 x PP=2 run without optimizer state (fast)."""
    payloads = {(tp, pp): make_rank_payload(tiny_model(tp, pp), tp_size=2, pp_size=2,
                                            optimizer=None)
                for tp in range(2) for pp in range(2)}
    iter_dir = write_legacy_checkpoint(tmp_path / "run", 100, payloads)
    return tmp_path / "run", iter_dir


# --------------------------------------------------------------------------- layout


def test_resolve_and_list_tp2_pp2(tp2pp2):
    run, iter_dir = tp2pp2
    assert resolve_legacy(run) == (iter_dir, run, "100")
    assert resolve_legacy(iter_dir) == (iter_dir, None, None)
    ranks = list_rank_files(iter_dir)
    assert [r.rel for r in ranks] == ["mp_rank_00_000/model_optim_rng.pt",
                                      "mp_rank_01_000/model_optim_rng.pt",
                                      "mp_rank_00_001/model_optim_rng.pt",
                                      "mp_rank_01_001/model_optim_rng.pt"]
    assert [(r.tp, r.pp, r.ep) for r in ranks] == [(0, 0, None), (1, 0, None), (0, 1, None),
                                                   (1, 1, None)]
    args = safe_load_rank(ranks[0].path)["args"]
    check_ranks_against_args(ranks, args, path=ranks[0].path)
    args.pipeline_model_parallel_size = 4
    with pytest.raises(InvalidInputError, match="pipeline_model_parallel_size"):
        check_ranks_against_args(ranks, args, path=ranks[0].path)


def test_release_and_bad_tracker(tmp_path):
    write_legacy_checkpoint(tmp_path, 0, {(0, 0): {"iteration": 0}}, release=True)
    assert resolve_legacy(tmp_path)[0] == tmp_path / "release"
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("12abc")
    with pytest.raises(InvalidInputError, match="latest_checkpointed_iteration.txt"):
        resolve_legacy(tmp_path)
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("7\n")
    with pytest.raises(InvalidInputError, match="iter_0000007"):
        resolve_legacy(tmp_path)
    with pytest.raises(InvalidInputError, match="neither"):
        resolve_legacy(tmp_path / "release" / "mp_rank_00")


def test_hole_in_rank_grid_is_refused(tp2pp2):
    _, iter_dir = tp2pp2
    shutil.rmtree(iter_dir / "mp_rank_01_001")
    with pytest.raises(InvalidInputError, match=r"missing mp_rank_01_001$") as e:
        list_rank_files(iter_dir)
    assert e.value.exit_code == 3 and str(iter_dir) in str(e.value)


def test_huge_rank_number_is_refused_at_once(tp2pp2):
    """A hostile ``mp_rank_1000000000_000`` implies a 1e9-cell grid: named, not enumerated."""
    _, iter_dir = tp2pp2
    shutil.copytree(iter_dir / "mp_rank_00_000", iter_dir / "mp_rank_1000000000_000")
    t0 = time.perf_counter()
    with pytest.raises(InvalidInputError, match=r"TP=1000000001 PP=2 EP=1\); missing mp_rank_02_000"
                       r", mp_rank_03_000, mp_rank_04_000, mp_rank_05_000 and 1999999993 more$"):
        list_rank_files(iter_dir)
    assert time.perf_counter() - t0 < 5


def test_unexpected_files_are_listed(tp2pp2):
    _, iter_dir = tp2pp2
    (iter_dir / "notes.txt").write_text("x")
    (iter_dir / "mp_rank_00_000" / "extra.bin").write_bytes(b"x")
    (iter_dir / "mp_rank_001").mkdir()  # not Megatron's spelling of any rank
    with pytest.raises(InvalidInputError) as e:
        list_rank_files(iter_dir)
    msg = str(e.value)
    assert "mp_rank_00_000/extra.bin" in msg and "notes.txt" in msg and "mp_rank_001" in msg


def test_empty_mixed_and_distrib_optim(tmp_path, tp2pp2):
    (tmp_path / "iter_0000001").mkdir()
    with pytest.raises(InvalidInputError, match="no mp_rank"):
        list_rank_files(tmp_path / "iter_0000001")
    _, iter_dir = tp2pp2
    (iter_dir / "mp_rank_00_000" / "distrib_optim.pt").write_bytes(b"x")
    with pytest.raises(InvalidInputError, match="--drop-optimizer"):
        list_rank_files(iter_dir)
    ranks = list_rank_files(iter_dir, allow_distrib_optim=True)
    assert ranks[0].distrib_optim == "mp_rank_00_000/distrib_optim.pt"
    shutil.copytree(iter_dir / "mp_rank_00_000", iter_dir / "mp_rank_00")
    (iter_dir / "mp_rank_00" / "distrib_optim.pt").unlink()
    with pytest.raises(InvalidInputError, match="mix naming"):
        list_rank_files(iter_dir, allow_distrib_optim=True)


def test_expert_parallel_suffix(tmp_path):
    it = tmp_path / "iter_0000005"
    for name in ("mp_rank_00_000", "mp_rank_00_001"):
        (it / name).mkdir(parents=True)
        (it / name / "model_optim_rng.pt").write_bytes(b"")
    assert [(r.pp, r.ep) for r in list_rank_files(it, two_part="ep")] == [(None, 0), (None, 1)]
    assert [(r.pp, r.ep) for r in list_rank_files(it)] == [(0, None), (1, None)]


# --------------------------------------------------------------------------- safe load / save


def test_writer_payload_round_trips_bitwise(tmp_path):
    payload = make_rank_payload(tiny_model(0, 0), optimizer="megatron_fp16")
    save_rank(tmp_path / "a.pt", payload)
    loaded = safe_load_rank(tmp_path / "a.pt")
    assert _deep_equal(payload, loaded)
    assert loaded["args"].attention_backend is STANDINS[
        "megatron.core.transformer.enums.AttnBackend"].auto
    save_rank(tmp_path / "b.pt", loaded)
    assert _deep_equal(safe_load_rank(tmp_path / "b.pt"), payload)


def test_real_megatron_pickle_loads_and_saves_back_loadable(tmp_path, monkeypatch):
    """A file written by the stock pickler with real megatron enum classes loads here via
    stand-ins, and what we save loads back as the real enums (what Megatron itself would do)."""
    src, dst = tmp_path / "src.pt", tmp_path / "dst.pt"
    with monkeypatch.context() as mp:
        for name, mod in fake_megatron_modules().items():
            mp.setitem(sys.modules, name, mod)
        from megatron.core.enums import ModelType
        from megatron.core.transformer.enums import AttnBackend

        args = Namespace(num_layers=2, params_dtype=torch.bfloat16,
                         model_type=ModelType.encoder_or_decoder,
                         attention_backend=AttnBackend.flash)
        torch.save({"args": args, "checkpoint_version": 3.0, "iteration": 7,
                    "model": {"w": torch.arange(6.0).reshape(2, 3)}}, src)
    assert "megatron" not in sys.modules  # stand-ins are used below, not the fake package
    sd = safe_load_rank(src)
    assert sd["args"].attention_backend is STANDINS[
        "megatron.core.transformer.enums.AttnBackend"].flash
    save_rank(dst, sd)
    assert _deep_equal(safe_load_rank(dst), sd)
    with monkeypatch.context() as mp:
        for name, mod in fake_megatron_modules().items():
            mp.setitem(sys.modules, name, mod)
        from megatron.core.enums import ModelType
        from megatron.core.transformer.enums import AttnBackend

        with torch.serialization.safe_globals([Namespace, ModelType, AttnBackend]):
            back = torch.load(dst, weights_only=True)
    assert back["args"].attention_backend is AttnBackend.flash
    assert back["args"].model_type is ModelType.encoder_or_decoder
    assert back["iteration"] == 7
    assert torch.equal(back["model"]["w"], torch.arange(6.0).reshape(2, 3))


def test_unknown_enum_value_survives_round_trip(tmp_path):
    ab = STANDINS["megatron.core.transformer.enums.AttnBackend"]
    save_rank(tmp_path / "a.pt", {"x": ab(42)})  # a member a newer Megatron might add
    assert safe_load_rank(tmp_path / "a.pt")["x"] is ab(42)


def test_extra_state_bytesio_and_global_allowlist_untouched(tmp_path, monkeypatch):
    """TE ``_extra_state`` (io.BytesIO) round-trips; a global another module registered stays
    registered after our load; the env override cannot switch weights_only off."""
    import io

    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    save_rank(tmp_path / "a.pt", {"model": {"l._extra_state": io.BytesIO(b"fp8meta")}})
    with torch.serialization.safe_globals([Namespace]):  # "another module's" registration
        got = safe_load_rank(tmp_path / "a.pt")["model"]["l._extra_state"]
        assert Namespace in torch.serialization.get_safe_globals()
    assert got.getvalue() == b"fp8meta"
    marker = tmp_path / "pwned"
    with pytest.raises(InvalidInputError):
        safe_load_rank(write_hostile_pt(tmp_path / "h.pt", marker, "builtins.eval"))
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["os.system", "posix.system", "builtins.eval", "builtins.exec"])
def test_hostile_pickle_refused_without_executing(tmp_path, kind):
    marker = tmp_path / "pwned"
    bad = write_hostile_pt(tmp_path / "model_optim_rng.pt", marker, kind)
    with pytest.raises(InvalidInputError) as e:
        safe_load_rank(bad)
    assert e.value.exit_code == 3
    assert str(bad) in str(e.value) and f"'{kind}'" in str(e.value)
    assert not marker.exists()


def test_corrupt_inputs_refused(tmp_path):
    trunc = write_truncated_pt(tmp_path / "t.pt")
    with pytest.raises(InvalidInputError, match="truncated or corrupt") as e:
        safe_load_rank(trunc)
    assert str(trunc) in str(e.value) and "\n" not in str(e.value)
    (tmp_path / "zero.pt").write_bytes(b"")
    with pytest.raises(InvalidInputError, match="zero.pt"):
        safe_load_rank(tmp_path / "zero.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(InvalidInputError, match="expected dict"):
        safe_load_rank(tmp_path / "list.pt")
    with pytest.raises(IOFailure):
        safe_load_rank(tmp_path / "missing.pt")


# --------------------------------------------------------------------------- optimizer remap


def _params(*names, shape=(3, 2), dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return {n: torch.randn(shape, generator=g).to(dtype) for n in names}


def test_remap_carries_bitwise_adds_zeros_and_orders():
    old = _params("a", "b", "c")
    sd = make_adamw_state(old)
    before = copy.deepcopy(sd)
    new_params = {"d": torch.ones(5)}
    out = remap_index_optimizer(sd, ["a", "b", "c"], ["a", "d", "b2", "c"], new_params,
                                renames={"b": "b2"})
    assert _deep_equal(sd, before)  # pure: input untouched
    assert out["param_groups"][0]["params"] == [0, 1, 2, 3]
    assert {k: v for k, v in out["param_groups"][0].items() if k != "params"} == {
        k: v for k, v in sd["param_groups"][0].items() if k != "params"}
    for new_i, old_i in ((0, 0), (2, 1), (3, 2)):
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert out["state"][new_i][k] is sd["state"][old_i][k]
    assert torch.count_nonzero(out["state"][1]["exp_avg"]) == 0
    assert out["state"][1]["exp_avg_sq"].shape == (5,)
    assert torch.equal(out["state"][1]["step"], sd["state"][0]["step"])
    assert out["state"][1]["step"] is not sd["state"][0]["step"]


def test_remap_drop_requires_permission():
    sd = make_adamw_state(_params("a", "b"))
    with pytest.raises(InvalidInputError, match="dropped silently") as e:
        remap_index_optimizer(sd, ["a", "b"], ["a"], {})
    assert e.value.key == "b"
    out = remap_index_optimizer(sd, ["a", "b"], ["a"], {}, dropped={"b"})
    assert list(out["state"]) == [0] and out["state"][0]["exp_avg"] is sd["state"][0]["exp_avg"]
    with pytest.raises(InvalidInputError, match="carried"):
        remap_index_optimizer(sd, ["a", "b"], ["a", "b"], {}, dropped={"b"})


def test_remap_contract_errors():
    sd = make_adamw_state(_params("a", "b"))
    with pytest.raises(InvalidInputError, match="no value"):
        remap_index_optimizer(sd, ["a", "b"], ["a", "b", "n"], {})
    with pytest.raises(InvalidInputError, match="2 params but 3 names"):
        remap_index_optimizer(sd, ["a", "b", "c"], ["a", "b", "c"], {})
    with pytest.raises(InvalidInputError, match="two old params"):
        remap_index_optimizer(sd, ["a", "b"], ["a"], {}, renames={"b": "a"})
    # wrong old_order is caught when carried shapes are known
    sd2 = make_adamw_state({"a": torch.zeros(2), "b": torch.zeros(3)})
    with pytest.raises(InvalidInputError, match="is old_order right"):
        remap_index_optimizer(sd2, ["b", "a"], ["b", "a"], {"a": torch.zeros(2)})
    with pytest.raises(InvalidInputError, match="--drop-optimizer"):
        remap_index_optimizer({"state": {}, "param_groups": [], "extra": 1}, [], [], {})


def test_remap_two_groups_loads_into_real_adamw():
    """Decay/no-decay groups (as Megatron builds them); the result must load into a torch AdamW
    built over the new model and put every carried moment on the right parameter."""
    old = _params("w1", "n1", "w2", "n2")
    mains = {k: torch.nn.Parameter(v.clone()) for k, v in old.items()}
    opt = torch.optim.AdamW([{"params": [mains["w1"], mains["w2"]], "weight_decay": 0.1},
                             {"params": [mains["n1"], mains["n2"]], "weight_decay": 0.0}])
    for p in mains.values():
        p.grad = torch.randn_like(p)
    opt.step()
    sd = opt.state_dict()
    old_order = ["w1", "w2", "n1", "n2"]  # torch numbers group by group
    new_order = ["w1", "hc", "n1", "w2", "hc_alpha", "n2"]  # model parameters() order
    new_vals = {"hc": torch.randn(4, 2), "hc_alpha": torch.zeros(1)}
    out = remap_index_optimizer(sd, old_order, new_order, new_vals,
                                new_param_groups={"hc": 0, "hc_alpha": "n1"})
    assert [g["params"] for g in out["param_groups"]] == [[0, 1, 2], [3, 4, 5]]
    newp = {n: torch.nn.Parameter(new_vals.get(n, old.get(n)).clone()) for n in new_order}
    opt2 = torch.optim.AdamW(
        [{"params": [newp["w1"], newp["hc"], newp["w2"]], "weight_decay": 0.1},
         {"params": [newp["n1"], newp["hc_alpha"], newp["n2"]], "weight_decay": 0.0}])
    opt2.load_state_dict(out)
    for n in old:
        assert torch.equal(opt2.state[newp[n]]["exp_avg"], opt.state[mains[n]]["exp_avg"])
    assert torch.count_nonzero(opt2.state[newp["hc_alpha"]]["exp_avg_sq"]) == 0
    assert opt2.param_groups[1]["weight_decay"] == 0.0


def test_remap_megatron_fp16_wrapper():
    old = _params("a", "b", dtype=torch.bfloat16)
    opt = make_adamw_state(old, megatron_fp16=True)
    opt["grad_scaler"] = {"scale": torch.tensor(1.0)}
    new = {"x": torch.randn(2, 2).to(torch.bfloat16)}
    out = remap_index_optimizer(opt, ["a", "b"], ["a", "x", "b"], new)
    mains = out["fp32_from_fp16_params"][0]
    assert mains[0] is opt["fp32_from_fp16_params"][0][0]
    assert mains[2] is opt["fp32_from_fp16_params"][0][1]
    assert mains[1].dtype == torch.float32 and torch.equal(mains[1], new["x"].float())
    assert out["grad_scaler"] is opt["grad_scaler"]
    assert out["optimizer"]["state"][2]["exp_avg"] is opt["optimizer"]["state"][1]["exp_avg"]
    with pytest.raises(InvalidInputError, match="precision"):
        remap_index_optimizer(opt, ["a", "b"], ["a", "x", "b"], {"x": torch.zeros(2)})
    mixed = {**opt, "fp32_from_fp16_params": [opt["fp32_from_fp16_params"][0][:1]]}
    with pytest.raises(InvalidInputError, match="mixes"):
        remap_index_optimizer(mixed, ["a", "b"], ["a", "b"], {})
    with pytest.raises(InvalidInputError, match="--drop-optimizer"):
        remap_index_optimizer({**opt, "param_state_sharding_type": "dp"}, ["a", "b"],
                              ["a", "b"], {})


def test_hostile_marker_path_is_real(tmp_path):
    """Guard the hostile fixture itself: the payload really would run under plain pickle."""
    import pickle
    import zipfile

    marker = tmp_path / "ran"
    bad = write_hostile_pt(tmp_path / "h.pt", marker, "builtins.exec")
    with zipfile.ZipFile(bad) as z:
        pkl = next(n for n in z.namelist() if n.endswith("data.pkl"))
        pickle.loads(z.read(pkl))  # noqa: S301 - deliberate, proves the fixture is live
    assert Path(marker).exists()


class _Bomb:
    def __reduce__(self):
        return (bytearray, (1 << 40,))  # torch's weights_only allowlist admits bytearray


def test_legacy_rank_file_refused(tmp_path):
    path = tmp_path / "model_optim_rng.pt"
    path.write_bytes(_torch_bytes({"model": {"w": torch.zeros(2)}, "bomb": _Bomb()}))
    with pytest.raises(InvalidInputError, match=r"model_optim_rng\.pt: pickle calls bytearray"):
        safe_load_rank(path)


def _torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()
