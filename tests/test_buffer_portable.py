"""Normal-mode `Buffer` (get_dispatch_layout, dispatch, combine) on the portable backend over gloo,
checked call by call against the plain references in `deepep_megatron.testing.reference`.

Every rank regenerates every rank's inputs from a seed, so the expected result of each rank is
computed without communication. Tensors are compared bit for bit (dtype and shape included).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deepep_megatron import Buffer, EventOverlap
from deepep_megatron.fp8 import per_token_cast_to_fp8
from deepep_megatron.handle import DispatchHandle
from deepep_megatron.testing.reference import (
    make_rank_inputs,
    make_rows,
    reference_combine,
    reference_dispatch,
    reference_layout,
)

# --------------------------------------------------------------------------------------------------
# helpers (run on the ranks)

_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def assert_bitwise_equal(actual, expected: torch.Tensor, what: str) -> None:
    assert isinstance(actual, torch.Tensor), f"{what}: expected a tensor, got {type(actual).__name__}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert tuple(actual.shape) == tuple(expected.shape), (
        f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    )
    a, e = actual.contiguous(), expected.contiguous()
    if a.dtype.is_floating_point:
        a, e = a.view(_INT_VIEW[a.element_size()]), e.view(_INT_VIEW[e.element_size()])
    if not torch.equal(a, e):
        mismatch = (a != e).nonzero()
        raise AssertionError(f"{what}: {mismatch.size(0)} elements differ, first at {mismatch[0].tolist()}")


def _rank() -> tuple[int, int]:
    return dist.get_rank(), dist.get_world_size()


def _inputs(seed, num_tokens_of_rank, hidden, num_experts, num_topk, **kwargs):
    return [
        make_rank_inputs(seed, r, n, hidden, num_experts, num_topk, **kwargs)
        for r, n in enumerate(num_tokens_of_rank)
    ]


def _num_recv_rows(all_inputs, dst: int, num_experts: int) -> int:
    return len(reference_dispatch(all_inputs, dst, num_experts).src_rank)


def _check_layout(buffer, topk_idx, num_experts, num_ranks_per_node=None, **kwargs):
    """get_dispatch_layout vs reference_layout; returns the layout tuple."""
    out = buffer.get_dispatch_layout(topk_idx, num_experts, **kwargs)
    assert isinstance(out, tuple) and len(out) == 5
    per_rank, per_rdma_rank, per_expert, in_rank, event = out
    assert isinstance(event, EventOverlap)
    ref = reference_layout(topk_idx, num_experts, buffer.group_size, num_ranks_per_node)
    assert_bitwise_equal(per_rank, ref.num_tokens_per_rank, "num_tokens_per_rank")
    assert_bitwise_equal(per_expert, ref.num_tokens_per_expert, "num_tokens_per_expert")
    assert_bitwise_equal(in_rank, ref.is_token_in_rank, "is_token_in_rank")
    if ref.num_tokens_per_rdma_rank is None:
        assert per_rdma_rank is None
    else:
        assert_bitwise_equal(per_rdma_rank, ref.num_tokens_per_rdma_rank, "num_tokens_per_rdma_rank")
    return per_rank, per_rdma_rank, per_expert, in_rank


def _check_dispatch(result, ref, *, with_topk=True, with_weights=True, num_worst_tokens=0):
    """A fresh dispatch's 6-tuple vs the reference (BF16 payload)."""
    assert isinstance(result, tuple) and len(result) == 6
    recv_x, recv_topk_idx, recv_topk_weights, per_expert_list, handle, event = result
    assert isinstance(handle, DispatchHandle)
    assert isinstance(event, EventOverlap)
    num_rows = ref.recv_x.size(0)
    if num_worst_tokens:
        assert recv_x.size(0) == num_worst_tokens
        assert per_expert_list == []
    else:
        assert isinstance(per_expert_list, list) and all(type(c) is int for c in per_expert_list)
        assert per_expert_list == ref.num_recv_tokens_per_expert
    assert_bitwise_equal(recv_x[:num_rows], ref.recv_x, "recv_x")
    if with_topk:
        assert_bitwise_equal(recv_topk_idx[:num_rows], ref.recv_topk_idx, "recv_topk_idx")
        if num_worst_tokens:
            assert (recv_topk_idx[num_rows:] == -1).all(), "padded recv_topk_idx rows must be -1"
    else:
        assert recv_topk_idx is None
    if with_weights:
        assert_bitwise_equal(recv_topk_weights[:num_rows], ref.recv_topk_weights, "recv_topk_weights")
        if num_worst_tokens:
            assert (recv_topk_weights[num_rows:] == 0).all(), "padded recv_topk_weights rows must be 0"
    else:
        assert recv_topk_weights is None
    return result


