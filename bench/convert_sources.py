"""The synthetic sources of ``bench/convert.py``: MLP-only hybrids (C 4096, F 14336, vocab
32768, bf16, random finite bits) as a native safetensors checkpoint (one file or shards) and as
a Megatron ``torch_dist`` checkpoint written by torch DCP's own ``FileSystemWriter`` (the
common state and ``_extra_state`` taken from the real megatron-core 0.19.2 fixture). The model
is never built."""

from __future__ import annotations

import copy
import io
import json
import math
from pathlib import Path

import torch

FIXTURE = Path("/work/shared/fixtures-external/megatron-core-0.19.2/hybrid_tp1")
HIDDEN, FFN, VOCAB = 4096, 14336, 32768


def _random(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Random finite bf16 bits (incompressible; the top exponent bit is cleared so no value is
    NaN/Inf, which the conversion refuses by default)."""
    n = math.prod(shape)
    raw = torch.randint(0, 256, (2 * n,), dtype=torch.uint8, generator=gen)
    raw.view(n, 2)[:, 1] &= 0xBF
    return raw.view(torch.bfloat16).reshape(shape)


def shapes_for(layers: int):
    """(config, key -> shape) of the MLP-only hybrid with ``layers`` layers."""
    from mhc_model.config import HybridConfig, MLPConfig
    from mhc_model.toggle.shapes import expected_model_shapes

    cfg = HybridConfig(hybrid_layer_pattern="-" * layers, hidden_size=HIDDEN, vocab_size=VOCAB,
                       params_dtype="bfloat16", mlp=MLPConfig(ffn_hidden_size=FFN))
    return cfg, expected_model_shapes(cfg)


def write_native(root: Path, layers: int, shards: int) -> int:
    """config.json + model.safetensors (shards == 1) or N shards + index; returns the
    largest tensor's bytes."""
    from safetensors.torch import save_file

    cfg, shapes = shapes_for(layers)
    root.mkdir(parents=True)
    keys = list(shapes)
    total = sum(math.prod(s) * 2 for s in shapes.values())
    groups: list[list[str]] = [[]]
    size = 0
    for k in keys:  # ~equal shards, in key order
        if groups[-1] and size >= total * len(groups) / shards and len(groups) < shards:
            groups.append([])
        groups[-1].append(k)
        size += math.prod(shapes[k]) * 2
    gen = torch.Generator().manual_seed(0)
    weight_map = {}
    for i, group in enumerate(groups, start=1):
        name = "model.safetensors" if shards == 1 else \
            f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        save_file({k: _random(shapes[k], gen) for k in group}, str(root / name),
                  metadata={"format": "pt"})
        weight_map.update({k: name for k in group})
    if shards > 1:
        (root / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (root / "config.json").write_text(cfg.to_json())
    return max(math.prod(s) * 2 for s in shapes.values())


def _writer_class():
    from torch.distributed.checkpoint import FileSystemWriter

    class MegatronLikeWriter(FileSystemWriter):
        """torch's FileSystemWriter pickles ``StorageMeta.checkpoint_id`` as a PosixPath, which
        mhc-convert's allowlisted unpickler refuses; Megatron's writer stores a ``str``."""

        def storage_meta(self):
            meta = super().storage_meta()
            if meta is not None and meta.checkpoint_id is not None:
                meta.checkpoint_id = str(meta.checkpoint_id)
            return meta

    return MegatronLikeWriter


def write_torch_dist(run: Path, layers: int) -> int:
    """A Megatron-like torch_dist run dir (common state, ``_extra_state`` and ``rng_state``
    byte objects as in the megatron-core 0.19.2 fixture). Returns the largest tensor's bytes."""
    import torch.distributed.checkpoint as dcp

    from mhc_convert.adapters.megatron_args import megatron_config
    from mhc_convert.formats.torch_dist import read_torch_dist
    from mhc_model.toggle.shapes import expected_model_shapes

    fixture = read_torch_dist(FIXTURE)
    common = copy.deepcopy(fixture.meta["common_state"])
    args = common["args"]
    args.hybrid_layer_pattern, args.num_layers = "-" * layers, layers
    args.hidden_size, args.ffn_hidden_size, args.padded_vocab_size = HIDDEN, FFN, VOCAB
    args.num_attention_heads, args.kv_channels = HIDDEN // 128, 128
    shapes = expected_model_shapes(megatron_config(args, run))
    gen = torch.Generator().manual_seed(0)
    state: dict[str, object] = {k: _random(s, gen) for k, s in shapes.items()}

    def decoded(key: str):  # the trusted, read-only fixture's own objects
        return torch.load(io.BytesIO(fixture.load(key)), weights_only=False)

    extra = decoded("decoder.layers.2.mlp.linear_fc1._extra_state/shard_0_1")
    for i in range(layers):
        state[f"decoder.layers.{i}.mlp.linear_fc1._extra_state/shard_0_1"] = copy.copy(extra)
    state["rng_state/shard_0.0_1.1"] = decoded("rng_state/shard_0.0_1.1")
    state["common_state/shard_0_1"] = [common]
    it_dir = run / "iter_0001000"
    it_dir.mkdir(parents=True)
    # flatten_state_dict=False: Megatron's keys are already flat, and the list must stay one item
    dcp.save(state, storage_writer=_writer_class()(str(it_dir), thread_count=1),
             planner=dcp.DefaultSavePlanner(flatten_state_dict=False), no_dist=True)
    (it_dir / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist",
                                                      "sharded_backend_version": 1}))
    (run / "latest_checkpointed_iteration.txt").write_text("1000")
    return max(math.prod(s) * 2 for s in shapes.values())
