"""End-to-end engine tests: ``disable(enable(x))`` is bitwise the identity, the enabled checkpoint
computes what the source computes, optimizer state follows its parameters, and every refusal
leaves the source untouched and no output or temp directory behind (DESIGN.md §4–§6).

Native checkpoints are built from tiny models; the Megatron ``torch_dist`` checkpoint is the real
megatron-core 0.19.2 fixture, always copied into ``tmp_path`` first.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import mhc_convert
from mhc_convert.errors import (
    AlreadyInLayoutError,
    ConvertError,
    InvalidInputError,
    UsageError,
    VerificationError,
)
from mhc_convert.formats.torch_dist import read_torch_dist
from mhc_convert.parity import load_model
from mhc_model.model import HybridModel
from tests.model.helpers import perturb_norms_, tiny_config, tokens
from tests.paths import MEGATRON_FIXTURE

FIXTURE = MEGATRON_FIXTURE  # committed in the repository: a missing copy fails, never skips
ITER = "iter_0001000"
HC_NAMES = ("mapping_proj.weight", "bias", "alpha_pre", "alpha_post", "alpha_res")
MHC_ARG_FLAGS = ("enable_hyper_connections", "num_residual_streams")
PARITY_TOL = 1e-5  # fp32 CPU, DESIGN.md §4


# ------------------------------------------------------------------------------------ helpers
def make_native(root: Path, pattern: str = "M-M*-M-", *, shard_bytes: int | None = None,
                seed: int = 0, **cfg_kw) -> Path:
    torch.manual_seed(seed)
    model = HybridModel(tiny_config(pattern, **cfg_kw))
    perturb_norms_(model, seed)
    if shard_bytes is None:
        model.save_pretrained(root)
    else:
        model.save_pretrained(root, max_shard_bytes=shard_bytes)
    return root


def copy_fixture(tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(FIXTURE, dst, copy_function=shutil.copyfile)
    for d, _, _ in os.walk(dst):
        os.chmod(d, 0o755)
    return dst


def tree_sha(root: Path) -> dict[str, str]:
    """sha256 of every file (hidden ones included) under root, plus the set of directories."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root) + "/"] = "dir"
        for name in filenames:
            p = Path(dirpath) / name
            out[p.relative_to(root).as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if "mhc-tmp" in p.name or "mhc-lock" in p.name
                  or "mhc-old" in p.name)


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, same shape, same bits (torch.equal alone calls -0.0 == 0.0)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8),
                       b.contiguous().reshape(-1).view(torch.uint8))


def native_state(root: Path) -> dict[str, torch.Tensor]:
    index = root / "model.safetensors.index.json"
    if index.exists():
        state: dict[str, torch.Tensor] = {}
        for name in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            state.update(load_file(str(root / name)))
        return state
    return load_file(str(root / "model.safetensors"))


def wrap(key: str) -> str:
    if key.startswith("decoder.layers."):
        i, rest = key[len("decoder.layers."):].split(".", 1)
        return f"decoder.layers.{i}.inner_layer.{rest}"
    return key


def logits_diff(a: Path, b: Path, seed: int = 0) -> float:
    ma, mb = load_model(a, dtype="fp32"), load_model(b, dtype="fp32")
    ids = tokens(2, 13, ma.config.vocab_size, seed)
    with torch.no_grad():
        return (ma(ids).float() - mb(ids).float()).abs().max().item()


def assert_dist_views_equal(a: Path, b: Path, *, flags_changed: bool = False) -> None:
    """Two torch_dist checkpoints hold the same keys, tensors (bitwise), byte objects and common
    state. ``flags_changed``: the args mHC flags may differ (compared by the caller)."""
    va, vb = read_torch_dist(a), read_torch_dist(b)
    assert list(va.entries) and set(va.entries) == set(vb.entries)
    for key, ea in va.entries.items():
        eb = vb.entries[key]
        assert (ea.kind, ea.dtype, ea.shape) == (eb.kind, eb.dtype, eb.shape), key
        if key == "common_state/shard_0_1":
            continue  # re-encoded with the args rewritten: compared decoded below
        if ea.kind == "tensor":
            assert bits_equal(va.load(key), vb.load(key)), key
        else:
            assert va.load(key) == vb.load(key), key
    ca, cb = va.meta["common_state"], vb.meta["common_state"]
    assert set(ca) == set(cb)
    for k in ca:
        if k != "args":
            assert ca[k] == cb[k], k
    aa, ab = vars(ca["args"]), vars(cb["args"])
    skip = set(MHC_ARG_FLAGS) if flags_changed else set()
    assert {k: v for k, v in aa.items() if k not in skip} == \
        {k: v for k, v in ab.items() if k not in skip}
    assert va.meta["iteration"] == vb.meta["iteration"] == ca["iteration"]
    assert va.meta["tracker"] == vb.meta["tracker"]


