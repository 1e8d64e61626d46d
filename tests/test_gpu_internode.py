"""GPU tests of the compiled internode kernels (NVSHMEM + forwarding inside a node): R ranks on one
GPU under MPS (or one rank per GPU), split into nodes of `num_ranks_per_node` consecutive ranks so
that the network path (NVSHMEM put-with-signal between same-index ranks of different nodes) and the
forwarding path (stores through the node's mappings) both run on one host.

Each case runs the same random inputs through the kernels and through the portable backend on the
same gloo group:
- the layout (`num_tokens_per_rdma_rank` included) and the dispatch outputs (rows, FP8 scales,
  top-k ids and weights, per-expert counts, source indices, padding) must be bit-identical;
- combine must equal, bit for bit, a plain reference that sums node by node
  (`testing.reference.reference_combine_by_node`), on expert outputs whose values expose the order
  of addition; and it must be close to the portable backend's rank-by-rank sum;
- the soak also checks combine(dispatch(x)) == x * ranks reached exactly (order-independent).

Skipped without CUDA or without the internode kernels in `deepep_megatron._nvshmem`.
"""

from __future__ import annotations

import faulthandler
import gc
import os
import time

import pytest
import torch

from deepep_megatron.backends import internode, nvshmem

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or internode._kernels() is None,
        reason="needs CUDA and the internode kernels (deepep_megatron._nvshmem)",
    ),
]

EXPERTS_PER_RANK = 4


@pytest.fixture(scope="module")
def gpu_pools():
    from deepep_megatron.testing.rank_pool import GpuPools

    pools = GpuPools(
        {
            "DEEPEP_MEGATRON_TIMEOUT_S": "20",
            # Room for every buffer a pool holds at once (NVSHMEM sizes the heap at its first init).
            "NVSHMEM_SYMMETRIC_SIZE": str(6 << 30),
        }
    )
    yield pools
    pools.close()


# ----------------------------------------------------------------------------- rank helpers
_BUFFERS: dict = {}


# Every case fits one buffer per topology: at most this many tokens per rank, hidden and top-k.
BUFFER_SIZES = (128, 7168, 16)


def _buffers(ranks_per_node: int):
    """(compiled, portable) Buffers of this rank for nodes of `ranks_per_node`, reused across cases."""
    import torch.distributed as dist

    from deepep_megatron import Buffer

    num_ranks = dist.get_world_size()
    if ranks_per_node not in _BUFFERS:
        size = internode.rdma_size_hint(*BUFFER_SIZES[:2], num_ranks, ranks_per_node, BUFFER_SIZES[2])
        compiled = Buffer(
            dist.group.WORLD,
            num_rdma_bytes=size,
            backend="cuda",
            num_ranks_per_node=ranks_per_node,
            explicitly_destroy=True,
        )
        assert compiled.backend_name == "internode", compiled.backend_summary
        portable = Buffer(dist.group.WORLD, backend="portable", num_ranks_per_node=ranks_per_node)
        _BUFFERS[ranks_per_node] = (compiled, portable)
    return _BUFFERS[ranks_per_node]


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().contiguous().cpu()
    if t.dtype.is_floating_point:
        t = t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])
    return t


def _assert_same(what: str, got, want) -> None:
    if want is None or got is None:
        assert got is None and want is None, f"{what}: {got is None} vs {want is None}"
        return
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    assert tuple(got.shape) == tuple(want.shape), f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    a, b = _bits(got), _bits(want)
    if not torch.equal(a, b):
        bad = (a != b).nonzero()
        raise AssertionError(f"{what}: {bad.size(0)} elements differ, first at {bad[0].tolist()}")


def _num_tokens(case: dict, rank: int) -> int:
    tokens = case["num_tokens"]
    return tokens[rank] if isinstance(tokens, (list, tuple)) else tokens


