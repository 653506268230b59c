"""Megatron's distributed-optimizer gradient-buffer layout, computed from the parameter order
and the run's ``args`` (our own code; pure functions, no torch).

A ``dp_reshardable`` optimizer checkpoint stores Adam's state per gradient-buffer *bucket*
(``optimizer.distributed.dp_group_idx_G.gbuf_idx_I.dtype_(P, G).bucket_idx_B.<state>``, global
shape = the bucket's unpadded numel). To read a parameter's state back we need its range in its
bucket, which Megatron computes as follows (identical on Megatron-LM ``dev`` d48bd6be and
``dsv4`` 26b830a6: ``optimizer/distrib_optimizer.py`` ``_compute_per_buffer_param_layout`` and
``compute_full_param_layout``, ``optimizer/param_layout.py``, ``distributed/
param_and_grad_buffer.py`` ``group_params_for_buffers``, ``training/training.py`` bucket size):

* Trainable parameters in ``module.parameters()`` order are grouped into buffers by
  (param dtype, grad dtype = fp32 if ``grad_reduce_in_fp32`` else the param's, expert-parallel);
  buffers are numbered in order of first appearance, dense and expert ones separately (each set
  belongs to its own optimizer).
* Within a buffer, parameters are laid out in *reverse* order; each start is rounded up to a
  multiple of 64 elements; a bucket closes after the parameter that brings it to >=
  ``bucket_size`` elements (or after a ``shared_embedding`` parameter, which also starts a new
  one); a closed bucket's end is padded to a multiple of lcm(DP, 128) (with
  ``pad_buckets_for_high_nccl_busbw``: lcm(DP, 128, 65536)) and the next bucket starts there.
* ``numel_unpadded`` of a bucket = last parameter end - bucket start (64-alignment gaps inside
  count; the end padding does not). The checkpoint tensor of a bucket is that long, so every
  range below is in bucket-local coordinates, the same for any DP size.
* ``bucket_size``: ``ddp_num_buckets`` -> total numel // num_buckets; else ``ddp_bucket_size``
  or max(4e7, 1e6 * DP); None (one bucket) without ``overlap_grad_reduce``, on a pipeline
  stage > 0, or with ``overlap_param_gather_with_optimizer_step``.

Settings this module does not model are refused by ``settings_from_args``, never guessed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mhc_convert.errors import InvalidInputError

PARAM_ALIGN = 64  # param_layout.py pad_param_start
BUCKET_ALIGN = 128  # param_layout.py bucket_end_divisor
HIGH_BUSBW_ALIGN = 2 ** 16


@dataclass(frozen=True)
class Param:
    """One trainable parameter, in model (``module.parameters()``) order."""

    name: str
    numel: int
    dtype: str  # torch dtype name of the parameter ("float32", "bfloat16")
    expert: bool = False  # expert-parallel (param.allreduce == False): its own buffers
    shared_embedding: bool = False  # a tied embedding copy on PP > 1: its own bucket


@dataclass(frozen=True)
class Settings:
    bucket_size: int | None
    dp_size: int  # DP x CP: the group the dense buffers are sharded over
    expert_dp_size: int
    grad_reduce_in_fp32: bool
    pad_for_high_nccl_busbw: bool = False


@dataclass(frozen=True)
class BufferKey:
    param_dtype: str
    grad_dtype: str
    expert: bool

    @property
    def dtype_tag(self) -> str:
        """How Megatron prints the key's dtype pair: ``(torch.bfloat16, torch.float32)``."""
        return f"(torch.{self.param_dtype}, torch.{self.grad_dtype})"