def _biases(seed: int, rank: int, num_tokens: int, hidden: int, num_biases):
    """`num_biases`: 0 -> None, 1 -> one tensor, "1t" -> a 1-tuple, 2 -> a 2-tuple,
    "2n" -> (tensor, None). Returns (bias argument, tuple of the tensors it holds)."""
    b0 = make_rows(seed + 101, rank, num_tokens, hidden)
    b1 = make_rows(seed + 202, rank, num_tokens, hidden)
    return {
        0: (None, ()),
        1: (b0, (b0,)),
        "1t": ((b0,), (b0,)),
        2: ((b0, b1), (b0, b1)),
        "2n": ((b0, None), (b0,)),
    }[num_biases]


# --------------------------------------------------------------------------------------------------
# rank functions


def _dispatch_combine_case(
    seed,
    num_tokens_of_rank,
    hidden,
    experts_per_rank,
    num_topk,
    masked_fraction=0.0,
    single_expert=None,
    expert_alignment=1,
    num_biases=1,
    num_ranks_per_node=None,
    with_weights=True,
):
    rank, num_ranks = _rank()
    num_experts = experts_per_rank * num_ranks
    all_inputs = _inputs(
        seed,
        num_tokens_of_rank,
        hidden,
        num_experts,
        num_topk,
        masked_fraction=masked_fraction,
        single_expert=single_expert,
    )
    mine = all_inputs[rank]
    buffer = Buffer(dist.group.WORLD, num_ranks_per_node=num_ranks_per_node)

    per_rank, _, per_expert, in_rank = _check_layout(buffer, mine.topk_idx, num_experts, num_ranks_per_node)
    weights = mine.topk_weights if with_weights else None
    result = buffer.dispatch(
        mine.x,
        num_tokens_per_rank=per_rank,
        is_token_in_rank=in_rank,
        num_tokens_per_expert=per_expert,
        topk_idx=mine.topk_idx,
        topk_weights=weights,
        expert_alignment=expert_alignment,
    )
    ref = reference_dispatch(all_inputs, rank, num_experts, expert_alignment)
    _check_dispatch(result, ref, with_weights=with_weights)
    recv_x, _, recv_topk_weights, _, handle, _ = result

    # Combine: every rank feeds deterministic "expert outputs" that any rank can rebuild.
    combine_x = make_rows(seed, rank, recv_x.size(0), hidden)
    bias, bias_tensors = _biases(seed, rank, mine.x.size(0), hidden, num_biases)
    combined_x, combined_w, event = buffer.combine(
        combine_x, handle, topk_weights=recv_topk_weights, bias=bias
    )
    assert isinstance(event, EventOverlap)
    expected = reference_combine(
        all_inputs,
        rank,
        num_experts,
        lambda dst: make_rows(seed, dst, _num_recv_rows(all_inputs, dst, num_experts), hidden),
        bias_tensors,
    )
    assert_bitwise_equal(combined_x, expected, "combined_x")
    if with_weights:
        expected_w = reference_combine(
            all_inputs,
            rank,
            num_experts,
            lambda dst: reference_dispatch(all_inputs, dst, num_experts).recv_topk_weights,
            out_dtype=torch.float32,
        )
        assert_bitwise_equal(combined_w, expected_w, "combined_topk_weights")
        # Each top-k slot lives on exactly one rank, so the sum restores the routed weights.
        restored = torch.where(mine.topk_idx >= 0, mine.topk_weights, torch.zeros_like(mine.topk_weights))
        assert_bitwise_equal(combined_w, restored, "combined_topk_weights vs routed weights")
    else:
        assert combined_w is None

    # Dispatching then combining the received rows unchanged multiplies each token by the
    # number of ranks it went to (exact for these small counts up to bf16 rounding of x * k).
    round_trip, _, _ = buffer.combine(recv_x, handle)
    copies = in_rank.sum(1, keepdim=True).float()
    expected = (mine.x.float() * copies + 0.0).to(torch.bfloat16)  # + 0.0: tokens sent nowhere are +0
    assert_bitwise_equal(round_trip, expected, "combine(dispatch(x))")
    return recv_x.size(0)


