"""torch_dist reader/writer against the real megatron-core 0.19.2 fixture (always copied first).

The interop oracle is torch's own DCP reader (``dcp.load`` with ``FileSystemReader``), which is
what Megatron's ``load_common_state_dict`` and its sharded loads sit on.
"""

from __future__ import annotations

import argparse
import copy
import enum
import io
import json
import os
import pickle
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException

from mhc_convert.errors import InvalidInputError, IOFailure
from mhc_convert.formats.torch_dist import (
    COMMON_KEY,
    read_metadata,
    read_torch_dist,
    resolve_torch_dist,
)
from mhc_convert.formats.torch_dist_write import (
    encode_common_state,
    write_common_pt,
    write_marker,
    write_torch_dist,
    write_tracker,
)
from mhc_convert.view import OutItem
from mhc_model.safe_unpickle import safe_pickle_load, safe_torch_load, safe_torch_save
from tests.convert.engine_helpers import copy_fixture
from tests.paths import MEGATRON_FIXTURE

FIXTURE = MEGATRON_FIXTURE  # committed in the repository: a missing copy fails, never skips
ITER = "iter_0001000"
EMB = "embedding.word_embeddings.weight"
A_LOG = "decoder.layers.0.mixer.A_log"
EXTRA = "decoder.layers.0.mixer.in_proj._extra_state/shard_0_1"


@pytest.fixture
def run(tmp_path: Path) -> Path:
    """A writable copy of the fixture run directory (the original is read-only)."""
    return copy_fixture(tmp_path)


def _convert(view, out: Path, items, **kw) -> dict:
    info = write_torch_dist(out, view, items, **kw)
    write_marker(out, view.meta["metadata_json"])
    return info


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    return a == b


def _dump_metadata(md, iter_dir: Path) -> None:
    (iter_dir / ".metadata").write_bytes(pickle.dumps(md))


# ---------------------------------------------------------------------------------------- read
def test_read_matches_keys_json(run: Path):
    keys = json.loads((FIXTURE / "keys.json").read_text())["keys"]
    view = read_torch_dist(run)
    assert list(view.entries) == list(keys)
    for k, want in keys.items():
        e = view.entries[k]
        assert (e.kind == "bytes") if want == "bytes" else (list(e.shape) == want), k
    assert view.entries[EMB].dtype == "bfloat16" and view.entries[A_LOG].dtype == "float32"
    m = view.meta
    assert m["iteration"] == 1000 and m["tracker"].strip() == "1000" and m["run_dir"] == run
    assert m["common_key"] == COMMON_KEY and m["optimizer_sharding"] == "fully_reshardable"
    assert m["common_state"]["args"].params_dtype is torch.bfloat16
    assert m["common_state"]["iteration"] == 1000 and m["other_files"] == []
    emb = view.load(EMB)
    assert emb.shape == (256, 64) and emb.dtype == torch.bfloat16 and emb.abs().sum() > 0
    assert view.load(EXTRA)[:4] == b"PK\x03\x04"  # a Megatron ShardedObject: torch.save zip


def test_resolve_and_tracker(run: Path):
    it = run / ITER
    assert resolve_torch_dist(it) == (it, None, 1000)
    assert resolve_torch_dist(run) == (it, run, 1000)
    for bad in ["abc", "1_000", "", "-1", "+5", "12 34"]:
        (run / "latest_checkpointed_iteration.txt").write_text(bad)
        with pytest.raises(InvalidInputError, match="latest_checkpointed_iteration"):
            resolve_torch_dist(run)
    (run / "latest_checkpointed_iteration.txt").write_text("2000\n")
    with pytest.raises(InvalidInputError, match="iter_0002000"):
        resolve_torch_dist(run)
    (run / "latest_checkpointed_iteration.txt").write_text("release")
    os.rename(it, run / "release")
    assert resolve_torch_dist(run) == (run / "release", run, "release")
    out = run.parent / "out_run"
    out.mkdir()
    write_tracker(out, "1000")
    assert (out / "latest_checkpointed_iteration.txt").read_bytes() == b"1000"
    with pytest.raises(InvalidInputError):
        write_tracker(out, "10x")


