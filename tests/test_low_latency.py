"""Low-latency `Buffer` calls (low_latency_dispatch / low_latency_combine) on the portable backend,
checked against the plain references: the per-expert packed layout, the FP8 cast inside dispatch
(incl. round_scale and use_ue8m0, column-major scales), the weighted combine (with `out=` and
zero-copy), hook mode, cumulative receive statistics, async events and double buffering.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st

from deepep_megatron import Buffer, EventOverlap
from deepep_megatron.fp8 import per_token_cast_to_fp8
from deepep_megatron.handle import LowLatencyHandle
from deepep_megatron.testing.reference import (
    make_rank_inputs,
    make_rows,
    reference_low_latency_combine,
    reference_low_latency_dispatch,
)
from tests.test_buffer_portable import assert_bitwise_equal

# --------------------------------------------------------------------------------------------------
# helpers (run on the ranks)


def _ll_buffer(max_tokens: int, hidden: int, num_experts: int) -> Buffer:
    num_ranks = dist.get_world_size()
    num_rdma_bytes = Buffer.get_low_latency_rdma_size_hint(max_tokens, hidden, num_ranks, num_experts)
    return Buffer(dist.group.WORLD, num_rdma_bytes=num_rdma_bytes, low_latency_mode=True)


def _expert_outputs(seed: int, rank: int, experts_per_rank: int, capacity: int, hidden: int) -> torch.Tensor:
    """`[E_local, R * max, H]` bf16 "expert outputs" of `rank` that every rank can rebuild."""
    return make_rows(seed, rank, experts_per_rank * capacity, hidden).view(experts_per_rank, capacity, hidden)


def _expected_payload(all_inputs, ref, local, use_fp8, round_scale, use_ue8m0):
    """Rows (and scales) local expert `local` should hold, taken from the sources' inputs."""
    pairs = list(zip(ref.src_rank[local], ref.src_token[local]))
    hidden = all_inputs[0].x.size(1)
    if not use_fp8:
        rows = [all_inputs[src].x[token] for src, token in pairs]
        return (torch.stack(rows) if rows else torch.empty((0, hidden), dtype=torch.bfloat16)), None
    casts = [
        per_token_cast_to_fp8(inputs.x, round_scale=round_scale, use_ue8m0=use_ue8m0) for inputs in all_inputs
    ]
    num_scale_cols = casts[0][1].size(1)
    rows = [casts[src][0][token] for src, token in pairs]
    scales = [casts[src][1][token] for src, token in pairs]
    if not rows:
        return (
            torch.empty((0, hidden), dtype=torch.float8_e4m3fn),
            torch.empty((0, num_scale_cols), dtype=casts[0][1].dtype),
        )
    return torch.stack(rows), torch.stack(scales)