def _cached_dispatch_case(seed, num_tokens_of_rank, hidden, experts_per_rank, num_topk, use_fp8):
    rank, num_ranks = _rank()
    num_experts = experts_per_rank * num_ranks
    all_inputs = _inputs(seed, num_tokens_of_rank, hidden, num_experts, num_topk, masked_fraction=0.2)
    mine = all_inputs[rank]
    buffer = Buffer(dist.group.WORLD)
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(mine.topk_idx, num_experts)

    def payload(x):
        return per_token_cast_to_fp8(x) if use_fp8 else x

    first = buffer.dispatch(
        payload(mine.x),
        num_tokens_per_rank=per_rank,
        is_token_in_rank=in_rank,
        num_tokens_per_expert=per_expert,
        topk_idx=mine.topk_idx,
        topk_weights=mine.topk_weights,
    )
    handle = first[4]
    # Same input through the handle: the same received tensors.
    again = buffer.dispatch(payload(mine.x), handle=handle)
    assert isinstance(again, tuple) and len(again) == 6
    assert again[1:5] == (None, None, None, None)
    assert isinstance(again[5], EventOverlap)
    if use_fp8:
        assert isinstance(again[0], tuple) and len(again[0]) == 2
        assert_bitwise_equal(again[0][0], first[0][0], "cached recv_x (fp8)")
        assert_bitwise_equal(again[0][1], first[0][1], "cached recv scales")
    else:
        assert_bitwise_equal(again[0], first[0], "cached recv_x")

    # New data through the handle (as in the backward pass): the same layout, new rows.
    new_x = [make_rows(seed + 7, r, n, hidden) for r, n in enumerate(num_tokens_of_rank)]
    recv_new = buffer.dispatch(payload(new_x[rank]), handle=handle)[0]
    ref = reference_dispatch(all_inputs, rank, num_experts)
    if use_fp8:
        casts = [per_token_cast_to_fp8(x) for x in new_x]
        expected_x = _gather_rows([c[0] for c in casts], ref, hidden, torch.float8_e4m3fn)
        expected_s = _gather_rows([c[1] for c in casts], ref, hidden // 128, torch.float32)
        assert_bitwise_equal(recv_new[0], expected_x, "cached recv_x (new fp8 data)")
        assert_bitwise_equal(recv_new[1], expected_s, "cached recv scales (new data)")
    else:
        assert_bitwise_equal(
            recv_new, _gather_rows(new_x, ref, hidden, torch.bfloat16), "cached recv_x (new data)"
        )
    # The handle still combines.
    combined, _, _ = buffer.combine(make_rows(seed, rank, handle.num_recv_rows, hidden), handle)
    expected = reference_combine(
        all_inputs,
        rank,
        num_experts,
        lambda dst: make_rows(seed, dst, _num_recv_rows(all_inputs, dst, num_experts), hidden),
    )
    assert_bitwise_equal(combined, expected, "combine after cached dispatch")


def _gather_rows(per_rank_rows, ref, width, dtype):
    """The rows `ref` says this rank receives, taken from every rank's `per_rank_rows`."""
    rows = [per_rank_rows[src][token] for src, token in zip(ref.src_rank, ref.src_token)]
    return torch.stack(rows) if rows else torch.empty((0, width), dtype=dtype)


def _fp8_case(seed, num_tokens_of_rank, hidden, experts_per_rank, num_topk, round_scale):
    rank, num_ranks = _rank()
    num_experts = experts_per_rank * num_ranks
    all_inputs = _inputs(seed, num_tokens_of_rank, hidden, num_experts, num_topk, masked_fraction=0.2)
    mine = all_inputs[rank]
    casts = [per_token_cast_to_fp8(inputs.x, round_scale=round_scale) for inputs in all_inputs]
    buffer = Buffer(dist.group.WORLD)
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(mine.topk_idx, num_experts)
    x_fp8, scales = casts[rank]
    result = buffer.dispatch(
        (x_fp8, scales),
        num_tokens_per_rank=per_rank,
        is_token_in_rank=in_rank,
        num_tokens_per_expert=per_expert,
        topk_idx=mine.topk_idx,
        topk_weights=mine.topk_weights,
    )
    assert len(result) == 6
    recv, recv_topk_idx, recv_topk_weights, per_expert_list, handle, _ = result
    assert isinstance(recv, tuple) and len(recv) == 2, "FP8 dispatch returns (x_fp8, scales)"
    ref = reference_dispatch(all_inputs, rank, num_experts)
    assert_bitwise_equal(
        recv[0], _gather_rows([c[0] for c in casts], ref, hidden, torch.float8_e4m3fn), "recv x_fp8"
    )
    assert_bitwise_equal(
        recv[1], _gather_rows([c[1] for c in casts], ref, hidden // 128, torch.float32), "recv scales"
    )
    assert_bitwise_equal(recv_topk_idx, ref.recv_topk_idx, "recv_topk_idx")
    assert_bitwise_equal(recv_topk_weights, ref.recv_topk_weights, "recv_topk_weights")
    assert per_expert_list == ref.num_recv_tokens_per_expert
    # Combine after an FP8 dispatch takes BF16 rows of the same hidden size.
    combined, _, _ = buffer.combine(make_rows(seed, rank, recv[0].size(0), hidden), handle)
    expected = reference_combine(
        all_inputs,
        rank,
        num_experts,
        lambda dst: make_rows(seed, dst, _num_recv_rows(all_inputs, dst, num_experts), hidden),
    )
    assert_bitwise_equal(combined, expected, "combine after FP8 dispatch")


def _worst_tokens_case(seed, num_tokens_of_rank, hidden, experts_per_rank, num_topk, use_fp8):
    rank, num_ranks = _rank()
    num_experts = experts_per_rank * num_ranks
    all_inputs = _inputs(seed, num_tokens_of_rank, hidden, num_experts, num_topk, masked_fraction=0.2)
    mine = all_inputs[rank]
    num_worst_tokens = sum(num_tokens_of_rank) + 3  # more than any rank can receive
    buffer = Buffer(dist.group.WORLD)
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(mine.topk_idx, num_experts)
    casts = [per_token_cast_to_fp8(inputs.x) for inputs in all_inputs] if use_fp8 else None
    x = casts[rank] if use_fp8 else mine.x
    result = buffer.dispatch(
        x,
        num_tokens_per_rank=per_rank,
        is_token_in_rank=in_rank,
        num_tokens_per_expert=per_expert,
        topk_idx=mine.topk_idx,
        topk_weights=mine.topk_weights,
        num_worst_tokens=num_worst_tokens,
    )
    ref = reference_dispatch(all_inputs, rank, num_experts)
    num_rows = ref.recv_x.size(0)
    if use_fp8:
        recv_fp8, recv_scales = result[0]
        assert recv_fp8.size(0) == recv_scales.size(0) == num_worst_tokens
        expected = _gather_rows([c[0] for c in casts], ref, hidden, torch.float8_e4m3fn)
        assert_bitwise_equal(recv_fp8[:num_rows], expected, "recv x_fp8 (worst-case rows)")
        expected = _gather_rows([c[1] for c in casts], ref, hidden // 128, torch.float32)
        assert_bitwise_equal(recv_scales[:num_rows], expected, "recv scales (worst-case rows)")
        assert result[3] == []
        assert_bitwise_equal(result[1][:num_rows], ref.recv_topk_idx, "recv_topk_idx")
        assert (result[1][num_rows:] == -1).all() and (result[2][num_rows:] == 0).all()
        assert result[1].size(0) == result[2].size(0) == num_worst_tokens
    else:
        _check_dispatch(result, ref, num_worst_tokens=num_worst_tokens)
        assert result[1].size(0) == result[2].size(0) == num_worst_tokens
    handle = result[4]

    # Combine takes the padded tensor; whatever sits in the padded rows is ignored.
    combine_x = make_rows(seed, rank, num_worst_tokens, hidden)
    combine_x[num_rows:] = 1e4
    combine_w = result[2].clone()
    combine_w[num_rows:] = 1e4
    combined, combined_w, _ = buffer.combine(combine_x, handle, topk_weights=combine_w)
    expected = reference_combine(
        all_inputs,
        rank,
        num_experts,
        lambda dst: make_rows(seed, dst, num_worst_tokens, hidden),  # only the first rows count
    )
    assert_bitwise_equal(combined, expected, "combine of padded x")
    restored = torch.where(mine.topk_idx >= 0, mine.topk_weights, torch.zeros_like(mine.topk_weights))
    assert_bitwise_equal(combined_w, restored, "combined_topk_weights of padded weights")

    # A cached dispatch through a worst-case handle returns the padded size too.
    cached = buffer.dispatch(x, handle=handle)[0]
    cached_x = cached[0] if use_fp8 else cached
    assert cached_x.size(0) == num_worst_tokens
    first_x = result[0][0] if use_fp8 else result[0]
    assert_bitwise_equal(cached_x[:num_rows], first_x[:num_rows], "cached dispatch with a worst-case handle")


def _worst_tokens_too_small_case(hidden):
    """Every token goes to every rank, so each rank receives sum(N) rows > num_worst_tokens."""
    rank, num_ranks = _rank()
    num_experts = num_ranks
    topk_idx = torch.arange(num_ranks, dtype=torch.int64).repeat(4, 1)
    x = torch.ones((4, hidden), dtype=torch.bfloat16)
    buffer = Buffer(dist.group.WORLD)
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, num_experts)
    with pytest.raises((RuntimeError, ValueError), match="num_worst_tokens"):
        buffer.dispatch(
            x,
            num_tokens_per_rank=per_rank,
            is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert,
            topk_idx=topk_idx,
            num_worst_tokens=4 * num_ranks - 1,
        )
    return True


def _async_case(seed, num_tokens_of_rank, hidden, experts_per_rank, num_topk):
    rank, num_ranks = _rank()
    num_experts = experts_per_rank * num_ranks
    all_inputs = _inputs(seed, num_tokens_of_rank, hidden, num_experts, num_topk, masked_fraction=0.1)
    mine = all_inputs[rank]
    buffer = Buffer(dist.group.WORLD)
    previous = buffer.capture()
    assert isinstance(previous, EventOverlap)
    layout = buffer.get_dispatch_layout(
        mine.topk_idx, num_experts, previous_event=previous, async_finish=True, allocate_on_comm_stream=True
    )
    per_rank, _, per_expert, in_rank, event = layout
    assert isinstance(event, EventOverlap)
    event.current_stream_wait()
    result = buffer.dispatch(
        mine.x,
        num_tokens_per_rank=per_rank,
        is_token_in_rank=in_rank,
        num_tokens_per_expert=per_expert,
        topk_idx=mine.topk_idx,
        topk_weights=mine.topk_weights,
        previous_event=event,
        async_finish=True,
        allocate_on_comm_stream=True,
        config=Buffer.get_dispatch_config(num_ranks),
    )
    with result[5] as entered:  # compute could overlap here
        assert isinstance(entered, EventOverlap)
    _check_dispatch(result, reference_dispatch(all_inputs, rank, num_experts))
    handle = result[4]
    combine_x = make_rows(seed, rank, handle.num_recv_rows, hidden)
    combined, _, event = buffer.combine(
        combine_x,
        handle,
        previous_event=buffer.capture(),
        async_finish=True,
        allocate_on_comm_stream=True,
        config=Buffer.get_combine_config(num_ranks),
    )
    assert isinstance(event, EventOverlap)
    event.current_stream_wait()
    with event:
        pass
    expected = reference_combine(
        all_inputs,
        rank,
        num_experts,
        lambda dst: make_rows(seed, dst, _num_recv_rows(all_inputs, dst, num_experts), hidden),
    )
    assert_bitwise_equal(combined, expected, "async combine")
    cached = buffer.dispatch(mine.x, handle=handle, previous_event=event, async_finish=True)
    assert isinstance(cached[5], EventOverlap)
    assert_bitwise_equal(cached[0], result[0], "async cached dispatch")


def _repeated_calls_case(seed, hidden, experts_per_rank, num_topk):
    """One Buffer, several dispatch/combine rounds of different sizes: no state leaks between calls."""
    rank, num_ranks = _rank()
    num_experts = experts_per_rank * num_ranks
    buffer = Buffer(dist.group.WORLD)
    handles = []
    for round_ in range(3):
        counts = [(3 + 5 * r + 7 * round_) % 11 for r in range(num_ranks)]
        all_inputs = _inputs(seed + round_, counts, hidden, num_experts, num_topk, masked_fraction=0.3)
        mine = all_inputs[rank]
        per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(mine.topk_idx, num_experts)
        result = buffer.dispatch(
            mine.x,
            num_tokens_per_rank=per_rank,
            is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert,
            topk_idx=mine.topk_idx,
            topk_weights=mine.topk_weights,
        )
        _check_dispatch(result, reference_dispatch(all_inputs, rank, num_experts))
        handles.append((all_inputs, result[4], seed + round_))
    # Handles stay valid after later dispatches: combine them in reverse order.
    for all_inputs, handle, s in reversed(handles):
        combined, _, _ = buffer.combine(make_rows(s, rank, handle.num_recv_rows, hidden), handle)
        expected = reference_combine(
            all_inputs,
            rank,
            num_experts,
            lambda dst, ai=all_inputs, s=s: make_rows(s, dst, _num_recv_rows(ai, dst, num_experts), hidden),
        )
        assert_bitwise_equal(combined, expected, "combine of an older handle")


# --------------------------------------------------------------------------------------------------
# tests


def _token_counts(num_ranks: int, base: int = 5) -> list[int]:
    """Uneven token counts per rank."""
    return [base + (7 * r) % 9 for r in range(num_ranks)]


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 8])
def test_dispatch_combine_matches_reference(cpu_pools, world_size):
    pool = cpu_pools(world_size)
    rows = pool.run(
        _dispatch_combine_case,
        11,
        _token_counts(world_size),
        130,
        3,
        min(4, 3 * world_size),
        masked_fraction=0.25,
    )
    assert sum(rows) > 0


