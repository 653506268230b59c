"""Multi-token prediction (MTP) depths with Megatron's keys and semantics (DeepSeek-V3 §2.2;
Megatron dev ``transformer/multi_token_prediction.py``, ``models/hybrid/hybrid_model.py``).

Keys of depth d (``mtp.layers.{d}.``): ``enorm.weight``, ``hnorm.weight``, the input projection,
``mtp_model_layer.layers.{k}.<layer keys>`` (one per symbol of the MTP pattern, wrapped as
``inner_layer.`` + ``hyper_connection.*`` with mHC on), ``final_layernorm.weight`` and, with mHC
on and the learned contract, ``hc_head_{fn,base,scale}``. The input projection is
``eh_proj.weight [C, 2C]`` with mHC off and ``e_proj.weight [C, C]`` + ``h_proj.weight [C, C]``
with mHC on (dev ``multi_token_prediction.py`` ~1966-2023): ``eh_proj`` multiplies
``cat(enorm(e), hnorm(h))``, so ``e_proj = eh_proj[:, :C]`` and ``h_proj = eh_proj[:, C:]``.
The embedding and the output layer are the main model's (shared).

Depth d predicts token t + d + 2 from position t: its input ids are the previous depth's rolled
left by one with 0 filling the end (``roll_tensor``, ``_get_embeddings`` ~2075-2147).

mHC off: ``u = eh_proj(cat(enorm(e), hnorm(h)))``, h = the previous depth's output (depth 0: the
decoder's output after ``final_norm``); ``out = final_layernorm(inner stack(u))``, which is both
this depth's hidden for its logits and the next depth's h.
mHC on: h is the previous depth's *streams* (depth 0: the decoder's pre-contraction streams,
``hybrid_block.py`` ~1029-1053); ``x_j = e_proj(enorm(e)) + h_proj(hnorm(h_j))`` per stream
(~2154-2187), the inner stack runs on the streams (no expand, ``is_mtp_layer``), and the
logits read ``final_layernorm(hc_head contract(x))`` (``_postprocess`` ~2290-2312); the next
depth gets x itself (``MultiTokenPredictionBlock.forward`` ~2916-2944).
So with mHC on no final norm stands between depths, where mHC off has one: an exact enable
preserves MTP logits only where those norms are uniform (``toggle.verdict.check_enable_mtp``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mhc_model.config import HybridConfig
from mhc_model.layers.common import Linear, RMSNorm, torch_dtype
from mhc_model.stack import HybridStack, contract, register_head


def roll_ids(ids_BS: Tensor) -> Tensor:
    """Megatron's ``roll_tensor(shifts=-1, fill 0)`` on unpacked sequences, no CP."""
    out = torch.roll(ids_BS, shifts=-1, dims=-1)
    out[..., -1] = 0
    return out


class MTPDepth(nn.Module):
    """``mtp.layers.{depth}``: one prediction depth."""

    def __init__(self, cfg: HybridConfig, depth: int):
        super().__init__()
        self.cfg = cfg
        C, dtype = cfg.hidden_size, torch_dtype(cfg)
        self.enorm = RMSNorm(C, cfg.norm_eps, dtype)
        self.hnorm = RMSNorm(C, cfg.norm_eps, dtype)
        if cfg.mhc_on:
            self.e_proj = Linear(C, C, dtype, cfg.init_std)
            self.h_proj = Linear(C, C, dtype, cfg.init_std)
        else:
            self.eh_proj = Linear(2 * C, C, dtype, cfg.init_std)
        per_depth = len(cfg.mtp_symbols)
        self.mtp_model_layer = HybridStack(cfg, cfg.mtp_symbols, inner=True,
                                           site_offset=cfg.num_layers + depth * per_depth)
        self.final_layernorm = RMSNorm(C, cfg.norm_eps, dtype)
        if cfg.mhc_on and cfg.mhc.mhc_output_contract == "learned":
            register_head(self, cfg, depth)

    def forward(self, h: Tensor, e_SBC: Tensor) -> tuple[Tensor, Tensor]:
        """(this depth's hidden for its logits [S, B, C], what the next depth receives).
        ``h``: [S, B, C] (mHC off) or the streams [S, B, n, C] (mHC on)."""
        e_SBC = self.enorm(e_SBC)
        if not self.cfg.mhc_on:
            u_SBC = self.eh_proj(torch.cat((e_SBC, self.hnorm(h)), dim=-1))
            out_SBC = self.final_layernorm(self.mtp_model_layer.run_plain(u_SBC))
            return out_SBC, out_SBC
        x_SBNC = self.e_proj(e_SBC).unsqueeze(2) + self.h_proj(self.hnorm(h))
        x_SBNC = self.mtp_model_layer.run_streams(x_SBNC)
        return self.final_layernorm(contract(self, self.cfg, x_SBNC)), x_SBNC


class MTPBlock(nn.Module):
    """``mtp``: ``layers`` = one ``MTPDepth`` per depth of the pattern."""

    def __init__(self, cfg: HybridConfig):
        super().__init__()
        self.layers = nn.ModuleList(MTPDepth(cfg, d) for d in range(cfg.mtp_num_depths))

    def forward(self, ids_BS: Tensor, h: Tensor, embed) -> list[Tensor]:
        """Each depth's hidden [S, B, C] (for the shared output layer). ``h``: the decoder's
        output (mHC off) or its streams (mHC on); ``embed``: the shared embedding."""
        outs = []
        for depth in self.layers:
            ids_BS = roll_ids(ids_BS)
            out_SBC, h = depth(h, embed(ids_BS))
            outs.append(out_SBC)
        return outs