# ------------------------------------------------------------------------- bitwise round trip
@pytest.mark.parametrize("shard_bytes", [None, 20_000], ids=["single", "sharded"])
@pytest.mark.parametrize("pattern,n,contract", [("M-M*-M-", 4, "mean"),
                                                ("MEMEM*EME", 3, "learned")])
def test_native_roundtrip_bitwise(tmp_path, shard_bytes, pattern, n, contract):
    src = make_native(tmp_path / "src", pattern, shard_bytes=shard_bytes)
    if shard_bytes is not None:
        assert (src / "model.safetensors.index.json").exists()
        assert len(list(src.glob("model-*-of-*.safetensors"))) > 2
    before = tree_sha(src)
    on, back = tmp_path / "on", tmp_path / "back"
    rep = mhc_convert.enable(src, on, streams=n, contract=contract)
    assert rep.plan["added"] == 5 * tiny_config(pattern).num_layers + 3 * (contract == "learned")
    mhc_convert.disable(on, back)
    assert tree_sha(src) == before
    orig, mid, final = native_state(src), native_state(on), native_state(back)
    assert set(mid) >= {wrap(k) for k in orig}
    assert set(final) == set(orig)
    for k, v in orig.items():
        assert bits_equal(v, final[k]), k
        assert bits_equal(v, mid[wrap(k)]), k
    # same sharding: the output keeps every key in the shard it came from
    if shard_bytes is not None:
        wm = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
        wm2 = json.loads((back / "model.safetensors.index.json").read_text())["weight_map"]
        assert wm == wm2
    cfg_a = json.loads((src / "config.json").read_text())
    cfg_c = json.loads((back / "config.json").read_text())
    assert cfg_c["mhc"]["enable_hyper_connections"] is False
    if n == 4 and contract == "mean":  # the defaults: the config comes back exactly
        assert cfg_c == cfg_a
    else:
        assert {k: v for k, v in cfg_c.items() if k != "mhc"} == \
            {k: v for k, v in cfg_a.items() if k != "mhc"}
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("form", ["run", "iter"])
def test_torch_dist_roundtrip_bitwise(tmp_path, form):
    run = copy_fixture(tmp_path)
    src = run if form == "run" else run / ITER
    before = tree_sha(run)
    on, back = tmp_path / "on", tmp_path / "back"
    mhc_convert.enable(src, on)  # defaults: n = 4, the fixture's num_residual_streams
    mhc_convert.disable(on, back)
    assert tree_sha(run) == before
    assert_dist_views_equal(src, back)
    # the flags: flipped by enable, flipped back by disable, everything else untouched
    orig = vars(read_torch_dist(src).meta["common_state"]["args"])
    mid = vars(read_torch_dist(on).meta["common_state"]["args"])
    assert orig["enable_hyper_connections"] is False
    assert mid["enable_hyper_connections"] is True and mid["num_residual_streams"] == 4
    for k, v in orig.items():
        if k not in MHC_ARG_FLAGS:
            assert mid[k] == v, k
    if form == "run":  # the tracker sits beside iter_*/ and is reproduced byte for byte
        for d in (on, back):
            assert (d / "latest_checkpointed_iteration.txt").read_bytes() == \
                (run / "latest_checkpointed_iteration.txt").read_bytes()
            assert (d / ITER / ".metadata").is_file() and (d / ITER / "metadata.json").is_file()
    else:
        for d in (on, back):
            assert (d / ".metadata").is_file() and (d / "metadata.json").is_file()
            assert not (d / "latest_checkpointed_iteration.txt").exists()
    assert leftovers(tmp_path) == []


def test_torch_dist_flags_follow_streams(tmp_path):
    run = copy_fixture(tmp_path)
    mhc_convert.enable(run, tmp_path / "on", streams=2, contract="learned")
    args = read_torch_dist(tmp_path / "on").meta["common_state"]["args"]
    assert args.enable_hyper_connections is True and args.num_residual_streams == 2
    mhc_convert.disable(tmp_path / "on", tmp_path / "back")
    back = read_torch_dist(tmp_path / "back").meta["common_state"]["args"]
    assert back.enable_hyper_connections is False
    assert_dist_views_equal(run, tmp_path / "back", flags_changed=True)