@pytest.mark.parametrize(
    "world_size,counts",
    [
        (1, [0]),
        (2, [0, 6]),
        (3, [5, 4, 0]),
        (3, [0, 0, 0]),
        (4, [0, 7, 0, 3]),
    ],
    ids=["1-empty", "2-first-empty", "3-last-empty", "3-all-empty", "4-two-empty"],
)
def test_zero_tokens(cpu_pools, world_size, counts):
    rows = cpu_pools(world_size).run(_dispatch_combine_case, 12, counts, 8, 2, 2, masked_fraction=0.2)
    if sum(counts) == 0:
        assert rows == [0] * world_size


@pytest.mark.parametrize("world_size", [2, 3])
def test_heavily_masked_topk(cpu_pools, world_size):
    # With 70% of slots at -1 many tokens go nowhere; they combine to their bias alone.
    cpu_pools(world_size).run(_dispatch_combine_case, 13, [12] * world_size, 16, 2, 3, masked_fraction=0.7)


@pytest.mark.parametrize("world_size,expert", [(2, 0), (3, -1), (4, 5)])
def test_all_tokens_to_one_expert(cpu_pools, world_size, expert):
    experts_per_rank = 2
    expert = expert % (experts_per_rank * world_size)
    rows = cpu_pools(world_size).run(
        _dispatch_combine_case, 14, _token_counts(world_size), 6, experts_per_rank, 3, single_expert=expert
    )
    owner = expert // experts_per_rank
    assert rows == [sum(_token_counts(world_size)) if r == owner else 0 for r in range(world_size)]


