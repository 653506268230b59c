"""Engine refusals: every refusal leaves the source untouched and no output or temp directory
behind, with one line naming the file and key (DESIGN.md §6); lossy disable and dry runs."""

from __future__ import annotations

import os
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
from tests.convert.engine_helpers import (
    ITER,
    bits_equal,
    copy_fixture,
    leftovers,
    make_native,
    native_state,
    tree_sha,
    wrap,
)


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