# ------------------------------------------------------------------------------ forward parity
@pytest.mark.parametrize("pattern,n,contract,convention", [
    ("M-M*-M-", 4, "mean", "deepseek"),
    ("MEMEM*EME", 2, "learned", "deepseek"),
    ("GGG*GGG*", 3, "mean", "megatron_dsv4"),
    ("DEDE", 4, "learned", "megatron_dsv4"),
    ("*E+E", 6, "mean", "deepseek"),
])
def test_native_enable_parity(tmp_path, pattern, n, contract, convention):
    src = make_native(tmp_path / "src", pattern, seed=1)
    on = tmp_path / "on"
    mhc_convert.enable(src, on, streams=n, contract=contract, convention=convention)
    model = load_model(on)  # strict load into an mHC-on model
    cfg = model.config
    assert cfg.mhc_on and cfg.mhc.num_residual_streams == n
    assert (cfg.mhc.mhc_output_contract, cfg.mhc.mhc_convention) == (contract, convention)
    assert logits_diff(src, on) <= PARITY_TOL


def test_native_megatron_init_is_not_exact(tmp_path):
    """The check above can fail: Megatron's init (alpha = 0.01) moves the logits."""
    src = make_native(tmp_path / "src", "M-M*-M-", seed=1)
    rep = mhc_convert.enable(src, tmp_path / "on", init="megatron")
    assert any("approximately" in note for note in rep.notes)
    assert logits_diff(src, tmp_path / "on") > PARITY_TOL


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("contract", ["mean", "learned"])
def test_torch_dist_enable_parity(tmp_path, n, contract):
    run = copy_fixture(tmp_path)
    on = tmp_path / "on"
    mhc_convert.enable(run, on, streams=n, contract=contract)
    model = load_model(on)
    assert model.config.mhc_on and model.config.mhc.num_residual_streams == n
    assert model.config.mhc.mhc_output_contract == contract
    assert logits_diff(run, on) <= PARITY_TOL


# ---------------------------------------------------------------------------- optimizer state
@pytest.mark.parametrize("contract", ["mean", "learned"])
def test_torch_dist_optimizer_state(tmp_path, contract):
    run = copy_fixture(tmp_path)
    on = tmp_path / "on"
    n = 4
    mhc_convert.enable(run, on, streams=n, contract=contract)
    vs, vo = read_torch_dist(run), read_torch_dist(on)
    states = ("fp32_param", "exp_avg", "exp_avg_sq")
    carried = 0
    for key in vs.entries:
        if key.startswith("optimizer.state."):
            _, _, state, model_key = key.split(".", 3)
            assert state in states
            out_key = f"optimizer.state.{state}.{wrap(model_key)}"
            assert bits_equal(vs.load(key), vo.load(out_key)), key
            carried += 1
    assert carried > 100
    cfg = tiny_config("M*-M-")
    new_model_keys = [f"decoder.layers.{i}.hyper_connection.{name}"
                      for i in range(cfg.num_layers) for name in HC_NAMES]
    if contract == "learned":
        new_model_keys += ["decoder.hc_head_fn", "decoder.hc_head_base", "decoder.hc_head_scale"]
    new_opt = {k for k in vo.entries if k.startswith("optimizer.state.")} - \
        {f"optimizer.state.{k.split('.')[2]}.{wrap(k.split('.', 3)[3])}"
         for k in vs.entries if k.startswith("optimizer.state.")}
    assert new_opt == {f"optimizer.state.{s}.{k}" for s in states for k in new_model_keys}
    for k in new_model_keys:
        value = vo.load(k)
        assert value.dtype == torch.float32
        assert bits_equal(vo.load(f"optimizer.state.fp32_param.{k}"), value), k
        for s in ("exp_avg", "exp_avg_sq"):
            moment = vo.load(f"optimizer.state.{s}.{k}")
            assert moment.shape == value.shape and moment.dtype == torch.float32
            assert not moment.any(), (s, k)
    # the new parameters join the existing param group: the groups are unchanged
    assert vo.meta["common_state"]["optimizer"] == vs.meta["common_state"]["optimizer"]


# ------------------------------------------------------------------------------------ refusals
def rewrite_native(root: Path, edit) -> None:
    """Apply ``edit(state) -> state`` to a single-file native checkpoint's tensors."""
    state = load_file(str(root / "model.safetensors"))
    state = edit(dict(state))
    (root / "model.safetensors").unlink()
    save_file(state, str(root / "model.safetensors"), metadata={"format": "pt"})