@pytest.mark.parametrize("world_size,alignment", [(1, 4), (2, 3), (3, 16), (4, 128)])
def test_expert_alignment(cpu_pools, world_size, alignment):
    cpu_pools(world_size).run(
        _dispatch_combine_case,
        15,
        _token_counts(world_size),
        6,
        3,
        3,
        masked_fraction=0.2,
        expert_alignment=alignment,
    )


def test_topk_16(cpu_pools):
    """DeepEP stops at top-k 11; we take up to 16."""
    cpu_pools(2).run(_dispatch_combine_case, 25, [6, 9], 8, 10, 16, masked_fraction=0.1, num_biases=2)


@pytest.mark.parametrize("num_biases", [0, 1, "1t", 2, "2n"])
def test_combine_bias(cpu_pools, num_biases):
    cpu_pools(2).run(_dispatch_combine_case, 16, [9, 6], 10, 2, 3, masked_fraction=0.3, num_biases=num_biases)


def test_combine_without_topk_weights(cpu_pools):
    cpu_pools(3).run(_dispatch_combine_case, 17, [4, 9, 6], 10, 2, 2, with_weights=False, num_biases=2)


@pytest.mark.parametrize("hidden", [2, 6, 130])
def test_odd_hidden_sizes(cpu_pools, hidden):
    cpu_pools(3).run(_dispatch_combine_case, 18, [5, 8, 3], hidden, 2, 3, masked_fraction=0.2)


