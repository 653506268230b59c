"""The mHC conventions (DESIGN.md §1, the three-column table) as data: one ``Convention``
record per convention, one table ``CONVENTIONS``.

Code that depends on the convention branches on a record's *fields*, never on its name, so
adding a convention is a new row here (plus any genuinely new math behind a new field value).
The config keeps the name (``MHCConfig.mhc_convention: str``); resolve it once with
``convention(name)``.

Fields (each names one place where real implementations differ):
  sinkhorn           "softmax_first": M = softmax_row(L) + eps; M /= colsum + eps;
                                      (iters - 1) x {row, col}                (TileKernels)
                     "exp_rowmax":    M = exp(L - rowmax); iters x {row, col}
  mix_transposed     True: mix[i] = sum_j H[j, i] x[j] (H^T);  False: sum_j H[i, j] x[j]
  h_pre_eps          True: H_pre = sigmoid(h) + eps;  False: H_pre = sigmoid(h)
  rms_factor         "rsqrt_mean": r = rsqrt(mean(xf^2) + eps)
                     "inv_norm":   r = 1 / (||xf|| / sqrt(nC) + eps)
  head_eps           eps of the learned output contract (``decoder.hc_head_*``):
                     "mhc_eps" (``MHCConfig.mhc_eps``) or "layernorm_epsilon" (the model's
                     ``norm_eps``, which is what Megatron passes)
  params_dtype_rule  dtype the target keeps the mHC parameters in: "fp32" or
                     "params_dtype" (cast with the rest of the model, e.g. bf16)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from torch import Tensor

SinkhornForm = Literal["softmax_first", "exp_rowmax"]
RmsForm = Literal["rsqrt_mean", "inv_norm"]
HeadEpsSource = Literal["mhc_eps", "layernorm_epsilon"]
ParamsDtypeRule = Literal["fp32", "params_dtype"]

_SINKHORN_FORMS = ("softmax_first", "exp_rowmax")
_RMS_FORMS = ("rsqrt_mean", "inv_norm")
_HEAD_EPS_SOURCES = ("mhc_eps", "layernorm_epsilon")
_PARAMS_DTYPE_RULES = ("fp32", "params_dtype")


@dataclass(frozen=True)
class Convention:
    name: str
    sinkhorn: SinkhornForm
    mix_transposed: bool
    h_pre_eps: bool
    rms_factor: RmsForm
    head_eps: HeadEpsSource
    params_dtype_rule: ParamsDtypeRule
    source: str = ""  # where the convention comes from (documentation only)

    def __post_init__(self) -> None:
        for field_name, value, choices in (
            ("sinkhorn", self.sinkhorn, _SINKHORN_FORMS),
            ("rms_factor", self.rms_factor, _RMS_FORMS),
            ("head_eps", self.head_eps, _HEAD_EPS_SOURCES),
            ("params_dtype_rule", self.params_dtype_rule, _PARAMS_DTYPE_RULES),
        ):
            if value not in choices:
                raise ValueError(f"Convention {self.name!r}: {field_name}={value!r} must be one "
                                 f"of {', '.join(choices)}")

    def kernel_flags(self) -> dict[str, bool]:
        """The fields the Triton kernels take as constexprs (mhc_model.kernels)."""
        return {
            "SINKHORN_SOFTMAX": self.sinkhorn == "softmax_first",
            "MIX_T": self.mix_transposed,
            "PRE_EPS": self.h_pre_eps,
            "RMS_INV_NORM": self.rms_factor == "inv_norm",
        }


CONVENTIONS: dict[str, Convention] = {
    c.name: c
    for c in (
        Convention(
            name="deepseek",
            sinkhorn="softmax_first",
            mix_transposed=True,
            h_pre_eps=True,
            rms_factor="rsqrt_mean",
            head_eps="mhc_eps",
            params_dtype_rule="fp32",
            source="DeepSeek-V4 / TileKernels",
        ),
        Convention(
            name="megatron_dev",
            sinkhorn="softmax_first",
            mix_transposed=True,
            h_pre_eps=True,
            rms_factor="inv_norm",
            head_eps="layernorm_epsilon",
            params_dtype_rule="fp32",
            source="Megatron-LM dev branch (d48bd6be): hyper_connection.py native_proj_rms",
        ),
        Convention(
            name="megatron_dsv4",
            sinkhorn="exp_rowmax",
            mix_transposed=False,
            h_pre_eps=False,
            rms_factor="inv_norm",
            head_eps="layernorm_epsilon",
            params_dtype_rule="params_dtype",
            source="Megatron-LM dsv4 branch (26b830a6); main's GPT mHC",
        ),
    )
}


def convention(conv: str | Convention) -> Convention:
    """The record for a convention name (a record is returned as is)."""
    if isinstance(conv, Convention):
        return conv
    try:
        return CONVENTIONS[conv]
    except (KeyError, TypeError):
        raise ValueError(f"unknown mhc_convention {conv!r}; expected one of "
                         f"{', '.join(CONVENTIONS)}") from None


def stream_gain(conv: str | Convention, H_NN: Tensor) -> Tensor:
    """Per-stream gain of the mix for a mixing matrix H [..., n, n]: the factor by which each
    output stream scales when all input streams are equal. Column sums when the mix applies
    H^T, row sums otherwise."""
    return H_NN.sum(dim=-2) if convention(conv).mix_transposed else H_NN.sum(dim=-1)


def head_eps_value(conv: str | Convention, *, mhc_eps: float, layernorm_epsilon: float) -> float:
    """eps of the learned output contract under this convention."""
    return mhc_eps if convention(conv).head_eps == "mhc_eps" else layernorm_epsilon


def mhc_params_dtype(conv: str | Convention, model_params_dtype: str) -> str:
    """dtype name ("float32", "bfloat16", ...) the target keeps the mHC parameters in."""
    return "float32" if convention(conv).params_dtype_rule == "fp32" else model_params_dtype