# --------------------------------------------------------------------------------------- write
def test_identity_roundtrip(run: Path, tmp_path: Path):
    view = read_torch_dist(run)
    out = tmp_path / "out" / ITER
    info = write_torch_dist(out, view, [OutItem(k, source=e) for k, e in view.entries.items()])
    assert info["new_file"] is None and info["data_files"] == ["__0_0.distcp"]
    assert not (out / "metadata.json").exists()  # the marker is the caller's last step
    write_marker(out, view.meta["metadata_json"])
    assert (out / "metadata.json").read_bytes() == (run / ITER / "metadata.json").read_bytes()
    assert (out / "__0_0.distcp").read_bytes() == (run / ITER / "__0_0.distcp").read_bytes()
    back = read_torch_dist(out)
    assert list(back.entries) == list(view.entries)
    for k in view.entries:
        assert _same(view.load(k), back.load(k)), k
    assert back.meta["common_state"]["args"] == view.meta["common_state"]["args"]


def test_rename_add_drop_loads_in_torch_dcp(run: Path, tmp_path: Path):
    view = read_torch_dist(run)
    ren = {k: k.replace("layers.0.", "layers.0.inner_layer.") for k in view.entries
           if "layers.0." in k}
    dropped = "decoder.final_norm.weight"
    new_w = torch.randn(24, 64).to(torch.bfloat16)
    new_a = torch.tensor([0.0])
    items = [OutItem(ren.get(k, k), source=e) for k, e in view.entries.items() if k != dropped]
    items += [OutItem("decoder.layers.0.hyper_connection.mapping_proj.weight", value=new_w),
              OutItem("decoder.layers.0.hyper_connection.alpha_pre", value=new_a),
              OutItem("mhc/blob/shard_0_1", value=safe_torch_save([b"hello"]))]
    out = tmp_path / "out" / ITER
    info = _convert(view, out, items)
    assert info["new_file"] == "__mhc_0.distcp"

    md = FileSystemReader(out).read_metadata()
    assert dropped not in md.state_dict_metadata and A_LOG not in md.state_dict_metadata
    sd = {ren[A_LOG]: torch.empty(8), ren[EXTRA]: io.BytesIO(), EMB: torch.empty(256, 64,
          dtype=torch.bfloat16), "decoder.layers.0.hyper_connection.mapping_proj.weight":
          torch.empty(24, 64, dtype=torch.bfloat16),
          "decoder.layers.0.hyper_connection.alpha_pre": torch.full((1,), 7.0),
          "mhc/blob/shard_0_1": io.BytesIO()}
    dcp.load(sd, storage_reader=FileSystemReader(out), no_dist=True)
    assert torch.equal(sd[ren[A_LOG]], view.load(A_LOG))
    assert torch.equal(sd[EMB], view.load(EMB))
    assert torch.equal(sd["decoder.layers.0.hyper_connection.mapping_proj.weight"], new_w)
    assert torch.equal(sd["decoder.layers.0.hyper_connection.alpha_pre"], new_a)
    # DCP's default planner torch.loads byte items (Megatron's ShardedObject blobs).
    assert sd["mhc/blob/shard_0_1"] == [b"hello"]
    extra = torch.load(io.BytesIO(view.load(EXTRA)), weights_only=False)
    assert sd[ren[EXTRA]][0].getvalue() == extra[0].getvalue()
    with pytest.raises(CheckpointException, match="Missing key"):  # DCP's strict load
        dcp.load({dropped: torch.empty(64, dtype=torch.bfloat16)},
                 storage_reader=FileSystemReader(out), no_dist=True)

    back = read_torch_dist(out)
    assert dropped not in back.entries and len(back.entries) == len(view.entries) + 2
    assert back.entries["decoder.layers.0.hyper_connection.alpha_pre"].shape == (1,)

    # Converting the output again: the new file name must not collide, and a data file whose
    # items are all dropped is not carried over.
    out2 = tmp_path / "out2" / ITER
    keep = [OutItem(k, source=e) for k, e in back.entries.items() if "hyper_connection" not in k
            and not k.startswith("mhc/")]
    info2 = _convert(back, out2, [*keep, OutItem("x", value=torch.ones(2))])
    assert info2["data_files"] == ["__0_0.distcp", "__mhc_0.distcp"]
    info3 = _convert(back, tmp_path / "out3",
                     [*back_items(back), OutItem("y", value=safe_torch_save(1))])
    assert info3["new_file"] == "__mhc_1.distcp"
    assert not (out2 / "__mhc_1.distcp").exists()
    assert set(os.listdir(out2)) == {".metadata", "metadata.json", "__0_0.distcp",
                                     "__mhc_0.distcp"}
    # out2's __mhc_0 is the fresh file holding "x", not a copy of the dropped one.
    assert (out2 / "__mhc_0.distcp").read_bytes() != (out / "__mhc_0.distcp").read_bytes()
    assert torch.equal(read_torch_dist(out2).load("x"), torch.ones(2))
    assert torch.equal(read_torch_dist(out2).load(ren[A_LOG]), view.load(A_LOG))