@pytest.mark.parametrize("world_size,ranks_per_node", [(4, 2), (4, 1), (8, 4)])
def test_multi_node_layout(cpu_pools, world_size, ranks_per_node):
    """Groups larger than a node report num_tokens_per_rdma_rank; results are unchanged."""
    cpu_pools(world_size).run(
        _dispatch_combine_case,
        19,
        _token_counts(world_size, 3),
        4,
        2,
        3,
        masked_fraction=0.2,
        num_ranks_per_node=ranks_per_node,
    )


@pytest.mark.parametrize("use_fp8", [False, True], ids=["bf16", "fp8"])
def test_cached_dispatch(cpu_pools, use_fp8):
    hidden = 256 if use_fp8 else 10
    cpu_pools(3).run(_cached_dispatch_case, 20, [6, 0, 9], hidden, 2, 3, use_fp8)


@pytest.mark.parametrize("world_size,round_scale", [(1, False), (2, True), (3, False)])
def test_fp8_dispatch(cpu_pools, world_size, round_scale):
    cpu_pools(world_size).run(_fp8_case, 21, _token_counts(world_size), 384, 3, 3, round_scale)


@pytest.mark.parametrize("world_size,use_fp8", [(2, False), (3, False), (3, True)])
def test_num_worst_tokens(cpu_pools, world_size, use_fp8):
    hidden = 128 if use_fp8 else 6
    cpu_pools(world_size).run(_worst_tokens_case, 22, _token_counts(world_size), hidden, 2, 3, use_fp8)


