"""Megatron's distributed-optimizer bucket layout (``mhc_convert.formats.dp_layout``) on
synthetic parameter lists: expected numbers worked out by hand from Megatron's rules
(``distrib_optimizer.py`` ``_compute_per_buffer_param_layout``, ``param_layout.py``)."""

from __future__ import annotations

from argparse import Namespace

import pytest

from mhc_convert.errors import InvalidInputError
from mhc_convert.formats import dp_layout as L


def P(name, numel, dtype="float32", **kw):
    return L.Param(name, numel, dtype, **kw)


def test_single_bucket_reverse_order_and_64_alignment():
    # reversed: c (10) at 0, b (100) at 64, a (5) at 192 (164 -> 192); end 197 -> pad 256
    buckets, ranges = L.lay_out([P("a", 5), P("b", 100), P("c", 10)], None, 1)
    assert ranges == {"c": (0, 0, 10), "b": (0, 64, 164), "a": (0, 192, 197)}
    assert buckets == (L.Bucket(0, 256, 197),)


def test_dp_padding_of_bucket_end():
    # DP 3: lcm(3, 128) = 384; DP 256: lcm = 256; high busbw: lcm(2, 128, 65536) = 65536
    assert L.lay_out([P("a", 200)], None, 3)[0] == (L.Bucket(0, 384, 200),)
    assert L.lay_out([P("a", 200)], None, 256)[0] == (L.Bucket(0, 256, 200),)
    assert L.lay_out([P("a", 200)], None, 2, high_busbw=True)[0] == (L.Bucket(0, 65536, 200),)


def test_several_buckets_close_after_reaching_bucket_size():
    # bucket_size 150, reversed order d, c, b, a (numels 100, 60, 30, 120)
    ps = [P("a", 120), P("b", 30), P("c", 60), P("d", 100)]
    buckets, ranges = L.lay_out(ps, 150, 2)
    # d [0,100); c at 128 -> [128,188): 188 >= 150 closes bucket 0, padded to 256
    # b [256,286); a at 320 -> [320,440): 440-256 = 184 >= 150 closes bucket 1 -> 512
    assert buckets == (L.Bucket(0, 256, 188), L.Bucket(256, 512, 184))
    assert ranges == {"d": (0, 0, 100), "c": (0, 128, 188), "b": (1, 0, 30), "a": (1, 64, 184)}


def test_bucket_local_ranges_do_not_depend_on_dp():
    ps = [P(f"p{i}", n) for i, n in enumerate([70, 300, 5, 1000, 64, 129])]
    ref = L.lay_out(ps, 400, 1)
    for dp in (2, 3, 8, 384):
        buckets, ranges = L.lay_out(ps, 400, dp)
        assert ranges == ref[1]
        assert [b.numel_unpadded for b in buckets] == [b.numel_unpadded for b in ref[0]]
        assert all(b.numel % dp == 0 and b.start % 128 == 0 for b in buckets)


def test_shared_embedding_gets_its_own_bucket():
    ps = [P("emb", 50, shared_embedding=True), P("w", 10)]
    buckets, ranges = L.lay_out(ps, None, 1)
    # reversed: w [0,10); emb closes the open bucket at 64 -> 128, then alone in bucket 1
    assert buckets == (L.Bucket(0, 128, 64), L.Bucket(128, 256, 50))
    assert ranges == {"w": (0, 0, 10), "emb": (1, 0, 50)}


def test_buffers_by_dtype_and_expert_with_fp32_grads():
    ps = [P("emb", 8, "bfloat16"), P("hc", 4, "float32"), P("e0", 16, "bfloat16", expert=True),
          P("w", 8, "bfloat16")]
    s = L.Settings(bucket_size=None, dp_size=4, expert_dp_size=2, grad_reduce_in_fp32=True)
    bufs = L.layout(ps, s)
    assert [b.key for b in bufs] == [L.BufferKey("bfloat16", "float32", False),
                                     L.BufferKey("float32", "float32", False),
                                     L.BufferKey("bfloat16", "float32", True)]
    assert bufs[0].key.dtype_tag == "(torch.bfloat16, torch.float32)"
    assert bufs[0].ranges == {"w": (0, 0, 8), "emb": (0, 64, 72)}
    dense, expert = L.optimizer_buffers(bufs)
    assert [b.key.expert for b in dense] == [False, False] and expert[0].ranges == {
        "e0": (0, 0, 16)}
    # without fp32 grads the grad dtype follows the param
    assert L.layout(ps[:1], L.Settings(None, 1, 1, False))[0].key.grad_dtype == "bfloat16"


def _args(**kw):
    base = dict(use_distributed_optimizer=True, data_parallel_size=2, context_parallel_size=1,
                tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
                expert_model_parallel_size=1, expert_tensor_parallel_size=None,
                overlap_grad_reduce=True, ddp_bucket_size=None, ddp_num_buckets=None,
                accumulate_allreduce_grads_in_fp32=True)
    return Namespace(**{**base, **kw})


def test_bucket_size_from_args():
    assert L.settings_from_args(_args(), 10).bucket_size == 40_000_000
    assert L.settings_from_args(_args(data_parallel_size=64), 10).bucket_size == 64_000_000
    assert L.settings_from_args(_args(ddp_bucket_size=1234), 10).bucket_size == 1234
    assert L.settings_from_args(_args(ddp_num_buckets=4), 1003).bucket_size == 250
    assert L.settings_from_args(_args(overlap_grad_reduce=False), 10).bucket_size is None
    assert L.settings_from_args(_args(overlap_param_gather_with_optimizer_step=True),
                                10).bucket_size is None
    s = L.settings_from_args(_args(data_parallel_size=4, context_parallel_size=2,
                                   expert_model_parallel_size=2), 10)
    assert (s.dp_size, s.expert_dp_size, s.grad_reduce_in_fp32) == (8, 4, True)


@pytest.mark.parametrize("field,value", [
    ("use_distributed_optimizer", False), ("num_distributed_optimizer_instances", 2),
    ("use_layer_wise_distributed_optimizer", True), ("use_megatron_fsdp", True),
    ("fp8_param_gather", True), ("use_precision_aware_optimizer", True),
    ("optimizer_cpu_offload", True), ("virtual_pipeline_model_parallel_size", 2)])
def test_unmodelled_settings_are_refused(field, value):
    with pytest.raises(InvalidInputError, match=f"args.{field} = {value!r}: the dp_reshardable"):
        L.settings_from_args(_args(**{field: value}), 10)


def test_missing_args_refused():
    with pytest.raises(InvalidInputError, match="no args"):
        L.settings_from_args(None, 10)
    with pytest.raises(InvalidInputError, match="use_distributed_optimizer = None"):
        L.settings_from_args(Namespace(), 10)