def _all_inputs(seed: int, case: dict, num_ranks: int):
    """Every rank's inputs (regenerated on every rank, CPU), routed as the case says."""
    from deepep_megatron.routing import topk_routing
    from deepep_megatron.testing.reference import RankInputs, make_rank_inputs

    num_experts, num_topk, routing = case["num_experts"], case["num_topk"], case.get("routing", "random")
    ranks_per_node = case["ranks_per_node"]
    out = []
    for rank in range(num_ranks):
        n = _num_tokens(case, rank)
        inputs = make_rank_inputs(
            seed,
            rank,
            n,
            case["hidden"],
            num_experts,
            num_topk,
            masked_fraction=0.3 if routing == "masked" else 0.0,
            single_expert=(num_experts - 1) if routing == "one_expert" else None,
        )
        if routing == "group_limited":  # one expert group per node, at most 2 nodes per token
            logits = torch.randn((n, num_experts), generator=torch.Generator().manual_seed(seed * 31 + rank))
            groups = num_ranks // ranks_per_node
            idx, _ = topk_routing(logits, num_topk, num_groups=groups, topk_groups=min(2, groups))
            inputs = RankInputs(inputs.x, idx, inputs.topk_weights)
        elif routing == "skip_last_node":  # the last node receives nothing
            experts_kept = num_experts - EXPERTS_PER_RANK * ranks_per_node
            scores = torch.rand((n, experts_kept), generator=torch.Generator().manual_seed(seed * 37 + rank))
            inputs = RankInputs(inputs.x, scores.topk(num_topk, dim=1).indices, inputs.topk_weights)
        out.append(inputs)
    return out


def _expert_rows(seed: int, rank: int, num_rows: int, hidden: int) -> torch.Tensor:
    from deepep_megatron.testing.reference import make_rows

    return make_rows(seed, rank, num_rows, hidden)


def _biases(seed: int, rank: int, num_tokens: int, hidden: int, count: int):
    generator = torch.Generator().manual_seed(seed * 101 + rank)
    return tuple(
        torch.randn((num_tokens, hidden), generator=generator).to(torch.bfloat16) for _ in range(count)
    )


def run_case(seed: int, case: dict) -> int:
    """One layout + dispatch (+ cached dispatch) + combine through both backends; returns the rows
    this rank received."""
    import torch.distributed as dist

    from deepep_megatron.fp8 import per_token_cast_to_fp8
    from deepep_megatron.limits import FP8_BLOCK_SIZE
    from deepep_megatron.testing.reference import reference_combine_by_node, reference_dispatch

    rank, num_ranks = dist.get_rank(), dist.get_world_size()
    hidden, num_experts, ranks_per_node = case["hidden"], case["num_experts"], case["ranks_per_node"]
    compiled, portable = _buffers(ranks_per_node)
    all_inputs = _all_inputs(seed, case, num_ranks)
    mine = all_inputs[rank]
    x, topk_idx, topk_weights = mine.x.cuda(), mine.topk_idx.cuda(), mine.topk_weights.cuda()
    weights = topk_weights if case.get("weights", True) else None
    payload = per_token_cast_to_fp8(x) if case.get("fp8") else x

    got_layout = compiled.get_dispatch_layout(topk_idx, num_experts)
    want_layout = portable.get_dispatch_layout(topk_idx, num_experts)
    for name, a, b in zip(
        ("per_rank", "per_rdma_rank", "per_expert", "in_rank"), got_layout[:4], want_layout[:4]
    ):
        _assert_same(f"{case} layout {name}", a, b)
    assert got_layout[1] is not None, "a group spanning nodes reports tokens per node"
    layout = dict(
        num_tokens_per_rank=got_layout[0],
        num_tokens_per_rdma_rank=got_layout[1],
        num_tokens_per_expert=got_layout[2],
        is_token_in_rank=got_layout[3],
        topk_idx=topk_idx,
        topk_weights=weights,
        expert_alignment=case.get("alignment", 1),
        num_worst_tokens=case.get("worst", 0),
    )
    got = compiled.dispatch(payload, **layout)
    want = portable.dispatch(payload, **layout)
    got_x, want_x = got[0], want[0]
    if case.get("fp8"):
        _assert_same(f"{case} recv scales", got_x[1], want_x[1])
        got_x, want_x = got_x[0], want_x[0]
    _assert_same(f"{case} recv_x", got_x, want_x)
    _assert_same(f"{case} recv_topk_idx", got[1], want[1])
    _assert_same(f"{case} recv_topk_weights", got[2], want[2])
    assert got[3] == want[3], f"{case} per-expert counts {got[3]} != {want[3]}"
    handle, want_handle = got[4], want[4]
    _assert_same(f"{case} recv_src_idx", handle.recv_src_idx, want_handle.recv_src_idx)
    assert handle.num_recv_rows == want_handle.num_recv_rows
    if not case.get("worst"):
        ref = reference_dispatch(all_inputs, rank, num_experts)
        assert handle.recv_src_idx.cpu().tolist() == ref.src_token, (
            f"{case}: source tokens differ from the reference"
        )

    # Cached dispatch: the same rows again, BF16 and (where the hidden size allows) FP8.
    cached_payloads = [x] + ([per_token_cast_to_fp8(x)] if hidden % FP8_BLOCK_SIZE == 0 else [])
    for cached_payload in cached_payloads:
        got_cached = compiled.dispatch(cached_payload, handle=handle)[0]
        want_cached = portable.dispatch(cached_payload, handle=want_handle)[0]
        if isinstance(got_cached, tuple):
            _assert_same(f"{case} cached scales", got_cached[1], want_cached[1])
            got_cached, want_cached = got_cached[0], want_cached[0]
        _assert_same(f"{case} cached recv_x", got_cached, want_cached)

    # Combine of expert outputs whose values show the order of addition.
    num_rows = handle.num_recv_rows
    expert_out = _expert_rows(seed, rank, num_rows, hidden).cuda()
    biases = _biases(seed, rank, x.size(0), hidden, case.get("biases", 0))
    bias_arg = tuple(b.cuda() for b in biases) if biases else None
    combined, combined_w, _ = compiled.combine(
        expert_out, handle, topk_weights=got[2] if weights is not None else None, bias=bias_arg
    )
    received = [reference_dispatch(all_inputs, r, num_experts) for r in range(num_ranks)]
    rows_of = lambda r: _expert_rows(seed, r, max(len(received[r].src_token), case.get("worst", 0)), hidden)  # noqa: E731
    want_combined = reference_combine_by_node(all_inputs, rank, num_experts, rows_of, ranks_per_node, biases)
    _assert_same(f"{case} combined (node-by-node reference)", combined, want_combined)
    if weights is not None:
        weights_of = lambda r: received[r].recv_topk_weights  # noqa: E731
        want_w = reference_combine_by_node(
            all_inputs, rank, num_experts, weights_of, ranks_per_node, (), torch.float32
        )
        _assert_same(f"{case} combined weights", combined_w, want_w)
    # Against the portable backend's rank-by-rank order, on plain values: equal up to rounding.
    plain = torch.randn((num_rows, hidden), generator=torch.Generator().manual_seed(seed + rank)).to(
        torch.bfloat16
    )
    got_plain = compiled.combine(plain.cuda(), handle)[0].float()
    want_plain = portable.combine(plain.cuda(), want_handle)[0].float()
    torch.testing.assert_close(got_plain, want_plain, rtol=2e-2, atol=2e-2)
    torch.cuda.synchronize()
    return int(got_x.size(0))


