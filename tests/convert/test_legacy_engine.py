"""engine.enable/disable/inspect on Megatron legacy ``torch`` checkpoints built from a real
``HybridModel`` (TP=1 PP=1 with a real AdamW state; TP=2 x PP=2 with per-rank states)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fixtures.legacy_writer import make_adamw_state, make_rank_payload, write_legacy_checkpoint
from mhc_convert import engine
from mhc_convert.errors import AlreadyInLayoutError, InvalidInputError
from mhc_convert.formats.torch_legacy import TRACKER, safe_load_rank
from mhc_model.config import HybridConfig
from mhc_model.hyper_connection import exact_hc_tensors, exact_head_tensors
from mhc_model.megatron_args import config_from_megatron_args
from mhc_model.model import HybridModel
from tests.model.helpers import perturb_norms_, tiny_config, tokens
from tests.paths import MEGATRON_FIXTURE

CFG = tiny_config("M-M*-")
ITER = "iter_0000100"
RANK = "mp_rank_00/model_optim_rng.pt"
SCHED = {"max_lr": 1e-3, "num_steps": 800, "lr_decay_style": "cosine"}


def _args(cfg: HybridConfig, tp: int = 1, pp: int = 1) -> dict:
    """Megatron args describing ``cfg`` (fed to legacy_writer.make_args as overrides)."""
    return dict(hybrid_layer_pattern=cfg.hybrid_layer_pattern, num_layers=cfg.num_layers,
                hidden_size=cfg.hidden_size, ffn_hidden_size=cfg.mlp.ffn_hidden_size,
                num_attention_heads=4, group_query_attention=True, num_query_groups=2,
                mamba_state_dim=8, mamba_head_dim=8, mamba_num_groups=2, mamba_expand=2,
                padded_vocab_size=cfg.vocab_size, squared_relu=True,
                untie_embeddings_and_output_weights=True, params_dtype=torch.float32,
                bf16=False)


def _model(seed: int = 0) -> HybridModel:
    torch.manual_seed(seed)
    m = HybridModel(CFG)
    perturb_norms_(m, seed)
    return m


def _deep_equal(a, b) -> bool:
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape and \
            torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_deep_equal(a[k], b[k])
                                                                  for k in a)
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(map(_deep_equal, a, b))
    return type(a) is type(b) and a == b


def _no_leftovers(parent: Path, name: str) -> None:
    assert not (parent / name).exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(f".{name}.")]


@pytest.fixture(scope="module")
def tp1(tmp_path_factory) -> tuple[Path, HybridModel, dict]:
    """A TP=1 PP=1 run dir: real model, real AdamW after two steps."""
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    for step in range(2):
        opt.zero_grad()
        model(tokens(seed=step)).square().mean().backward()
        opt.step()
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    payload = make_rank_payload(sd, optimizer=None, args_overrides=_args(CFG))
    payload["optimizer"] = opt.state_dict()
    payload["opt_param_scheduler"] = SCHED
    run = tmp_path_factory.mktemp("legacy") / "run"
    write_legacy_checkpoint(run, 100, {(0, 0): payload})
    return run, model, safe_load_rank(run / ITER / RANK)


def _enabled(tmp_path_factory, tp1, contract: str) -> Path:
    out = tmp_path_factory.mktemp("on") / "run"
    engine.enable(tp1[0], out, contract=contract)
    return out


@pytest.fixture(scope="module")
def on_mean(tmp_path_factory, tp1) -> Path:
    return _enabled(tmp_path_factory, tp1, "mean")


@pytest.fixture(scope="module")
def on_learned(tmp_path_factory, tp1) -> Path:
    return _enabled(tmp_path_factory, tp1, "learned")


# ------------------------------------------------------------------------------- TP=1 PP=1
def test_config_from_args_matches_model():
    from mhc_model.toggle.shapes import expected_model_shapes

    args = make_rank_payload({}, optimizer=None, args_overrides=_args(CFG))["args"]
    assert expected_model_shapes(config_from_megatron_args(args)) == \
        expected_model_shapes(CFG)


@pytest.mark.parametrize("contract", ["mean", "learned"])
def test_roundtrip_bitwise_and_args(tp1, on_mean, on_learned, tmp_path, contract):
    run, _, src = tp1
    on = on_mean if contract == "mean" else on_learned
    mid = safe_load_rank(on / ITER / RANK)
    assert (on / TRACKER).read_text() == (run / TRACKER).read_text()
    assert mid["args"].enable_hyper_connections is True
    assert mid["args"].num_residual_streams == 4
    # our metadata sits beside Megatron's args, never in them (not Megatron fields)
    assert mid["mhc"]["mhc_output_contract"] == contract
    assert not hasattr(mid["args"], "mhc_output_contract")
    assert not hasattr(mid["args"], "mhc_convention")
    assert mid["iteration"] == 100 and mid["checkpoint_version"] == 3.0
    assert ("decoder.hc_head_fn" in mid["model"]) == (contract == "learned")
    back = tmp_path / "back"
    engine.disable(on, back)
    out = safe_load_rank(back / ITER / RANK)
    assert list(out) == list(src)
    assert out["args"].enable_hyper_connections is False
    for key in src:
        if key != "args":
            assert _deep_equal(out[key], src[key]), key
    assert list(out["model"]) == list(src["model"])  # key order restored too


@pytest.mark.parametrize("contract", ["mean", "learned"])
def test_enabled_loads_strict_and_logits_match(tp1, on_mean, on_learned, contract):
    _, model, _ = tp1
    on = on_mean if contract == "mean" else on_learned
    state = safe_load_rank(on / ITER / RANK)["model"]
    target = CFG.with_mhc(enable_hyper_connections=True, num_residual_streams=4,
                          mhc_output_contract=contract)
    wrapped = HybridModel(target)
    wrapped.load_state_dict(state, strict=True)
    assert [n for n, _ in wrapped.named_parameters()] == list(state)  # Megatron's param order
    ids = tokens()
    with torch.no_grad():
        diff = (wrapped(ids) - model(ids)).abs().max().item()
    assert diff <= 1e-5


def test_adam_moments_carried_and_new_zero(tp1, on_learned):
    _, model, src = tp1
    mid = safe_load_rank(on_learned / ITER / RANK)
    old_names = [n for n, _ in model.named_parameters()]
    new_names = list(mid["model"])
    old, new = src["optimizer"], mid["optimizer"]
    assert len(new["param_groups"]) == 1
    assert new["param_groups"][0]["params"] == list(range(len(new_names)))
    for i, name in enumerate(new_names):
        st = new["state"][i]
        if ".inner_layer." in name or name in old_names:
            j = old_names.index(name.replace(".inner_layer.", "."))
            for k in ("exp_avg", "exp_avg_sq", "step"):
                assert _deep_equal(st[k], old["state"][j][k]), (name, k)
        else:
            assert "hyper_connection" in name or name.startswith("decoder.hc_head_")
            assert st["exp_avg"].shape == mid["model"][name].shape
            assert not st["exp_avg"].any() and not st["exp_avg_sq"].any()
            assert torch.equal(st["step"], old["state"][0]["step"])
    # the remapped state drives a real AdamW on the wrapped model
    target = CFG.with_mhc(enable_hyper_connections=True, mhc_output_contract="learned")
    wrapped = HybridModel(target)
    wrapped.load_state_dict(mid["model"])
    opt = torch.optim.AdamW(wrapped.parameters(), lr=1e-3, weight_decay=0.1)
    opt.load_state_dict(new)
    wrapped(tokens()).square().mean().backward()
    opt.step()


def test_new_tensors_are_exact_init(on_learned):
    mid = safe_load_rank(on_learned / ITER / RANK)["model"]
    target = CFG.with_mhc(enable_hyper_connections=True, mhc_output_contract="learned")
    for name, v in exact_hc_tensors(target, 3).items():
        got = mid[f"decoder.layers.3.hyper_connection.{name}"]
        assert got.dtype == torch.float32 and torch.equal(got, v.float())
    for name, v in exact_head_tensors(target).items():
        assert torch.equal(mid[f"decoder.{name}"], v.float())


def test_already_enabled_refused_and_nothing_written(on_mean, tmp_path):
    with pytest.raises(AlreadyInLayoutError):
        engine.enable(on_mean, tmp_path / "again")
    _no_leftovers(tmp_path, "again")
    with pytest.raises(AlreadyInLayoutError):  # and the iter dir form
        engine.enable(on_mean / ITER, tmp_path / "again")
    _no_leftovers(tmp_path, "again")


def test_inspect_and_iter_dir_input(tp1, on_mean, tmp_path):
    r = engine.inspect(on_mean)
    assert (r.format, r.layout, r.streams, r.iteration) == ("torch_legacy", "mhc-on", 4, 100)
    assert "index-based" in r.optimizer and r.manifest == "present"
    assert engine.inspect(tp1[0] / ITER).layout == "mhc-off"
    out = tmp_path / "iter_on"  # an iteration directory in -> an iteration directory out
    engine.enable(tp1[0] / ITER, out)
    assert (out / RANK).is_file() and not (out / TRACKER).exists()


def _write_variant(tmp_path: Path, tp1, mutate) -> Path:
    payload = dict(tp1[2])
    mutate(payload)
    run = tmp_path / "src"
    write_legacy_checkpoint(run, 100, {(0, 0): payload})
    return run


def _te_order(payload: dict) -> None:
    """TransformerEngine registers layer_norm_weight before weight: the file order then differs
    from named_parameters, so which optimizer index is which parameter cannot be derived."""
    keys = list(payload["model"])
    i = keys.index("decoder.layers.1.mlp.linear_fc1.layer_norm_weight")
    keys[i - 1], keys[i] = keys[i], keys[i - 1]
    payload["model"] = {k: payload["model"][k] for k in keys}


def _two_groups(payload: dict) -> None:
    opt = payload["optimizer"]
    g = opt["param_groups"][0]
    payload["optimizer"] = {"state": opt["state"], "param_groups": [
        {**g, "params": g["params"][:3]}, {**g, "weight_decay": 0.0, "params": g["params"][3:]}]}


@pytest.mark.parametrize("mutate", [_te_order, _two_groups], ids=["te_order", "two_groups"])
def test_optimizer_order_not_derivable(tp1, tmp_path, mutate):
    run = _write_variant(tmp_path, tp1, mutate)
    with pytest.raises(InvalidInputError, match="--drop-optimizer"):
        engine.enable(run, tmp_path / "out")
    _no_leftovers(tmp_path, "out")
    with pytest.raises(InvalidInputError, match="--drop-optimizer"):
        engine.enable(run, tmp_path / "out", dry_run=True)
    report = engine.enable(run, tmp_path / "out", drop_optimizer=True)
    assert any("--no-load-optim" in n for n in report.notes)
    out = safe_load_rank(tmp_path / "out" / ITER / RANK)
    assert "optimizer" not in out and out["opt_param_scheduler"] == SCHED
    assert _deep_equal(out["rng_state"], tp1[2]["rng_state"])


def test_distrib_optim_refused_unless_dropped(tp1, tmp_path):
    run = _write_variant(tmp_path, tp1, lambda p: p.pop("optimizer"))
    (run / ITER / "mp_rank_00" / "distrib_optim.pt").write_bytes(b"bucket-space state")
    assert "distrib_optim" in engine.inspect(run).optimizer
    with pytest.raises(InvalidInputError, match="--drop-optimizer"):
        engine.enable(run, tmp_path / "out")
    _no_leftovers(tmp_path, "out")
    engine.enable(run, tmp_path / "out", drop_optimizer=True)
    assert sorted(p.name for p in (tmp_path / "out" / ITER / "mp_rank_00").iterdir()) == \
        ["model_optim_rng.pt"]


# ------------------------------------------------------------------------------- TP=2 PP=2
ROW_PARALLEL = ("out_proj", "linear_proj", "linear_fc2")
STAGE_LAYERS = (range(0, 3), range(3, 5))  # uneven on purpose: offsets come from the files


def _shard(sd: dict, tp: int, pp: int) -> dict:
    """Rank (tp, pp)'s slice with stage-local layer numbers: norms replicated, row-parallel
    weights split on dim 1, everything else on dim 0 (Megatron's column-parallel split)."""
    layers, out = STAGE_LAYERS[pp], {}
    for key, v in sd.items():
        parts = key.split(".")
        if key.startswith("decoder.layers."):
            if int(parts[2]) not in layers:
                continue
            parts[2] = str(int(parts[2]) - layers[0])
        elif (key.startswith("embedding.")) != (pp == 0):
            continue
        if "norm" in key or v.dim() == 0:
            piece = v
        else:
            piece = v.chunk(2, dim=1 if any(r in key for r in ROW_PARALLEL) else 0)[tp]
        out[".".join(parts)] = piece.clone()
    return out


@pytest.fixture(scope="module")
def tp2pp2(tmp_path_factory) -> tuple[Path, dict]:
    sd = _model(1).state_dict()
    payloads = {}
    for tp in range(2):
        for pp in range(2):
            local = _shard(sd, tp, pp)
            p = make_rank_payload(local, tp_size=2, pp_size=2, optimizer=None, seed=tp + 2 * pp,
                                  args_overrides=_args(CFG))
            p["optimizer"] = make_adamw_state(local, seed=tp + 2 * pp)
            payloads[(tp, pp)] = p
    run = tmp_path_factory.mktemp("tp2pp2") / "run"
    write_legacy_checkpoint(run, 100, payloads)
    return run, payloads


def test_tp2_pp2_enable_places_params_and_roundtrips(tp2pp2, tmp_path):
    run, src = tp2pp2
    target = CFG.with_mhc(enable_hyper_connections=True, mhc_output_contract="learned")
    engine.enable(run, tmp_path / "on", contract="learned")
    for (tp, pp), payload in src.items():
        mid = safe_load_rank(tmp_path / "on" / ITER / f"mp_rank_{tp:02d}_{pp:03d}" /
                             "model_optim_rng.pt")
        layers = STAGE_LAYERS[pp]
        for local in range(len(layers)):  # each stage gets its own layers' params, locally
            for name, v in exact_hc_tensors(target, layers[local]).items():
                assert torch.equal(mid["model"][f"decoder.layers.{local}.hyper_connection."
                                                f"{name}"], v.float())
        assert not any(f"decoder.layers.{len(layers)}." in k for k in mid["model"])
        assert ("decoder.hc_head_fn" in mid["model"]) == (pp == 1)  # head: last stage only
        names = list(mid["model"])
        for i, name in enumerate(names):
            st = mid["optimizer"]["state"][i]
            if ".inner_layer." in name or not ("hyper_connection" in name or "hc_head" in name):
                j = list(payload["model"]).index(name.replace(".inner_layer.", "."))
                assert st["exp_avg"] is not None and torch.equal(
                    st["exp_avg"], payload["optimizer"]["state"][j]["exp_avg"])
            else:
                assert not st["exp_avg"].any()
    engine.disable(tmp_path / "on", tmp_path / "off")
    for (tp, pp), payload in src.items():
        back = safe_load_rank(tmp_path / "off" / ITER / f"mp_rank_{tp:02d}_{pp:03d}" /
                              "model_optim_rng.pt")
        assert list(back) == list(payload)
        for key in payload:
            if key != "args":
                assert _deep_equal(back[key], payload[key]), (tp, pp, key)


def test_tp2_bad_slice_shape_refused(tp2pp2, tmp_path):
    run, src = tp2pp2
    payloads = {k: dict(v) for k, v in src.items()}
    model = dict(payloads[(1, 0)]["model"])
    model["decoder.layers.1.mlp.linear_fc1.weight"] = torch.zeros(20, 32)  # 24 + 20 != 48
    payloads[(1, 0)]["model"] = model
    bad = tmp_path / "bad"
    write_legacy_checkpoint(bad, 100, payloads)
    with pytest.raises(InvalidInputError, match="TP slices"):
        engine.enable(bad, tmp_path / "out", drop_optimizer=True)
    _no_leftovers(tmp_path, "out")


def test_fp16_wrapped_optimizer_with_fp32_new_params_refused(tmp_path):
    """Megatron's bf16 wrapper keeps fp32 main copies only in half-precision groups; the new
    fp32 mHC params fit no group, so the state is refused (documented gap), never guessed."""
    sd = {k: v.detach().to(torch.bfloat16) for k, v in _model().state_dict().items()}
    args = {**_args(CFG), "params_dtype": torch.bfloat16}
    payload = make_rank_payload(sd, optimizer="megatron_fp16", args_overrides=args)
    write_legacy_checkpoint(tmp_path / "run", 100, {(0, 0): payload})
    with pytest.raises(InvalidInputError, match="--drop-optimizer"):
        engine.enable(tmp_path / "run", tmp_path / "out")
    _no_leftovers(tmp_path, "out")


DIST = MEGATRON_FIXTURE  # committed in the repository: a missing copy fails, never skips


def test_torch_dist_drop_optimizer(tmp_path):
    assert engine.inspect(DIST).optimizer == "fully_reshardable"
    report = engine.enable(DIST, tmp_path / "out", drop_optimizer=True)
    assert any("--no-load-optim" in n for n in report.notes)
    out = engine.inspect(tmp_path / "out")
    assert (out.layout, out.optimizer) == ("mhc-on", "none")