def back_items(view):
    return [OutItem(k, source=e) for k, e in view.entries.items()]


def test_common_state_roundtrip_and_common_pt(run: Path, tmp_path: Path):
    view = read_torch_dist(run)
    common = copy.deepcopy(view.meta["common_state"])
    assert common["args"].enable_hyper_connections is False
    common["args"].enable_hyper_connections = True
    items = [OutItem(k, source=e) for k, e in view.entries.items() if k != COMMON_KEY]
    out = tmp_path / "new" / ITER
    _convert(view, out, [*items, OutItem(COMMON_KEY, value=encode_common_state(common))])
    back = read_torch_dist(out)
    assert back.meta["common_state"]["args"].enable_hyper_connections is True
    assert back.meta["common_state"]["iteration"] == 1000
    # Megatron's load_common_state_dict: dcp.load into BytesIO, torch.load(weights_only), [0].
    sd = {COMMON_KEY: io.BytesIO()}
    dcp.load(sd, storage_reader=FileSystemReader(out), no_dist=True)
    loaded = sd[COMMON_KEY]  # torch's default planner already torch.load-ed it
    if isinstance(loaded, io.BytesIO):
        loaded.seek(0)
        with torch.serialization.safe_globals([argparse.Namespace]):
            loaded = torch.load(loaded, weights_only=True)
    assert loaded[0]["args"].enable_hyper_connections is True

    old = tmp_path / "old" / ITER  # < 0.19 layout: common.pt beside the DCP files
    _convert(view, old, items)
    write_common_pt(old, common)
    back = read_torch_dist(old)
    assert back.meta["common_key"] == "common.pt" and back.meta["iteration"] == 1000
    assert back.meta["common_state"]["args"].enable_hyper_connections is True


def test_link_modes(run: Path, tmp_path: Path):
    view = read_torch_dist(run)
    out = tmp_path / "hl" / ITER
    _convert(view, out, back_items(view), link="hardlink")
    assert (out / "__0_0.distcp").stat().st_ino == (run / ITER / "__0_0.distcp").stat().st_ino
    assert (out / ".metadata").stat().st_ino != (run / ITER / ".metadata").stat().st_ino
    rl = tmp_path / "rl" / ITER
    try:
        write_torch_dist(rl, view, back_items(view), link="reflink")
    except IOFailure as e:  # tmpfs/ext4: no FICLONE; the error must say so, leave no file
        assert "reflink" in str(e) and not (rl / "__0_0.distcp").exists()
    else:
        assert (rl / "__0_0.distcp").read_bytes() == (run / ITER / "__0_0.distcp").read_bytes()


