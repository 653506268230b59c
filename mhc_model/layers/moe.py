"""Mixture-of-experts layer (`E`), Megatron-Core HybridModel TE spec.

models/hybrid/hybrid_layer_specs.py (``moe_layer``): MoETransformerLayer with
``pre_mlp_layernorm=TENorm`` and ``mlp`` = get_moe_module_spec(use_te=True,
moe_grouped_gemm=True) (models/gpt/moe_module_specs.py) -> MoELayer with TopKRouter, TE grouped
experts (TEGroupedMLP, moe/experts.py, fc1/fc2 = TE GroupedLinear) and SharedExpertMLP. Keys:

- ``pre_mlp_layernorm.weight`` [C]
- ``mlp.router.weight`` [E, C]; ``mlp.router.expert_bias`` [E] fp32 persistent buffer when
  ``router_expert_bias`` (moe/router.py TopKRouter; Megatron only allows it with sigmoid)
- ``mlp.experts.linear_fc1.weight{e}`` [F or 2F, C] and ``mlp.experts.linear_fc2.weight{e}``
  [C, F] for e in 0..E-1 (TE GroupedLinear registers one ``weight{i}`` per GEMM;
  extensions/transformer_engine.py TEGroupedLinear, default moe_single_grouped_weight=False)
- ``mlp.shared_experts.linear_fc1.weight`` [Fs or 2Fs, C], ``.linear_fc2.weight`` [C, Fs]

Routing (moe/moe_utils.py topk_routing_with_score_function, no pre-softmax, no groups, no
scaling): softmax -> top-k on the logits, softmax over the k selected; sigmoid -> sigmoid
scores, top-k on ``scores + expert_bias`` (bias only steers selection), probabilities are the
unbiased selected scores divided by their sum (+1e-20) when k > 1. Routing runs in fp32 (as with
``moe_router_dtype='fp32'``). Every token reaches all its k experts (no capacity drop); expert
outputs are weighted by the probabilities (Megatron multiplies after the activation, before
fc2) and summed; the shared expert's output is added.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mhc_model.config import HybridConfig
from mhc_model.layers.common import RMSNorm, output_std, torch_dtype
from mhc_model.layers.mlp import MLP, activation_fn, fc1_rows


class GroupedLinear(nn.Module):
    """TE GroupedLinear's parameter layout: ``weight0`` ... ``weight{E-1}``, each [out, in]."""

    def __init__(self, num_gemms: int, in_features: int, out_features: int, dtype: torch.dtype,
                 std: float):
        super().__init__()
        self.num_gemms = num_gemms
        for e in range(num_gemms):
            w = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype))
            nn.init.normal_(w, std=std)
            self.register_parameter(f"weight{e}", w)

    def weight(self, e: int) -> Tensor:
        return getattr(self, f"weight{e}")


class GroupedMLP(nn.Module):
    def __init__(self, cfg: HybridConfig):
        super().__init__()
        moe = cfg.moe
        C = cfg.hidden_size
        dtype = torch_dtype(cfg)
        self.activation = cfg.mlp.activation
        rows = fc1_rows(moe.moe_ffn_hidden_size, self.activation)
        self.linear_fc1 = GroupedLinear(moe.num_experts, C, rows, dtype, cfg.init_std)
        self.linear_fc2 = GroupedLinear(moe.num_experts, moe.moe_ffn_hidden_size, C, dtype,
                                        output_std(cfg))

    def expert(self, e: int, x_TC: Tensor, prob_T: Tensor) -> Tensor:
        """Expert e on its tokens, scaled by their routing probability."""
        h_TF = activation_fn(x_TC @ self.linear_fc1.weight(e).t(), self.activation)
        h_TF = (h_TF.float() * prob_T[:, None]).to(x_TC.dtype)
        return h_TF @ self.linear_fc2.weight(e).t()


class TopKRouter(nn.Module):
    def __init__(self, cfg: HybridConfig):
        super().__init__()
        moe = cfg.moe
        if moe.router_expert_bias and moe.score_function != "sigmoid":
            raise ValueError(
                "moe.router_expert_bias needs moe.score_function='sigmoid' (Megatron rejects "
                "expert bias with softmax routing)"
            )
        self.topk = moe.router_topk
        self.score_function = moe.score_function
        self.weight = nn.Parameter(torch.empty(moe.num_experts, cfg.hidden_size,
                                               dtype=torch_dtype(cfg)))
        nn.init.normal_(self.weight, std=cfg.init_std)
        if moe.router_expert_bias:
            # Megatron keeps it fp32 and zero-initialised; it is updated outside backprop.
            self.register_buffer("expert_bias", torch.zeros(moe.num_experts, dtype=torch.float32))
        else:
            self.expert_bias = None

    def forward(self, x_TC: Tensor) -> tuple[Tensor, Tensor]:
        """-> (probs [T, k] fp32, expert indices [T, k])."""
        logits_TE = x_TC.float() @ self.weight.float().t()
        if self.score_function == "softmax":
            top_logits_TK, idx_TK = logits_TE.topk(self.topk, dim=-1)
            return torch.softmax(top_logits_TK, dim=-1), idx_TK
        scores_TE = torch.sigmoid(logits_TE)
        routing_TE = scores_TE if self.expert_bias is None else scores_TE + self.expert_bias
        _, idx_TK = routing_TE.topk(self.topk, dim=-1)
        probs_TK = scores_TE.gather(-1, idx_TK)
        if self.topk > 1:
            probs_TK = probs_TK / (probs_TK.sum(dim=-1, keepdim=True) + 1e-20)
        return probs_TK, idx_TK


class MoE(nn.Module):
    def __init__(self, cfg: HybridConfig):
        super().__init__()
        self.num_experts = cfg.moe.num_experts
        self.router = TopKRouter(cfg)
        self.experts = GroupedMLP(cfg)
        shared = cfg.moe.shared_expert_ffn_hidden_size
        self.shared_experts = MLP(cfg, shared, fused_norm=False) if shared is not None else None

    def forward(self, x_SBC: Tensor) -> Tensor:
        S, B, C = x_SBC.shape
        x_TC = x_SBC.reshape(S * B, C)
        probs_TK, idx_TK = self.router(x_TC)
        # Accumulate in fp32 so the sum over a token's k experts does not round per addition.
        # Out-of-place index_add: selective activation checkpointing (the stack's recompute)
        # caches op outputs and rejects in-place mutation of them.
        out_TC = torch.zeros(S * B, C, dtype=torch.float32, device=x_SBC.device)
        for e in range(self.num_experts):
            tok_N, slot_N = (idx_TK == e).nonzero(as_tuple=True)
            if tok_N.numel() == 0:
                continue
            y_NC = self.experts.expert(e, x_TC[tok_N], probs_TK[tok_N, slot_N])
            out_TC = out_TC.index_add(0, tok_N, y_NC.float())
        out_SBC = out_TC.to(x_SBC.dtype).view(S, B, C)
        if self.shared_experts is not None:
            out_SBC = out_SBC + self.shared_experts(x_SBC)
        return out_SBC


class MoELayer(nn.Module):
    """Hybrid `E` layer: pre_mlp_layernorm then MoE; returns the branch output (no residual)."""

    def __init__(self, cfg: HybridConfig):
        super().__init__()
        self.pre_mlp_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps, torch_dtype(cfg))
        self.mlp = MoE(cfg)

    def forward(self, u_SBC: Tensor) -> Tensor:
        return self.mlp(self.pre_mlp_layernorm(u_SBC))