def run_cases(seed: int, cases: list[dict]) -> int:
    faulthandler.enable()
    return sum(run_case(seed + i, case) for i, case in enumerate(cases))


def _cases(num_ranks: int, ranks_per_node: int) -> list[dict]:
    experts = EXPERTS_PER_RANK * num_ranks
    base = dict(ranks_per_node=ranks_per_node, num_experts=experts, num_topk=4, hidden=256, num_tokens=48)
    zero_first = [0] + [40] * (num_ranks - 1)
    return [
        dict(base),
        dict(base, fp8=True),
        dict(base, routing="group_limited", biases=2),
        dict(base, routing="masked", alignment=8, weights=False),
        dict(base, routing="one_expert", biases=1),
        dict(base, routing="skip_last_node"),
        dict(base, num_tokens=zero_first, fp8=True),
        dict(base, worst=48 * num_ranks),
        dict(base, hidden=130),  # 260-byte rows: the 4-byte path of every kernel
        dict(base, hidden=384, fp8=True, num_topk=8),  # an odd multiple of 128 channels
        dict(base, hidden=7168, fp8=True, num_tokens=24, num_topk=8),
        dict(base, hidden=7168, num_tokens=24, num_topk=8, routing="group_limited"),
    ]


def soak(seed: int, ranks_per_node: int, iterations: int) -> int:
    """Changing shapes, routings, dtypes and cached calls, every result checked exactly:
    dispatch against the portable backend, combine(dispatch(x)) against x * ranks reached."""
    import random

    import torch.distributed as dist

    from deepep_megatron.fp8 import per_token_cast_to_fp8

    faulthandler.enable()
    rank, num_ranks = dist.get_rank(), dist.get_world_size()
    experts = EXPERTS_PER_RANK * num_ranks
    compiled, portable = _buffers(ranks_per_node)
    shared = random.Random(seed)  # the same shapes on every rank
    mine = torch.Generator().manual_seed(seed * 1000 + rank)
    received = 0
    for i in range(iterations):
        hidden = shared.choice([128, 130, 256, 512])
        topk = shared.choice([1, 4, 6])
        fp8 = hidden % 128 == 0 and shared.random() < 0.4
        n = int(torch.randint(0, 97, (1,), generator=mine))
        x = torch.randn((n, hidden), generator=mine).to(torch.bfloat16).cuda()
        scores = torch.rand((n, experts), generator=mine)
        topk_idx = scores.topk(topk, dim=1).indices.cuda()
        if shared.random() < 0.3:
            topk_idx = topk_idx.masked_fill(torch.rand(topk_idx.shape, generator=mine).cuda() < 0.4, -1)
        weights = torch.rand((n, topk), generator=mine).cuda()
        layout = compiled.get_dispatch_layout(topk_idx, experts)
        kwargs = dict(
            num_tokens_per_rank=layout[0],
            num_tokens_per_rdma_rank=layout[1],
            num_tokens_per_expert=layout[2],
            is_token_in_rank=layout[3],
            topk_idx=topk_idx,
            topk_weights=weights,
        )
        payload = per_token_cast_to_fp8(x) if fp8 else x
        got = compiled.dispatch(payload, **kwargs)
        want = portable.dispatch(payload, **kwargs)
        got_x, want_x = (got[0][0], want[0][0]) if fp8 else (got[0], want[0])
        _assert_same(f"soak {i} recv_x", got_x, want_x)
        _assert_same(f"soak {i} recv_topk_idx", got[1], want[1])
        handle = got[4]
        if shared.random() < 0.3:
            got_x = compiled.dispatch(x, handle=handle)[0]
        bf16_rows = got_x if not fp8 else compiled.dispatch(x, handle=handle)[0]
        combined = compiled.combine(bf16_rows, handle)[0]
        reached = layout[3].sum(1, dtype=torch.float32).unsqueeze(1)
        # + 0.0: a token that reached no rank sums to +0 in the kernels, while x * 0 may be -0.
        expected = (x.float() * reached + 0.0).to(torch.bfloat16)
        _assert_same(f"soak {i} combine(dispatch(x))", combined, expected)
        received += int(got_x.size(0))
    torch.cuda.synchronize()
    return received