def expect_refusal(tmp_path: Path, src: Path, call, exc_type: type[ConvertError], *,
                   must_name: tuple[str, ...] = (), dst: Path | None = None,
                   watch: Path | None = None) -> ConvertError:
    """Run ``call()``; it must raise ``exc_type`` with a one-line message naming ``must_name``,
    leave every source file's sha256 unchanged and write nothing next to the output."""
    watch = watch or src
    before = tree_sha(watch)
    listing = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(exc_type) as info:
        call()
    err = info.value
    assert type(err).exit_code == exc_type.exit_code
    msg = str(err)
    assert "\n" not in msg and msg == err.one_line()
    for s in must_name:
        assert s in msg, (s, msg)
    assert tree_sha(watch) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == listing
    assert leftovers(tmp_path) == []
    if dst is not None:
        assert not dst.exists() and not dst.is_symlink()
    return err


BAD_KEY = "decoder.layers.1.mlp.linear_fc9.weight"


@pytest.mark.parametrize("case", ["unknown", "missing", "mixed", "shape"])
def test_refuse_invalid_native(tmp_path, case):
    src = make_native(tmp_path / "src", "M-M*-M-")
    if case == "unknown":
        key = BAD_KEY
        rewrite_native(src, lambda s: {**s, key: torch.zeros(4, 4)})
    elif case == "missing":
        key = "decoder.layers.2.mixer.out_proj.weight"
        rewrite_native(src, lambda s: {k: v for k, v in s.items() if k != key})
    elif case == "mixed":
        key = "decoder.layers.0.mixer.A_log"
        rewrite_native(src, lambda s: {(wrap(k) if k.startswith("decoder.layers.3.") else k): v
                                       for k, v in s.items()})
    else:
        key = "decoder.final_norm.weight"
        rewrite_native(src, lambda s: {**s, key: torch.ones(33)})
    dst = tmp_path / "out"
    err = expect_refusal(tmp_path, src, lambda: mhc_convert.enable(src, dst), InvalidInputError,
                         must_name=(str(src), key), dst=dst)
    assert err.exit_code == 3 and err.key == key
    if case == "shape":
        assert "33" in str(err) and "32" in str(err)
    if case == "mixed":
        assert "mixed layout" in str(err)


def test_refuse_invalid_torch_dist(tmp_path):
    """An unknown key in a real Megatron checkpoint (injected by renaming one in .metadata)."""
    import pickle

    run = copy_fixture(tmp_path)
    mpath = run / ITER / ".metadata"
    md = pickle.loads(mpath.read_bytes())  # test-only: our own copy of a trusted fixture
    old, new = "decoder.layers.2.mlp.linear_fc2.weight", BAD_KEY
    md.state_dict_metadata[new] = md.state_dict_metadata.pop(old)
    md.storage_data = {(type(i)(new, i.offset, i.index) if i.fqn == old else i): v
                       for i, v in md.storage_data.items()}
    mpath.write_bytes(pickle.dumps(md))
    dst = tmp_path / "out"
    err = expect_refusal(tmp_path, run, lambda: mhc_convert.enable(run, dst), InvalidInputError,
                         dst=dst)
    assert err.key in (new, old)
    assert ITER in str(err) and err.key in str(err)


def test_refuse_path_aliasing(tmp_path):
    src = make_native(tmp_path / "src")
    expect_refusal(tmp_path, src, lambda: mhc_convert.enable(src, src), UsageError,
                   must_name=(str(src),))
    inside = src / "sub"
    expect_refusal(tmp_path, src, lambda: mhc_convert.enable(src, inside), UsageError,
                   must_name=("inside",), dst=inside)
    link = tmp_path / "link"
    link.symlink_to(src, target_is_directory=True)
    err = expect_refusal(tmp_path, src, lambda: mhc_convert.enable(src, link), UsageError,
                         must_name=("symlink", str(link)))
    assert err.exit_code == 2 and link.is_symlink() and link.resolve() == src.resolve()
    # the same directory through a different spelling
    dotted = tmp_path / "src" / ".." / "src"
    expect_refusal(tmp_path, src, lambda: mhc_convert.enable(src, dotted), UsageError)