def _check_ll_dispatch(recv_x, recv_count, handle, all_inputs, rank, num_experts, max_tokens, flags):
    use_fp8, round_scale, use_ue8m0 = flags
    num_ranks = len(all_inputs)
    experts_per_rank = num_experts // num_ranks
    capacity = num_ranks * max_tokens
    hidden = all_inputs[0].x.size(1)
    ref = reference_low_latency_dispatch(all_inputs, rank, num_experts)
    assert_bitwise_equal(recv_count, torch.tensor(ref.recv_count, dtype=torch.int32), "recv_count")
    assert isinstance(handle, LowLatencyHandle)
    if use_fp8:
        assert isinstance(recv_x, tuple) and len(recv_x) == 2, (
            "FP8 low-latency dispatch returns (x_fp8, scales)"
        )
        packed, scales = recv_x
        assert packed.dtype == torch.float8_e4m3fn
        assert tuple(packed.shape) == (experts_per_rank, capacity, hidden)
        if use_ue8m0:
            assert scales.dtype == torch.int32
            assert tuple(scales.shape) == (experts_per_rank, capacity, -(-hidden // 512))
        else:
            assert scales.dtype == torch.float32
            assert tuple(scales.shape) == (experts_per_rank, capacity, hidden // 128)
        # Column-major scales: the token dimension is contiguous.
        assert scales.stride(1) == 1 and scales.stride(2) == capacity, f"scales strides {scales.stride()}"
    else:
        assert isinstance(recv_x, torch.Tensor) and recv_x.dtype == torch.bfloat16
        assert tuple(recv_x.shape) == (experts_per_rank, capacity, hidden)
        packed, scales = recv_x, None
    assert tuple(handle.recv_src_info.shape) == (experts_per_rank, capacity)
    assert tuple(handle.recv_layout_range.shape) == (experts_per_rank, num_ranks)
    for local in range(experts_per_rank):
        count = ref.recv_count[local]
        rows, row_scales = _expected_payload(all_inputs, ref, local, use_fp8, round_scale, use_ue8m0)
        assert_bitwise_equal(packed[local, :count], rows, f"expert {local} rows")
        if scales is not None:
            assert_bitwise_equal(scales[local, :count], row_scales, f"expert {local} scales")
        assert_bitwise_equal(
            handle.recv_src_info[local, :count],
            torch.tensor(ref.src_token[local], dtype=torch.int32),
            f"expert {local} recv_src_info",
        )
        ranges = [(begin << 32) | n for begin, n in ref.layout_range[local]]
        assert_bitwise_equal(
            handle.recv_layout_range[local],
            torch.tensor(ranges, dtype=torch.int64),
            f"expert {local} layout range",
        )
    return ref


# --------------------------------------------------------------------------------------------------
# rank functions


def _ll_case(
    seed,
    num_tokens_of_rank,
    max_tokens,
    hidden,
    experts_per_rank,
    num_topk,
    flags=(True, False, False),
    masked_fraction=0.2,
    use_hook=False,
    combine_mode="plain",
    async_finish=False,
    pow2_weights=False,
):
    """One low-latency dispatch + combine. `combine_mode`: "plain", "out" or "zero_copy".
    `pow2_weights`: top-k weights in {0.5, 1, 2}, so weighted rows stay exact and the fp32 sum
    shows its order of addition (see `make_rows`)."""
    rank, num_ranks = dist.get_rank(), dist.get_world_size()
    num_experts = experts_per_rank * num_ranks
    capacity = num_ranks * max_tokens
    use_fp8, round_scale, use_ue8m0 = flags
    all_inputs = [
        make_rank_inputs(seed, r, n, hidden, num_experts, num_topk, masked_fraction=masked_fraction)
        for r, n in enumerate(num_tokens_of_rank)
    ]
    if pow2_weights:
        generator = torch.Generator().manual_seed(seed)
        for inputs in all_inputs:
            exponents = torch.randint(-1, 2, inputs.topk_weights.shape, generator=generator)
            inputs.topk_weights = torch.ldexp(torch.ones_like(inputs.topk_weights), exponents)
    mine = all_inputs[rank]
    buffer = _ll_buffer(max_tokens, hidden, num_experts)
    stats = torch.full((experts_per_rank,), 5, dtype=torch.int32)

    out = buffer.low_latency_dispatch(
        mine.x,
        mine.topk_idx,
        max_tokens,
        num_experts,
        cumulative_local_expert_recv_stats=stats,
        use_fp8=use_fp8,
        round_scale=round_scale,
        use_ue8m0=use_ue8m0,
        async_finish=async_finish,
        return_recv_hook=use_hook,
    )
    assert isinstance(out, tuple) and len(out) == 5
    recv_x, recv_count, handle, event, hook = out
    assert isinstance(event, EventOverlap)
    ref = reference_low_latency_dispatch(all_inputs, rank, num_experts)
    if use_hook:
        assert callable(hook)
        # Nothing is valid before the hook: stats untouched, received rows not yet the data.
        assert (stats == 5).all()
        packed = recv_x[0] if use_fp8 else recv_x
        for local in range(experts_per_rank):
            count = ref.recv_count[local]
            if count:
                assert torch.isnan(packed[local, :count].float()).all(), "rows before hook() must be poisoned"
        hook()
    else:
        assert hook is None
    event.current_stream_wait()
    _check_ll_dispatch(recv_x, recv_count, handle, all_inputs, rank, num_experts, max_tokens, flags)
    expected_stats = torch.tensor(ref.recv_count, dtype=torch.int32) + 5
    assert_bitwise_equal(stats, expected_stats, "cumulative_local_expert_recv_stats")

    # Weighted combine of deterministic expert outputs.
    expert_out = _expert_outputs(seed, rank, experts_per_rank, capacity, hidden)
    kwargs = {}
    x = expert_out
    if combine_mode == "out":
        kwargs["out"] = torch.full((mine.x.size(0), hidden), float("nan"), dtype=torch.bfloat16)
    elif combine_mode == "zero_copy":
        staging = buffer.get_next_low_latency_combine_buffer(handle)
        assert (
            tuple(staging.shape) == (experts_per_rank, capacity, hidden) and staging.dtype == torch.bfloat16
        )
        staging.copy_(expert_out)
        x = torch.zeros_like(expert_out)  # zero_copy reads the staging buffer, not x
        kwargs["zero_copy"] = True
    result = buffer.low_latency_combine(
        x,
        mine.topk_idx,
        mine.topk_weights,
        handle,
        async_finish=async_finish,
        return_recv_hook=use_hook,
        **kwargs,
    )
    assert isinstance(result, tuple) and len(result) == 3
    combined, event, hook = result
    assert isinstance(event, EventOverlap)
    if combine_mode == "out":
        assert combined is kwargs["out"], "low_latency_combine must return the `out` tensor"
    if use_hook:
        assert callable(hook)
        if combine_mode == "out":
            assert torch.isnan(combined.float()).all(), "out must not be written before hook()"
        hook()
    else:
        assert hook is None
    expected = reference_low_latency_combine(
        all_inputs,
        rank,
        num_experts,
        lambda dst: _expert_outputs(seed, dst, experts_per_rank, capacity, hidden),
    )
    assert_bitwise_equal(combined, expected, "low_latency_combine")
    return sum(ref.recv_count)


def _double_buffer_case(seed, num_tokens, max_tokens, hidden, experts_per_rank, num_topk):
    """Two low-latency dispatches in flight (hook mode), hooks called afterwards, then both
    combines: results alive at once stay independent (double buffering)."""
    rank, num_ranks = dist.get_rank(), dist.get_world_size()
    num_experts = experts_per_rank * num_ranks
    capacity = num_ranks * max_tokens
    rounds = [
        [
            make_rank_inputs(seed + i, r, num_tokens, hidden, num_experts, num_topk, masked_fraction=0.3)
            for r in range(num_ranks)
        ]
        for i in range(2)
    ]
    buffer = _ll_buffer(max_tokens, hidden, num_experts)
    sent = [
        buffer.low_latency_dispatch(
            inputs[rank].x,
            inputs[rank].topk_idx,
            max_tokens,
            num_experts,
            use_fp8=False,
            return_recv_hook=True,
        )
        for inputs in rounds
    ]
    assert sent[0][2].buffer_index != sent[1][2].buffer_index, "consecutive calls use the two buffers"
    for call in sent:
        call[4]()
    for inputs, (recv_x, recv_count, handle, _, _) in zip(rounds, sent):
        _check_ll_dispatch(
            recv_x, recv_count, handle, inputs, rank, num_experts, max_tokens, (False, False, False)
        )
    # Zero-copy staging buffers of the two handles are distinct.
    staging = [buffer.get_next_low_latency_combine_buffer(call[2]) for call in sent]
    assert staging[0].data_ptr() != staging[1].data_ptr()
    pending = []
    for i, (inputs, call) in enumerate(zip(rounds, sent)):
        expert_out = _expert_outputs(seed + 10 * i, rank, experts_per_rank, capacity, hidden)
        staging[i].copy_(expert_out)
        pending.append(
            buffer.low_latency_combine(
                expert_out,
                inputs[rank].topk_idx,
                inputs[rank].topk_weights,
                call[2],
                zero_copy=True,
                return_recv_hook=True,
            )
        )
    for i, (inputs, (combined, _, hook)) in enumerate(zip(rounds, pending)):
        hook()
        expected = reference_low_latency_combine(
            inputs,
            rank,
            num_experts,
            lambda dst, i=i: _expert_outputs(seed + 10 * i, dst, experts_per_rank, capacity, hidden),
        )
        assert_bitwise_equal(combined, expected, f"combine of in-flight call {i}")


def _clean_buffer_case(max_tokens, hidden, experts_per_rank):
    num_ranks = dist.get_world_size()
    num_experts = experts_per_rank * num_ranks
    buffer = _ll_buffer(max_tokens, hidden, num_experts)
    topk_idx = torch.zeros((1, 1), dtype=torch.int64)
    x = torch.ones((1, hidden), dtype=torch.bfloat16)
    _, _, handle, _, _ = buffer.low_latency_dispatch(x, topk_idx, max_tokens, num_experts, use_fp8=False)
    staging = buffer.get_next_low_latency_combine_buffer(handle)
    staging.fill_(3)
    buffer.clean_low_latency_buffer(max_tokens, hidden, num_experts)
    assert (staging == 0).all()


# --------------------------------------------------------------------------------------------------
# tests

FP8_FLAGS = {
    "bf16": (False, False, False),
    "fp8": (True, False, False),
    "fp8-round": (True, True, False),
    "fp8-ue8m0": (True, False, True),
    "fp8-round-ue8m0": (True, True, True),
}


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("flags", ["bf16", "fp8"])
def test_low_latency_matches_reference(cpu_pools, world_size, flags):
    counts = [3 + (5 * r) % 6 for r in range(world_size)]
    hidden = 130 if flags == "bf16" else 256
    received = cpu_pools(world_size).run(
        _ll_case, 31, counts, 8, hidden, 3, min(4, 3 * world_size), FP8_FLAGS[flags]
    )
    assert sum(received) > 0


@pytest.mark.parametrize("world_size", [1, 3])
def test_low_latency_combine_order(cpu_pools, world_size):
    """Top-k slots are summed in top-k order (power-of-two weights keep the products exact)."""
    counts = [8] * world_size
    cpu_pools(world_size).run(
        _ll_case, 39, counts, 8, 64, 4, 4, FP8_FLAGS["bf16"], 0.1, False, "plain", False, True
    )


@pytest.mark.parametrize("flags", ["fp8-round", "fp8-ue8m0", "fp8-round-ue8m0"])
def test_low_latency_fp8_scale_modes(cpu_pools, flags):
    # hidden 640: five scale blocks, so packed UE8M0 scales fill one and a quarter int32 words.
    cpu_pools(2).run(_ll_case, 32, [6, 4], 6, 640, 2, 3, FP8_FLAGS[flags])


@pytest.mark.parametrize("combine_mode", ["out", "zero_copy"])
@pytest.mark.parametrize("use_hook", [False, True], ids=["direct", "hook"])
def test_low_latency_combine_modes(cpu_pools, combine_mode, use_hook):
    cpu_pools(3).run(_ll_case, 33, [5, 2, 7], 7, 128, 2, 3, (True, False, False), 0.2, use_hook, combine_mode)


@pytest.mark.parametrize("flags", ["bf16", "fp8", "fp8-round-ue8m0"])
def test_low_latency_hook_mode(cpu_pools, flags):
    cpu_pools(2).run(_ll_case, 34, [8, 8], 8, 256, 2, 4, FP8_FLAGS[flags], 0.2, True)


@pytest.mark.parametrize(
    "counts,masked_fraction",
    [([0, 4, 3], 0.2), ([0, 0, 0], 0.0), ([4, 4, 4], 1.0), ([6, 5, 4], 0.8)],
    ids=["one-empty", "all-empty", "all-masked", "mostly-masked"],
)
def test_low_latency_zero_and_masked(cpu_pools, counts, masked_fraction):
    received = cpu_pools(3).run(_ll_case, 35, counts, 6, 128, 2, 3, (True, False, False), masked_fraction)
    if sum(counts) == 0 or masked_fraction == 1.0:
        assert received == [0, 0, 0]


def test_low_latency_full_batch_all_to_one_rank(cpu_pools):
    """N == num_max_dispatch_tokens_per_rank on every rank and every token picks the experts of
    one rank: that rank's slots fill to capacity."""
    cpu_pools(2).run(_ll_full_case, 36, 5, 128, 2)


def _ll_full_case(seed, max_tokens, hidden, experts_per_rank):
    rank, num_ranks = dist.get_rank(), dist.get_world_size()
    num_experts = experts_per_rank * num_ranks
    all_inputs = [
        make_rank_inputs(seed, r, max_tokens, hidden, num_experts, experts_per_rank) for r in range(num_ranks)
    ]
    for inputs in all_inputs:  # every token: all experts of the last rank
        inputs.topk_idx[:] = torch.arange(num_experts - experts_per_rank, num_experts)
    mine = all_inputs[rank]
    buffer = _ll_buffer(max_tokens, hidden, num_experts)
    recv_x, recv_count, handle, _, _ = buffer.low_latency_dispatch(
        mine.x, mine.topk_idx, max_tokens, num_experts
    )
    _check_ll_dispatch(
        recv_x, recv_count, handle, all_inputs, rank, num_experts, max_tokens, (True, False, False)
    )
    full = num_ranks * max_tokens if rank == num_ranks - 1 else 0
    assert recv_count.tolist() == [full] * experts_per_rank
    combined, _, _ = buffer.low_latency_combine(
        _expert_outputs(seed, rank, experts_per_rank, num_ranks * max_tokens, hidden),
        mine.topk_idx,
        mine.topk_weights,
        handle,
    )
    expected = reference_low_latency_combine(
        all_inputs,
        rank,
        num_experts,
        lambda dst: _expert_outputs(seed, dst, experts_per_rank, num_ranks * max_tokens, hidden),
    )
    assert_bitwise_equal(combined, expected, "combine of a full batch")


def test_low_latency_async(cpu_pools):
    cpu_pools(2).run(_ll_case, 37, [4, 6], 6, 128, 2, 3, (True, True, False), 0.2, False, "plain", True)


def test_low_latency_double_buffering(cpu_pools):
    cpu_pools(2).run(_double_buffer_case, 38, 5, 6, 64, 2, 3)


def test_clean_low_latency_buffer(cpu_pools):
    cpu_pools(2).run(_clean_buffer_case, 4, 64, 2)


def test_low_latency_topk_16(cpu_pools):
    cpu_pools(2).run(_ll_case, 40, [5, 7], 8, 128, 10, 16, FP8_FLAGS["fp8"], 0.1, False, "out")


@settings(max_examples=10, deadline=None)
@given(
    data=st.data(),
    world_size=st.sampled_from([1, 2]),
    experts_per_rank=st.integers(1, 5),
    blocks=st.integers(1, 5),
    flags=st.sampled_from(sorted(FP8_FLAGS)),
    masked_fraction=st.sampled_from([0.0, 0.3, 0.9]),
    use_hook=st.booleans(),
    combine_mode=st.sampled_from(["plain", "out", "zero_copy"]),
    seed=st.integers(0, 10_000),
)
def test_low_latency_random_shapes(
    cpu_pools,
    data,
    world_size,
    experts_per_rank,
    blocks,
    flags,
    masked_fraction,
    use_hook,
    combine_mode,
    seed,
):
    num_experts = experts_per_rank * world_size
    num_topk = data.draw(st.integers(1, min(num_experts, 16)), label="num_topk")
    max_tokens = data.draw(st.integers(1, 12), label="max_tokens")
    counts = data.draw(
        st.lists(st.integers(0, max_tokens), min_size=world_size, max_size=world_size), label="counts"
    )
    cpu_pools(world_size).run(
        _ll_case,
        seed,
        counts,
        max_tokens,
        128 * blocks,
        experts_per_rank,
        num_topk,
        FP8_FLAGS[flags],
        masked_fraction,
        use_hook,
        combine_mode,
    )
