"""HybridModel: embedding -> HybridStack -> output layer, with Megatron-Core HybridModel keys,
plus native checkpoints (``config.json`` + safetensors, sharded above a size threshold)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from mhc_model.config import HybridConfig
from mhc_model.layers.common import allocatable, no_initialisers, torch_dtype
from mhc_model.mtp import MTPBlock
from mhc_model.shim import register_layout_shim
from mhc_model.stack import HybridStack

CONFIG_NAME = "config.json"
SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 2 * 1024**3


class Embedding(nn.Module):
    """``embedding.word_embeddings.weight`` [V, C]."""

    def __init__(self, cfg: HybridConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, dtype=torch_dtype(cfg))
        nn.init.normal_(self.word_embeddings.weight, std=cfg.init_std)

    def forward(self, ids_BS: Tensor) -> Tensor:
        return self.word_embeddings(ids_BS.t())  # Megatron runs sequence-first: [S, B, C]


class OutputLayer(nn.Module):
    def __init__(self, cfg: HybridConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size,
                                               dtype=torch_dtype(cfg)))
        nn.init.normal_(self.weight, std=cfg.init_std)


class HybridModel(nn.Module):
    """``HybridModel(cfg)(input_ids [B, S]) -> logits [B, S, V]``."""

    def __init__(self, cfg: HybridConfig):
        super().__init__()
        self.config = cfg
        self.embedding = Embedding(cfg)
        self.decoder = HybridStack(cfg)
        if cfg.mtp_num_depths:  # Megatron's order: embedding, decoder, mtp, output_layer
            self.mtp = MTPBlock(cfg)
        if not cfg.tie_word_embeddings:
            self.output_layer = OutputLayer(cfg)
        # load_state_dict accepts the mHC-off and mHC-on layouts (see mhc_model.shim)
        register_layout_shim(self)

    def output_weight(self) -> Tensor:
        if self.config.tie_word_embeddings:
            return self.embedding.word_embeddings.weight
        return self.output_layer.weight

    def _logits(self, h_SBC: Tensor) -> Tensor:
        return (h_SBC @ self.output_weight().t()).transpose(0, 1)

    def forward(self, input_ids: Tensor) -> Tensor:
        """Main logits [B, S, V] (the MTP depths are not run: ``forward_mtp``)."""
        return self._logits(self.decoder(self.embedding(input_ids)))

    def forward_mtp(self, input_ids: Tensor) -> tuple[Tensor, list[Tensor]]:
        """(main logits [B, S, V], one [B, S, V] per MTP depth): depth d's logits at position
        t predict token t + d + 2, through the shared output layer, as Megatron's
        ``process_mtp_loss`` computes them (dev ``multi_token_prediction.py`` ~1790-1808)."""
        h_SBC, streams = self.decoder.forward_streams(self.embedding(input_ids))
        if not self.config.mtp_num_depths:
            return self._logits(h_SBC), []
        outs = self.mtp(input_ids, h_SBC if streams is None else streams, self.embedding)
        return self._logits(h_SBC), [self._logits(o) for o in outs]

    # ---- native checkpoints ------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike, *,
                        max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        shards: list[dict[str, Tensor]] = [{}]
        size = 0
        for key, tensor in state.items():
            nbytes = tensor.numel() * tensor.element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][key] = tensor
            size += nbytes
        if len(shards) == 1:
            save_file(shards[0], str(out / SINGLE_NAME), metadata={"format": "pt"})
        else:
            weight_map = {}
            total = len(shards)
            for i, shard in enumerate(shards, start=1):
                name = f"model-{i:05d}-of-{total:05d}.safetensors"
                save_file(shard, str(out / name), metadata={"format": "pt"})
                weight_map.update({k: name for k in shard})
            index = {"metadata": {"total_size": sum(t.numel() * t.element_size()
                                                    for t in state.values())},
                     "weight_map": weight_map}
            (out / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True))
        # config.json last: a directory with a config is a complete checkpoint
        (out / CONFIG_NAME).write_text(self.config.to_json())
        return out

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> HybridModel:
        src = Path(directory)
        cfg = HybridConfig.from_json((src / CONFIG_NAME).read_text())
        model = cls(cfg)
        if (src / INDEX_NAME).exists():
            index = json.loads((src / INDEX_NAME).read_text())
            state: dict[str, Tensor] = {}
            for name in sorted(set(index["weight_map"].values())):
                state.update(load_file(str(src / name)))
        else:
            state = load_file(str(src / SINGLE_NAME))
        model.load_state_dict(state, strict=True)
        return model


def meta_model(cfg: HybridConfig) -> HybridModel:
    """The module tree of ``HybridModel(cfg)`` on the meta device, without running any
    initialiser: keys, shapes and dtypes only (planning, strict loading with ``assign=True``)."""
    with allocatable(cfg), no_initialisers(), torch.device("meta"):
        return HybridModel(cfg)

