"""Native directory format: round trips (single and sharded, with optimizer/training state) and
the index attacks of research/reliability.md §3 (missing shard, escaping paths, duplicated keys)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from mhc_convert.commit import AtomicOutput, source_fingerprint, verify_manifest
from mhc_convert.errors import InvalidInputError
from mhc_convert.formats import native
from mhc_convert.formats.safetensors_io import tensor_to_bytes
from mhc_convert.view import OutItem

CONFIG = {"hidden_size": 8, "hybrid_layer_pattern": "M*-"}


def _tensors(n_layers=3):
    g = torch.Generator().manual_seed(0)
    out = {"embedding.word_embeddings.weight": torch.randn(16, 8, generator=g).bfloat16()}
    for i in range(n_layers):
        out[f"decoder.layers.{i}.mlp.linear_fc1.weight"] = torch.randn(12, 8, generator=g)
        out[f"decoder.layers.{i}.mlp.linear_fc1.layer_norm_weight"] = torch.ones(8).half()
    return out


def make_native(root, tensors, *, shards=1, optimizer=None, training_state=None):
    """Write a native dir the way HF tooling does (safetensors.save_file + index json)."""
    root.mkdir()
    (root / "config.json").write_text(json.dumps(CONFIG))
    keys = list(tensors)
    if shards == 1:
        save_file(tensors, root / "model.safetensors", metadata={"format": "pt"})
    else:
        wm = {}
        for s in range(shards):
            name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = {k: tensors[k] for k in keys[s::shards]}
            save_file(part, root / name, metadata={"format": "pt"})
            wm.update(dict.fromkeys(part, name))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        _index(root, wm, total)
    if optimizer:
        save_file(optimizer, root / "optimizer.safetensors")
    if training_state is not None:
        (root / "training_state.json").write_text(json.dumps(training_state))
    return root


def _index(root, weight_map, total=None):
    doc = {"weight_map": weight_map}
    if total is not None:
        doc["metadata"] = {"total_size": total}
    (root / "model.safetensors.index.json").write_text(json.dumps(doc))


def _renamed(key):
    return key.replace("decoder.layers.0.", "decoder.layers.0.inner_layer.")


def write_and_commit(src, dst, items, shard_of, config, **kw):
    """The real flow: stage with write_native, publish config.json last through commit."""
    ao = AtomicOutput(dst, fingerprint=source_fingerprint(src), direction="enable",
                      tool_version="test", src=src)
    with ao as tmp:
        marker = native.write_native(tmp, items, config, shard_of, **kw)
        assert not (tmp / "config.json").exists()
        ao.commit(marker)
    return dst


@pytest.mark.parametrize("shards", [1, 3])
def test_round_trip(tmp_path, shards):
    tensors = _tensors()
    opt = {f"optimizer.state.exp_avg.{k}": torch.full((3,), 0.5) for k in list(tensors)[:2]}
    src = make_native(tmp_path / "src", tensors, shards=shards, optimizer=opt,
                      training_state={"iteration": 100})
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    view = native.read_native(src)
    assert view.format == "native"
    assert set(view.entries) == set(tensors) | set(opt)
    assert view.meta["config_json"] == CONFIG
    assert view.meta["training_state"] == {"iteration": 100}
    assert {view.meta["shard_of"][k] for k in opt} == {"optimizer.safetensors"}
    for k, t in tensors.items():
        assert tensor_to_bytes(view.load(k)) == tensor_to_bytes(t)
        assert view.entries[k].dtype == str(t.dtype)[6:]

    items = [OutItem(_renamed(k), source=e) for k, e in view.entries.items()]
    shard_of = {_renamed(k): f for k, f in view.meta["shard_of"].items()}
    new_key = "decoder.layers.0.hyper_connection.bias"
    new_val = torch.arange(6, dtype=torch.float32).bfloat16()
    items.append(OutItem(new_key, value=new_val))
    shard_of[new_key] = "model.safetensors" if shards == 1 else "model-extra.safetensors"
    dst = write_and_commit(src, tmp_path / "dst", items, shard_of, CONFIG,
                           training_state=view.meta["training_state"])

    assert {p.name: p.read_bytes() for p in src.iterdir()} == before  # source untouched
    assert verify_manifest(dst) == []
    assert (dst / "model.safetensors.index.json").exists() == (shards > 1)
    out = native.read_native(dst)
    assert set(out.entries) == {_renamed(k) for k in view.entries} | {new_key}
    for k in view.entries:
        assert tensor_to_bytes(out.load(_renamed(k))) == tensor_to_bytes(view.load(k)), k
    assert tensor_to_bytes(out.load(new_key)) == tensor_to_bytes(new_val)
    assert out.meta["training_state"] == {"iteration": 100}
    assert json.loads((dst / "config.json").read_text()) == CONFIG
    if shards > 1:
        idx = json.loads((dst / "model.safetensors.index.json").read_text())
        assert "optimizer.state.exp_avg.embedding.word_embeddings.weight" not in idx["weight_map"]
        assert idx["metadata"]["total_size"] == sum(
            e.nbytes for k, e in out.entries.items() if not k.startswith("optimizer."))
    # The independent reader agrees on every file we wrote.
    for f in set(shard_of.values()):
        for k, t in load_file(dst / f).items():
            assert tensor_to_bytes(t) == tensor_to_bytes(out.load(k))


def test_write_native_rejects_unassigned_and_stale_keys(tmp_path):
    src = make_native(tmp_path / "src", _tensors(1))
    view = native.read_native(src)
    items = [OutItem(k, source=e) for k, e in view.entries.items()]
    out = tmp_path / "o1"
    out.mkdir()
    with pytest.raises(InvalidInputError, match="no shard") as ei:
        native.write_native(out, items, CONFIG, {})
    assert ei.value.key in view.entries
    with pytest.raises(InvalidInputError, match="not being written") as ei:
        native.write_native(out, items, CONFIG, {**view.meta["shard_of"], "ghost": "x.safetensors"})
    assert ei.value.key == "ghost"
    with pytest.raises(InvalidInputError, match="plain file name"):
        native.write_native(out, items, CONFIG, dict.fromkeys(view.entries, "../x.safetensors"))
    assert list(out.iterdir()) == []


# ---------------------------------------------------------------------------------- attacks

def _sharded(tmp_path):
    return make_native(tmp_path / "src", _tensors(), shards=2)


def _expect(src, *, path_end, key, words):
    with pytest.raises(InvalidInputError) as ei:
        native.read_native(src)
    e = ei.value
    assert e.path is not None and e.path.endswith(path_end), e
    assert e.key == key, e
    assert words in str(e), e
    assert "\n" not in str(e)


def _wm(src):
    return json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]


def test_index_names_missing_shard(tmp_path):
    src = _sharded(tmp_path)
    wm = _wm(src)
    key = next(iter(wm))
    wm[key] = "model-00003-of-00002.safetensors"
    _index(src, wm)
    _expect(src, path_end="index.json", key=key, words="missing shard")


@pytest.mark.parametrize("name", ["../evil.safetensors", "/etc/evil.safetensors",
                                  "sub/../../evil.safetensors"])
def test_index_shard_path_outside_directory(tmp_path, name):
    src = _sharded(tmp_path)
    (tmp_path / "evil.safetensors").write_bytes((src / "model-00001-of-00002.safetensors")
                                                .read_bytes())
    wm = _wm(src)
    key = next(iter(wm))
    wm[key] = name
    _index(src, wm)
    _expect(src, path_end="index.json", key=key, words="plain file name")


def test_symlinked_shard_escaping_directory(tmp_path):
    src = _sharded(tmp_path)
    shard = src / "model-00002-of-00002.safetensors"
    os.replace(shard, tmp_path / "outside.safetensors")
    shard.symlink_to(tmp_path / "outside.safetensors")
    key = next(k for k, v in _wm(src).items() if v == shard.name)
    _expect(src, path_end="index.json", key=key, words="resolves outside")


def test_symlink_target_inside_directory_must_be_listed(tmp_path):
    src = make_native(tmp_path / "src", _tensors(1))
    os.replace(src / "model.safetensors", src / "model-00001-of-00001.safetensors")
    (src / "model.safetensors").symlink_to("model-00001-of-00001.safetensors")
    with pytest.raises(InvalidInputError, match="unknown files"):  # the target is unlisted
        native.read_native(src)


def test_key_in_two_shards(tmp_path):
    src = _sharded(tmp_path)
    a = load_file(src / "model-00001-of-00002.safetensors")
    b = load_file(src / "model-00002-of-00002.safetensors")
    dup = next(iter(a))
    b[dup] = a[dup]
    save_file(b, src / "model-00002-of-00002.safetensors")
    _expect(src, path_end="00002.safetensors", key=dup, words="in both")


def test_key_in_index_but_not_in_shard(tmp_path):
    src = _sharded(tmp_path)
    wm = _wm(src)
    wm["decoder.layers.9.ghost.weight"] = "model-00001-of-00002.safetensors"
    _index(src, wm)
    _expect(src, path_end="00001-of-00002.safetensors", key="decoder.layers.9.ghost.weight",
            words="in the index but not in shard")


def test_key_in_shard_but_not_in_index(tmp_path):
    src = _sharded(tmp_path)
    wm = _wm(src)
    dropped = next(iter(wm))
    del wm[dropped]
    _index(src, wm)
    _expect(src, path_end=".safetensors", key=dropped, words="missing from the index")


def test_duplicate_key_in_index_json(tmp_path):
    src = _sharded(tmp_path)
    wm = _wm(src)
    k, v = next(iter(wm.items()))
    body = json.dumps({"weight_map": wm})[:-2] + f', "{k}": "{v}"' + "}}"
    (src / "model.safetensors.index.json").write_text(body)
    _expect(src, path_end="index.json", key=k, words="duplicate key")


@pytest.mark.parametrize("cut", ["zero", "half"])
def test_truncated_or_zero_byte_shard(tmp_path, cut):
    src = _sharded(tmp_path)
    shard = src / "model-00002-of-00002.safetensors"
    size = shard.stat().st_size
    os.truncate(shard, 0 if cut == "zero" else size - 10)
    with pytest.raises(InvalidInputError) as ei:
        native.read_native(src)
    assert ei.value.path == str(shard.resolve())
    assert ("shorter than" if cut == "zero" else "truncated") in str(ei.value)


def test_total_size_mismatch(tmp_path):
    src = _sharded(tmp_path)
    _index(src, _wm(src), total=12345)
    _expect(src, path_end="index.json", key=None, words="total_size 12345")


def test_unknown_files_are_listed_not_dropped(tmp_path):
    src = make_native(tmp_path / "src", _tensors(1))
    (src / "tokenizer.json").write_text("{}")
    (src / "extra_dir").mkdir()
    with pytest.raises(InvalidInputError, match=r"\['extra_dir', 'tokenizer.json'\]"):
        native.read_native(src)


def test_config_must_be_strict_json_object(tmp_path):
    src = make_native(tmp_path / "src", _tensors(1))
    (src / "config.json").write_text('{"a": 1, "a": 2}')
    _expect(src, path_end="config.json", key="a", words="duplicate key")
    (src / "config.json").write_text("[1]")
    _expect(src, path_end="config.json", key=None, words="not a JSON object")
    (src / "config.json").unlink()
    _expect(src, path_end="src", key=None, words="no config.json")