@dataclass(frozen=True)
class Bucket:
    start: int
    end: int  # padded
    numel_unpadded: int

    @property
    def numel(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Buffer:
    key: BufferKey
    buckets: tuple[Bucket, ...]
    # name -> (bucket index, start, end) in bucket-local coordinates
    ranges: Mapping[str, tuple[int, int, int]]


def _pad(value: int, divisor: int) -> int:
    return -(-value // divisor) * divisor


def bucket_divisor(dp_size: int, high_busbw: bool) -> int:
    return math.lcm(dp_size, BUCKET_ALIGN, HIGH_BUSBW_ALIGN) if high_busbw else \
        math.lcm(dp_size, BUCKET_ALIGN)


def group_buffers(params: Sequence[Param], grad_reduce_in_fp32: bool
                  ) -> dict[BufferKey, list[Param]]:
    """Parameters per buffer, buffers in first-appearance order (``group_params_for_buffers``)."""
    out: dict[BufferKey, list[Param]] = {}
    for p in params:
        key = BufferKey(p.dtype, "float32" if grad_reduce_in_fp32 else p.dtype, p.expert)
        out.setdefault(key, []).append(p)
    return out


def lay_out(params: Sequence[Param], bucket_size: int | None, dp_size: int,
            high_busbw: bool = False) -> tuple[tuple[Bucket, ...], dict[str, tuple[int, int, int]]]:
    """One buffer's buckets and each parameter's (bucket, start, end), bucket-local
    (``DistributedOptimizer._compute_per_buffer_param_layout``)."""
    divisor = bucket_divisor(dp_size, high_busbw)
    buckets: list[Bucket] = []
    where: dict[str, tuple[int, int]] = {}  # name -> global (start, end)
    owner: dict[str, int] = {}
    start = bucket_start = end = 0
    open_params: list[str] = []

    def close(last_end: int) -> int:
        padded = _pad(last_end, divisor)
        buckets.append(Bucket(bucket_start, padded, last_end - bucket_start))
        return padded

    for p in reversed(params):
        start = _pad(start, PARAM_ALIGN)
        if p.shared_embedding and open_params:
            bucket_start = start = close(start)
            open_params = []
        end = start + p.numel
        where[p.name] = (start, end)
        owner[p.name] = len(buckets)
        open_params.append(p.name)
        if (bucket_size is not None and end - bucket_start >= bucket_size) or p.shared_embedding:
            bucket_start = start = close(end)
            open_params = []
        else:
            start = end
    if open_params:
        close(end)
    ranges = {n: (owner[n], s - buckets[owner[n]].start, e - buckets[owner[n]].start)
              for n, (s, e) in where.items()}
    return tuple(buckets), ranges


def layout(params: Sequence[Param], settings: Settings) -> list[Buffer]:
    """Every buffer of one model chunk, in Megatron's order (dense and expert interleaved as
    first seen; ``dense(...)``/``expert(...)`` number them per optimizer)."""
    out = []
    for key, group in group_buffers(params, settings.grad_reduce_in_fp32).items():
        dp = settings.expert_dp_size if key.expert else settings.dp_size
        buckets, ranges = lay_out(group, settings.bucket_size, dp,
                                  settings.pad_for_high_nccl_busbw)
        out.append(Buffer(key, buckets, ranges))
    return out


def optimizer_buffers(buffers: Sequence[Buffer]) -> list[list[Buffer]]:
    """Buffers per optimizer of Megatron's ChainedOptimizer: the dense optimizer first (its
    ``gbuf_idx`` counts the dense buffers), then the expert one if there are expert params
    (``optimizer/__init__.py`` get_megatron_optimizer)."""
    dense = [b for b in buffers if not b.key.expert]
    expert = [b for b in buffers if b.key.expert]
    return [dense] + ([expert] if expert else [])


# ------------------------------------------------------------------------------ from args
# args field -> the value our model needs (anything else: refused, with why).
_REQUIRED: dict[str, tuple[Any, str]] = {
    "use_distributed_optimizer": (True, "dp_reshardable is a distributed-optimizer format"),
    "num_distributed_optimizer_instances": (1, "several optimizer instances shard over a "
                                               "sub-group of DP"),
    "use_layer_wise_distributed_optimizer": (False, "the layer-wise optimizer lays out whole "
                                                    "parameters per shard"),
    "use_megatron_fsdp": (False, "Megatron-FSDP has its own buffers"),
    "use_torch_fsdp2": (False, "torch FSDP2 has no Megatron buffers"),
    "use_custom_fsdp": (False, "custom FSDP has its own buffers"),
    "fp8_param_gather": (False, "fp8 parameters live in uint8 buffers"),
    "fp4_param_gather": (False, "fp4 parameters live in packed buffers"),
    "use_precision_aware_optimizer": (False, "its state is stored in other dtypes and names"),
    "optimizer_cpu_offload": (False, "the hybrid CPU optimizer keeps its own state"),
    "virtual_pipeline_model_parallel_size": (None, "several model chunks per rank"),
}


def settings_from_args(args: Any, num_parameters: int, *, path: Any = None) -> Settings:
    """The layout settings of a run, from its saved ``args``; a setting this module does not
    model raises, naming the ``args`` field."""
    def get(name: str, default: Any = None) -> Any:
        return getattr(args, name, default)

    if args is None:
        raise InvalidInputError("no args in the common state: the bucket layout of a "
                                "dp_reshardable optimizer cannot be computed", path=path)
    for name, (want, why) in _REQUIRED.items():
        have = get(name)
        ok = (have == want or (want in (False, None) and not have)
              or (type(want) is int and have is None))  # an int field absent: its default
        if not ok:
            raise InvalidInputError(f"args.{name} = {have!r}: the dp_reshardable bucket layout "
                                    f"is not modelled for it ({why}); re-save with "
                                    f"--dist-ckpt-optim-fully-reshardable or pass "
                                    f"--drop-optimizer", path=path, key=f"args.{name}")
    dp = int(get("data_parallel_size", 1) or 1) * int(get("context_parallel_size", 1) or 1)
    tp = int(get("tensor_model_parallel_size", 1) or 1)
    pp = int(get("pipeline_model_parallel_size", 1) or 1)
    ep = int(get("expert_model_parallel_size", 1) or 1)
    etp = int(get("expert_tensor_parallel_size", None) or tp)
    world = tp * pp * dp
    if world % (ep * etp * pp):
        raise InvalidInputError(f"world size {world} is not divisible by EP {ep} x ETP {etp} x "
                                f"PP {pp}", path=path, key="args.expert_model_parallel_size")
    if get("overlap_param_gather_with_optimizer_step"):
        bucket_size = None
    elif get("ddp_num_buckets") is not None:
        bucket_size = num_parameters // int(get("ddp_num_buckets"))
    elif get("ddp_bucket_size") is not None:
        bucket_size = int(get("ddp_bucket_size"))
    else:
        bucket_size = max(40_000_000, 1_000_000 * dp)
    if not get("overlap_grad_reduce"):
        bucket_size = None
    return Settings(bucket_size=bucket_size, dp_size=dp, expert_dp_size=world // (ep * etp * pp),
                    grad_reduce_in_fp32=bool(get("accumulate_allreduce_grads_in_fp32")),
                    pad_for_high_nccl_busbw=bool(get("ddp_pad_buckets_for_high_nccl_busbw")))