def check_absent_rank(absent_rank: int, ranks_per_node: int) -> str:
    """A rank that skips a (cached) dispatch: the others' kernels give up within the timeout, and
    the next call raises TimeoutError naming the rank, the phase and the peer it waited for."""
    import torch.distributed as dist

    from deepep_megatron import Buffer

    faulthandler.enable()
    os.environ["DEEPEP_MEGATRON_TIMEOUT_S"] = "3"
    rank, num_ranks = dist.get_rank(), dist.get_world_size()
    experts = EXPERTS_PER_RANK * num_ranks
    size = internode.rdma_size_hint(16, 256, num_ranks, ranks_per_node, 4)
    buffer = Buffer(dist.group.WORLD, num_rdma_bytes=size, backend="cuda", num_ranks_per_node=ranks_per_node)
    assert buffer.backend_name == "internode"
    x = torch.randn((16, 256), generator=torch.Generator().manual_seed(rank)).to(torch.bfloat16).cuda()
    topk_idx = (
        torch.rand((16, experts), generator=torch.Generator().manual_seed(rank)).topk(4, dim=1).indices.cuda()
    )
    layout = buffer.get_dispatch_layout(topk_idx, experts)
    handle = buffer.dispatch(
        x,
        num_tokens_per_rank=layout[0],
        num_tokens_per_rdma_rank=layout[1],
        num_tokens_per_expert=layout[2],
        is_token_in_rank=layout[3],
        topk_idx=topk_idx,
    )[4]
    torch.cuda.synchronize()
    dist.barrier()
    if rank == absent_rank:
        result = "absent"
    else:
        start = time.monotonic()
        buffer.dispatch(x, handle=handle)
        torch.cuda.synchronize()  # the kernels give up after the timeout
        elapsed = time.monotonic() - start
        assert elapsed < 3 + 10, f"the timed-out kernels took {elapsed:.1f} s"
        with pytest.raises(TimeoutError) as error:
            buffer.dispatch(x, handle=handle)
        result = str(error.value)
        assert f"rank {rank}" in result and "internode dispatch" in result, result
        same_node = rank // ranks_per_node == absent_rank // ranks_per_node
        same_index = rank % ranks_per_node == absent_rank % ranks_per_node
        if same_node or same_index:  # these wait for the absent rank itself
            assert f"waiting for rank {absent_rank}" in result, result
        with pytest.raises(TimeoutError):  # stays failed
            buffer.dispatch(x, handle=handle)
    os.environ["DEEPEP_MEGATRON_TIMEOUT_S"] = "20"
    del buffer, handle
    gc.collect()
    dist.barrier()
    return result