def test_num_worst_tokens_too_small(cpu_pools):
    assert cpu_pools(2).run(_worst_tokens_too_small_case, 4) == [True, True]


def test_async_arguments_give_the_same_results_on_cpu(cpu_pools):
    """`previous_event`, `async_finish` and `allocate_on_comm_stream` are accepted, give
    `EventOverlap`s and leave the results unchanged. On the CPU every call completes before it
    returns, so stream ordering itself is tested on the GPU (tests/test_gpu_streams.py)."""
    cpu_pools(2).run(_async_case, 23, [7, 5], 8, 2, 3)


def test_repeated_calls_and_old_handles(cpu_pools):
    cpu_pools(3).run(_repeated_calls_case, 24, 6, 2, 3)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    data=st.data(),
    world_size=st.sampled_from([1, 2]),
    hidden=st.integers(1, 40).map(lambda h: 2 * h),
    experts_per_rank=st.integers(1, 4),
    masked_fraction=st.sampled_from([0.0, 0.3, 0.9]),
    expert_alignment=st.sampled_from([1, 2, 8]),
    num_biases=st.sampled_from([0, 1, 2]),
    seed=st.integers(0, 10_000),
)
def test_random_shapes(
    cpu_pools, data, world_size, hidden, experts_per_rank, masked_fraction, expert_alignment, num_biases, seed
):
    num_experts = experts_per_rank * world_size
    num_topk = data.draw(st.integers(1, min(num_experts, 16)), label="num_topk")
    counts = data.draw(st.lists(st.integers(0, 20), min_size=world_size, max_size=world_size), label="counts")
    cpu_pools(world_size).run(
        _dispatch_combine_case,
        seed,
        counts,
        hidden,
        experts_per_rank,
        num_topk,
        masked_fraction=masked_fraction,
        expert_alignment=expert_alignment,
        num_biases=num_biases,
    )