def test_writer_rejects_bad_items(run: Path, tmp_path: Path):
    view = read_torch_dist(run)
    e = view.entries[EMB]
    with pytest.raises(ValueError, match="duplicate"):
        write_torch_dist(tmp_path / "a", view, [OutItem("k", source=e), OutItem("k", source=e)])
    with pytest.raises(ValueError, match="torch.save"):
        write_torch_dist(tmp_path / "c", view, [OutItem("k", value=b"raw")])
    assert not (tmp_path / "c").exists()  # rejected before the first write
    other = read_torch_dist(run)
    with pytest.raises(ValueError, match="not from this view"):
        write_torch_dist(tmp_path / "b", view, [OutItem("k", source=other.entries[EMB])])


# ------------------------------------------------------------------------------------- hostile
class _Evil:
    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


class _EvalEvil:
    def __reduce__(self):
        return (eval, ("1+1",))


def test_hostile_metadata_pickle(run: Path, tmp_path: Path):
    it = run / ITER
    canary = tmp_path / "pwned"
    (it / ".metadata").write_bytes(pickle.dumps(_Evil(f"touch {canary}")))
    with pytest.raises(InvalidInputError, match=r"\.metadata.*(posix|os)\.system"):
        read_torch_dist(run)
    assert not canary.exists()
    (it / ".metadata").write_bytes(pickle.dumps(_EvalEvil()))
    with pytest.raises(InvalidInputError, match="builtins.eval"):
        read_torch_dist(run)
    good = (FIXTURE / ITER / ".metadata").read_bytes()
    for bad in [good[: len(good) // 2], b"\x00garbage\xff" * 10, b"", pickle.dumps({"a": 1})]:
        (it / ".metadata").write_bytes(bad)
        with pytest.raises(InvalidInputError, match=r"\.metadata"):
            read_torch_dist(run)


@pytest.mark.parametrize("mutation", ["escape", "absolute", "beyond", "missing", "no_marker",
                                      "partial_chunk", "overlap", "stray", "not_dtype"])
def test_invalid_storage(run: Path, mutation: str):
    it = run / ITER
    md = read_metadata(it)
    idx = next(i for i in md.storage_data if i.fqn == EMB)
    info = md.storage_data[idx]
    if mutation == "escape":
        md.storage_data[idx] = type(info)("../../evil.distcp", info.offset, info.length)
        (run.parent / "evil.distcp").write_bytes(b"x" * 10**6)
    elif mutation == "absolute":
        md.storage_data[idx] = type(info)(str(it / "__0_0.distcp"), info.offset, info.length)
    elif mutation == "beyond":
        md.storage_data[idx] = type(info)(info.relative_path, 2248815 - 10, info.length)
    elif mutation == "missing":
        os.rename(it / "__0_0.distcp", it / "__moved.distcp")
    elif mutation == "partial_chunk":  # chunks no longer tile the global tensor
        md.state_dict_metadata[EMB].chunks[0].sizes = torch.Size([128, 64])
    elif mutation == "overlap":  # same volume as the tensor, but two chunks overlap
        ch = md.state_dict_metadata[EMB].chunks
        ch[:] = [type(ch[0])(torch.Size([0, 0]), torch.Size([128, 64])),
                 type(ch[0])(torch.Size([64, 0]), torch.Size([128, 64]))]
        md.storage_data[type(idx)(EMB, [64, 0])] = md.storage_data.pop(idx)
        md.storage_data[type(idx)(EMB, [0, 0])] = info
    elif mutation == "stray":
        md.storage_data[type(idx)(EMB, [1, 0])] = info
    elif mutation == "not_dtype":
        md.state_dict_metadata[EMB].properties.dtype = "bfloat16"
    else:
        os.remove(it / "metadata.json")
    _dump_metadata(md, it)
    match = "metadata.json" if mutation == "no_marker" else (
        r"\.metadata.*" + ("" if mutation == "missing" else EMB))
    with pytest.raises(InvalidInputError, match=match):
        read_torch_dist(run)


def test_corrupt_tensor_blob(run: Path):
    view = read_torch_dist(run)
    info = view.entries[EMB].locator[0].info
    with open(run / ITER / "__0_0.distcp", "r+b") as f:
        f.seek(info.offset)
        f.write(b"\0" * 64)
    with pytest.raises(InvalidInputError, match=f"__0_0.distcp: key '{EMB}'"):
        view.load(EMB)
    assert torch.equal(view.load(A_LOG), read_torch_dist(FIXTURE).load(A_LOG))


def test_hostile_torch_blobs(run: Path, tmp_path: Path):
    canary = tmp_path / "pwned2"
    buf = io.BytesIO()
    torch.save([{"args": _Evil(f"touch {canary}")}], buf)
    with pytest.raises(InvalidInputError, match=r"blob\.pt.*(posix|os)\.system"):
        safe_torch_load(buf.getvalue(), source="blob.pt")
    assert not canary.exists()
    with pytest.raises(InvalidInputError, match="m.pkl"):
        safe_pickle_load(pickle.dumps(_Evil("true")), source="m.pkl")
    # The same payload as the checkpoint's common state: refused, naming file and key.
    view = read_torch_dist(run)
    items = [OutItem(k, source=e) for k, e in view.entries.items() if k != COMMON_KEY]
    out = tmp_path / "o" / ITER
    _convert(view, out, [*items, OutItem(COMMON_KEY, value=buf.getvalue())])
    with pytest.raises(InvalidInputError, match=f"key '{COMMON_KEY}'.*system"):
        read_torch_dist(out)
    assert not canary.exists()


def test_megatron_standins_roundtrip(monkeypatch: pytest.MonkeyPatch):
    """Enums saved by real Megatron load as stand-ins and are written back under the same
    qualified names, so real Megatron reads the real enum again."""
    mod = types.ModuleType("megatron.core.transformer.enums")

    class AttnBackend(enum.Enum):
        flash = 1
        auto = 5

    AttnBackend.__module__ = mod.__name__
    AttnBackend.__qualname__ = "AttnBackend"
    mod.AttnBackend = AttnBackend
    for name in ["megatron", "megatron.core", "megatron.core.transformer"]:
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    buf = io.BytesIO()
    torch.save([{"args": argparse.Namespace(attention_backend=AttnBackend.auto)}], buf)
    monkeypatch.delitem(sys.modules, mod.__name__)  # megatron is not installed in the tool
    obj = safe_torch_load(buf.getvalue(), source="c")
    standin = obj[0]["args"].attention_backend
    assert standin.value == 5 and "AttnBackend" in repr(standin)
    blob = safe_torch_save(obj)
    assert safe_torch_load(blob, source="c2") == obj
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    with torch.serialization.safe_globals([AttnBackend, argparse.Namespace]):
        real = torch.load(io.BytesIO(blob), weights_only=True)
    assert real[0]["args"].attention_backend is AttnBackend.auto


def test_metadata_extras_follow_renames(run: Path, tmp_path: Path):
    """Older Megatron pickles ``mcore_data`` (keyed by fqn) and ``all_local_plans`` (a save-plan
    cache) onto Metadata: the first must follow renames, the second is dropped as stale."""
    from torch.distributed.checkpoint.planner import SavePlan

    it = run / ITER
    md = read_metadata(it)
    md.mcore_data = {EMB: {"nd_reformulated_orig_global_shape": (256, 64)}, A_LOG: {}}
    md.all_local_plans = [SavePlan(items=[])]
    _dump_metadata(md, it)
    view = read_torch_dist(run)
    assert view.meta["metadata_extra_attrs"] == ["all_local_plans", "mcore_data"]
    items = [OutItem("renamed.emb" if k == EMB else k, source=e)
             for k, e in view.entries.items() if k != A_LOG]
    out = tmp_path / "o" / ITER
    _convert(view, out, items)
    got = FileSystemReader(out).read_metadata()
    assert got.mcore_data == {"renamed.emb": {"nd_reformulated_orig_global_shape": (256, 64)}}
    assert not hasattr(got, "all_local_plans") and got.version == md.version
    assert got.storage_meta.save_id != md.storage_meta.save_id