def check_refusals() -> bool:
    """Too small a buffer is refused on every rank alike, before any kernel (ValueError)."""
    import torch.distributed as dist

    from deepep_megatron import Buffer

    rank, num_ranks = dist.get_rank(), dist.get_world_size()
    experts = EXPERTS_PER_RANK * num_ranks
    size = internode.rdma_size_hint(8, 256, num_ranks, num_ranks // 2, 4)
    buffer = Buffer(dist.group.WORLD, num_rdma_bytes=size, backend="cuda", num_ranks_per_node=num_ranks // 2)
    n = 64 if rank == 0 else 8  # rank 0 sends more than the buffer was sized for
    x = torch.randn((n, 256)).to(torch.bfloat16).cuda()
    topk_idx = torch.rand((n, experts)).topk(4, dim=1).indices.cuda()
    layout = buffer.get_dispatch_layout(topk_idx, experts)
    with pytest.raises(ValueError, match="num_rdma_bytes"):
        buffer.dispatch(
            x,
            num_tokens_per_rank=layout[0],
            num_tokens_per_rdma_rank=layout[1],
            num_tokens_per_expert=layout[2],
            is_token_in_rank=layout[3],
            topk_idx=topk_idx,
        )
    # Still usable afterwards: nothing was launched.
    x, topk_idx = x[:8].contiguous(), topk_idx[:8].contiguous()
    layout = buffer.get_dispatch_layout(topk_idx, experts)
    recv = buffer.dispatch(
        x,
        num_tokens_per_rank=layout[0],
        num_tokens_per_rdma_rank=layout[1],
        num_tokens_per_expert=layout[2],
        is_token_in_rank=layout[3],
        topk_idx=topk_idx,
    )[0]
    torch.cuda.synchronize()
    per_rank = [torch.empty(num_ranks, dtype=torch.int32) for _ in range(num_ranks)]
    dist.all_gather(per_rank, layout[0].cpu())
    assert recv.size(0) == sum(int(counts[rank]) for counts in per_rank)
    del buffer
    gc.collect()
    dist.barrier()
    return True


def destroy_buffers() -> bool:
    for compiled, _ in _BUFFERS.values():
        compiled.destroy()
    _BUFFERS.clear()
    gc.collect()
    return nvshmem._job.members is None


# ----------------------------------------------------------------------------- tests
# (ranks, ranks per node): 2x2, 2x3, 3x2, 2x4, 4x2, and 4x1 (every byte through NVSHMEM puts).
TOPOLOGIES = [(4, 2), (6, 3), (6, 2), (8, 4), (8, 2), (4, 1)]


@pytest.mark.parametrize("num_ranks,ranks_per_node", TOPOLOGIES, ids=[f"{r // p}x{p}" for r, p in TOPOLOGIES])
def test_kernels_match_portable(gpu_pools, num_ranks, ranks_per_node):
    received = gpu_pools(num_ranks).run(
        run_cases, 100 + num_ranks, _cases(num_ranks, ranks_per_node), timeout=900
    )
    assert sum(received) > 0


@pytest.mark.parametrize("num_ranks,ranks_per_node", [(8, 4), (6, 3)])
def test_soak_changing_shapes(gpu_pools, num_ranks, ranks_per_node):
    received = gpu_pools(num_ranks).run(soak, 7, ranks_per_node, 500, timeout=1200)
    assert sum(received) > 0


def test_buffer_too_small_is_refused(gpu_pools):
    assert all(gpu_pools(4).run(check_refusals, timeout=300))


def test_absent_rank_times_out(gpu_pools):
    messages = gpu_pools(4).run(check_absent_rank, 3, 2, timeout=180)
    assert messages[3] == "absent"
    assert all("timed out" in m or "gave up" in m for m in messages[:3]), messages


def test_destroy_finalizes(gpu_pools):
    """Runs last: every buffer destroyed collectively, NVSHMEM finalized on every rank."""
    for world_size in sorted({r for r, _ in TOPOLOGIES}):
        assert all(gpu_pools(world_size).run(destroy_buffers, timeout=300))