def test_refuse_already_enabled(tmp_path):
    src = make_native(tmp_path / "src")
    on = tmp_path / "on"
    mhc_convert.enable(src, on)
    dst = tmp_path / "again"
    err = expect_refusal(tmp_path, on, lambda: mhc_convert.enable(on, dst),
                         AlreadyInLayoutError, must_name=(str(on),), dst=dst)
    assert err.exit_code == 4
    # and the mirror image: disable of an mHC-off checkpoint
    err = expect_refusal(tmp_path, src, lambda: mhc_convert.disable(src, dst),
                         AlreadyInLayoutError, dst=dst)
    assert err.exit_code == 4


def test_refuse_already_enabled_torch_dist(tmp_path):
    run = copy_fixture(tmp_path)
    on = tmp_path / "on"
    mhc_convert.enable(run, on)
    dst = tmp_path / "again"
    expect_refusal(tmp_path, on, lambda: mhc_convert.enable(on, dst), AlreadyInLayoutError,
                   dst=dst)


def make_lossy(tmp_path: Path) -> tuple[Path, Path]:
    src = make_native(tmp_path / "src", "M-M*-M-", seed=2)
    on = tmp_path / "on"
    mhc_convert.enable(src, on)
    key = "decoder.layers.1.hyper_connection.alpha_pre"

    def edit(s):
        assert s[key].item() == 0.0
        s[key] = torch.full_like(s[key], 0.5)
        return s

    rewrite_native(on, edit)
    (on / "mhc-manifest.json").unlink()  # the manifest describes the old bytes
    return src, on


def test_refuse_lossy_disable(tmp_path):
    _, on = make_lossy(tmp_path)
    dst = tmp_path / "back"
    err = expect_refusal(tmp_path, on, lambda: mhc_convert.disable(on, dst), VerificationError,
                         must_name=(str(on), "layer 1", "alpha", "--allow-lossy"), dst=dst)
    assert err.exit_code == 6


def test_allow_lossy_disable_reports_parity(tmp_path):
    src, on = make_lossy(tmp_path)
    before = tree_sha(on)
    dst = tmp_path / "back"
    rep = mhc_convert.disable(on, dst, allow_lossy=True)
    assert tree_sha(on) == before
    assert dst.is_dir() and (dst / "config.json").is_file()
    assert rep.parity is not None and rep.parity["max_abs"] > 0.0
    assert any(n.startswith("LOSSY") for n in rep.notes)
    # the output is the mHC-off model: bitwise the source's weights
    orig, back = native_state(src), native_state(dst)
    assert set(orig) == set(back) and all(bits_equal(orig[k], back[k]) for k in orig)
    assert leftovers(tmp_path) == []


def test_exact_disable_has_no_parity_or_lossy_note(tmp_path):
    src = make_native(tmp_path / "src")
    mhc_convert.enable(src, tmp_path / "on")
    rep = mhc_convert.disable(tmp_path / "on", tmp_path / "back")
    assert rep.parity is None and not any(n.startswith("LOSSY") for n in rep.notes)


# ------------------------------------------------------------------------------------- dry run
@pytest.mark.parametrize("direction", ["enable", "disable"])
def test_dry_run_writes_nothing(tmp_path, direction):
    src = make_native(tmp_path / "src", "M-M*-M-")
    if direction == "disable":
        mhc_convert.enable(src, tmp_path / "on", contract="learned")
        src = tmp_path / "on"
    before, listing = tree_sha(src), sorted(os.listdir(tmp_path))
    dst = tmp_path / "out"
    fn = mhc_convert.enable if direction == "enable" else mhc_convert.disable
    rep = fn(src, dst, dry_run=True)
    assert rep.dry_run and rep.tensors_written == 0 and rep.bytes_total == 0
    assert not dst.exists() and sorted(os.listdir(tmp_path)) == listing
    assert tree_sha(src) == before and leftovers(tmp_path) == []
    n_layers, n_keys = 7, len(native_state(tmp_path / "src"))
    ops = [r["op"] for r in rep.plan_detail]
    if direction == "enable":
        assert rep.plan == {"renamed": n_keys - 3, "unchanged": 3, "added": 5 * n_layers,
                            "dropped": 0}
        assert ops.count("add") == 5 * n_layers
        row = next(r for r in rep.plan_detail if r["op"] == "rename")
        assert row["dst"] == wrap(row["src"]) != row["src"]
    else:
        assert rep.plan["dropped"] == 5 * n_layers + 3 and rep.plan["added"] == 0
        assert ops.count("drop") == 5 * n_layers + 3
