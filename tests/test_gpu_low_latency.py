"""GPU tests of the compiled low-latency kernels (NVSHMEM): R ranks on one GPU under MPS (or one
rank per GPU), with nodes of `num_ranks_per_node` consecutive ranks so that both the same-node
path (stores through mappings) and the other-node path (NVSHMEM put-with-signal) run.

Every case runs the same random inputs through the kernels and through the portable backend on
the same gloo group and requires bit-identical results: received rows, FP8 scales (float and
packed UE8M0), counts, handle fields, combine output and receive statistics (the portable backend
is itself checked against plain references by tests/test_low_latency.py). Skipped without CUDA
or without the NVSHMEM extension.
"""

from __future__ import annotations

import faulthandler
import gc
import os
import time

import pytest
import torch

from deepep_megatron.backends import nvshmem

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or nvshmem.module is None,
        reason="needs CUDA and the NVSHMEM extension (deepep_megatron._nvshmem)",
    ),
]

MAX_TOKENS = 64
EXPERTS_PER_RANK = 8


@pytest.fixture(scope="module")
def gpu_pools():
    from deepep_megatron.testing.rank_pool import GpuPools

    pools = GpuPools(
        {
            "DEEPEP_MEGATRON_TIMEOUT_S": "20",
            "DEEPEP_MEGATRON_POISON_HOOK_OUTPUTS": "1",
            # Room for every buffer a pool holds at once (NVSHMEM sizes the heap at its first init).
            "NVSHMEM_SYMMETRIC_SIZE": str(5 << 30),
        }
    )
    yield pools
    pools.close()


# ----------------------------------------------------------------------------- rank helpers
_BUFFERS: dict = {}


def _buffers(num_ranks_per_node: int, max_tokens: int, hidden: int, num_experts: int):
    """(compiled, portable) Buffers of this rank, reused across cases of one pool."""
    import torch.distributed as dist

    from deepep_megatron import Buffer

    key = (num_ranks_per_node, max_tokens, hidden, num_experts)
    if key not in _BUFFERS:
        num_ranks = dist.get_world_size()
        size = Buffer.get_low_latency_rdma_size_hint(max_tokens, hidden, num_ranks, num_experts)
        compiled = Buffer(
            dist.group.WORLD,
            num_rdma_bytes=size,
            low_latency_mode=True,
            backend="cuda",
            num_ranks_per_node=num_ranks_per_node,
            explicitly_destroy=True,
        )
        assert compiled._router.low_latency_route.family == "low_latency", compiled.backend_summary
        portable = Buffer(dist.group.WORLD, num_rdma_bytes=size, low_latency_mode=True, backend="portable")
        _BUFFERS[key] = (compiled, portable)
    return _BUFFERS[key]


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().contiguous().cpu()
    if t.dtype.is_floating_point:
        t = t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])
    return t


def _assert_same(what: str, got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    assert tuple(got.shape) == tuple(want.shape), f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    a, b = _bits(got), _bits(want)
    if not torch.equal(a, b):
        bad = (a != b).nonzero()
        raise AssertionError(f"{what}: {bad.size(0)} elements differ, first at {bad[0].tolist()}")


def _inputs(seed, rank, num_tokens, hidden, num_experts, num_topk, routing):
    from deepep_megatron.testing.reference import make_rank_inputs

    inputs = make_rank_inputs(
        seed,
        rank,
        num_tokens,
        hidden,
        num_experts,
        num_topk,
        masked_fraction=0.3 if routing == "masked" else 0.0,
        single_expert=(num_experts - 1) if routing == "one_expert" else None,
    )
    return inputs.x.cuda(), inputs.topk_idx.cuda(), inputs.topk_weights.cuda()


def _expert_outputs(seed, rank, shape) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed * 7919 + rank)
    return torch.randn(shape, generator=generator).to(torch.bfloat16).cuda()


def _round(buffer, x, topk_idx, topk_weights, case, expert_out, check_poison: bool):
    """One dispatch + combine through `buffer`; returns what is compared (on the CPU)."""
    import torch.distributed as dist

    num_ranks = dist.get_world_size()
    num_experts, max_tokens = case["num_experts"], case["max_tokens"]
    hook = case.get("hook", False)
    stats = torch.full((num_experts // num_ranks,), 3, dtype=torch.int32, device="cuda")
    wait_stats = torch.zeros((num_ranks,), dtype=torch.int64, device="cuda")
    recv, recv_count, handle, event, hook_fn = buffer.low_latency_dispatch(
        x,
        topk_idx,
        max_tokens,
        num_experts,
        cumulative_local_expert_recv_stats=stats,
        dispatch_wait_recv_cost_stats=wait_stats,
        use_fp8=case["fp8"],
        round_scale=case.get("round_scale", False),
        use_ue8m0=case.get("ue8m0", False),
        async_finish=case.get("async", False),
        return_recv_hook=hook,
    )
    if hook:
        assert hook_fn is not None
        if check_poison:
            torch.cuda.synchronize()
            packed = recv[0] if case["fp8"] else recv
            assert torch.isnan(packed.float()).all(), "received rows must stay poisoned until the hook"
            assert (stats == 3).all(), "statistics must not move before the hook"
        hook_fn()
    event.current_stream_wait()
    mode = case.get("combine", "plain")
    kwargs = {}
    combine_x = expert_out
    if mode == "out":
        kwargs["out"] = torch.full((x.size(0), x.size(1)), float("nan"), dtype=torch.bfloat16, device="cuda")
    elif mode == "zero_copy":
        staging = buffer.get_next_low_latency_combine_buffer(handle)
        staging.copy_(expert_out)
        combine_x = torch.zeros_like(expert_out)
        kwargs["zero_copy"] = True
    combine_stats = torch.zeros((num_ranks,), dtype=torch.int64, device="cuda")
    combined, event, hook_fn = buffer.low_latency_combine(
        combine_x,
        topk_idx,
        topk_weights,
        handle,
        return_recv_hook=hook,
        async_finish=case.get("async", False),
        combine_wait_recv_cost_stats=combine_stats,
        **kwargs,
    )
    if mode == "out":
        assert combined is kwargs["out"]
    if hook:
        if mode == "out":
            torch.cuda.synchronize()
            assert torch.isnan(combined.float()).all(), "out must not be written before the hook"
        hook_fn()
    event.current_stream_wait()
    torch.cuda.synchronize()
    assert (wait_stats >= 0).all() and (combine_stats >= 0).all()
    counts = recv_count.cpu()
    packed, scales = recv if case["fp8"] else (recv, None)
    return {
        "recv_count": counts,
        "rows": [packed[e, : counts[e]].cpu() for e in range(counts.numel())],
        "scales": None if scales is None else [scales[e, : counts[e]].cpu() for e in range(counts.numel())],
        "scale_strides": None if scales is None else scales.stride(),
        "src_info": handle.recv_src_info.cpu(),
        "layout_range": handle.recv_layout_range.cpu(),
        "combined": combined.cpu(),
        "stats": stats.cpu(),
    }


def _compare(case, got, want) -> None:
    label = f"case {case}"
    _assert_same(f"{label} recv_count", got["recv_count"], want["recv_count"])
    for e, (a, b) in enumerate(zip(got["rows"], want["rows"])):
        _assert_same(f"{label} expert {e} rows", a, b)
    if want["scales"] is not None:
        assert got["scale_strides"] == want["scale_strides"], f"{label}: scale strides"
        for e, (a, b) in enumerate(zip(got["scales"], want["scales"])):
            _assert_same(f"{label} expert {e} scales", a, b)
    for key in ("src_info", "layout_range", "combined", "stats"):
        _assert_same(f"{label} {key}", got[key], want[key])


def run_cases(seed: int, cases: list[dict]) -> int:
    """Every case on this rank: kernels vs portable, bit for bit. Returns rows received."""
    import torch.distributed as dist

    faulthandler.enable()
    rank, num_ranks = dist.get_rank(), dist.get_world_size()
    received = 0
    for index, case in enumerate(cases):
        case_seed = seed * 100 + index
        num_tokens = case["num_tokens"] if not (case.get("zero_tokens") and rank == 0) else 0
        x, topk_idx, topk_weights = _inputs(
            case_seed,
            rank,
            num_tokens,
            case["hidden"],
            case["num_experts"],
            case["num_topk"],
            case.get("routing", "random"),
        )
        sizes = (case["max_tokens"], 7168, case["num_experts"])
        compiled, portable = _buffers(case["num_ranks_per_node"], *sizes)
        shape = (case["num_experts"] // num_ranks, num_ranks * case["max_tokens"], case["hidden"])
        expert_out = _expert_outputs(case_seed, rank, shape)
        got = _round(compiled, x, topk_idx, topk_weights, case, expert_out, check_poison=True)
        want = _round(portable, x, topk_idx, topk_weights, case, expert_out, check_poison=False)
        _compare(case, got, want)
        received += int(got["recv_count"].sum())
    return received


def _cases(num_ranks: int) -> list[dict]:
    experts = EXPERTS_PER_RANK * num_ranks
    base = dict(num_experts=experts, max_tokens=MAX_TOKENS, num_topk=min(8, experts), num_tokens=MAX_TOKENS)
    nodes = sorted({num_ranks, max(1, num_ranks // 2), 1}, reverse=True)
    cases = []
    for i, rpn in enumerate(nodes):
        cases += [
            dict(base, num_ranks_per_node=rpn, hidden=7168, fp8=True),
            dict(base, num_ranks_per_node=rpn, hidden=7168, fp8=False, combine="out"),
            dict(
                base,
                num_ranks_per_node=rpn,
                hidden=640,
                fp8=True,
                ue8m0=True,
                routing="masked",
                num_tokens=37,
            ),  # fmt: skip
            dict(
                base,
                num_ranks_per_node=rpn,
                hidden=1152,
                fp8=True,
                round_scale=True,
                hook=True,
                combine="zero_copy",
                zero_tokens=True,
            ),  # fmt: skip
            dict(base, num_ranks_per_node=rpn, hidden=130, fp8=False, routing="one_expert", hook=i % 2 == 0),
        ]
    top16 = dict(base, num_topk=min(16, experts), routing="masked", combine="out", **{"async": True})
    cases.append(dict(top16, num_ranks_per_node=nodes[-1], hidden=2048, fp8=True))
    return cases


def check_hook_sends_without_waiting(seed: int) -> bool:
    """Rank 0's send phase completes (the GPU idles) before any other rank has sent: the send
    waits for nobody and leaves no kernel resident. Then every hook receives correctly."""
    import torch.distributed as dist

    rank, num_ranks = dist.get_rank(), dist.get_world_size()
    experts = EXPERTS_PER_RANK * num_ranks
    compiled, portable = _buffers(num_ranks, MAX_TOKENS, 7168, experts)
    x, topk_idx, topk_weights = _inputs(seed, rank, MAX_TOKENS, 2048, experts, 8, "random")
    if rank == 0:
        out = compiled.low_latency_dispatch(x, topk_idx, MAX_TOKENS, experts, return_recv_hook=True)
        torch.cuda.synchronize()  # would never return if the send waited for the others
        dist.barrier()
    else:
        dist.barrier()
        out = compiled.low_latency_dispatch(x, topk_idx, MAX_TOKENS, experts, return_recv_hook=True)
    out[4]()
    want = portable.low_latency_dispatch(x, topk_idx, MAX_TOKENS, experts)
    torch.cuda.synchronize()
    _assert_same("recv_count", out[1], want[1])
    for e in range(experts // num_ranks):
        n = int(want[1][e])
        _assert_same(f"expert {e} rows", out[0][0][e, :n], want[0][0][e, :n])
    return True


def check_double_buffering(seed: int, num_ranks_per_node: int) -> bool:
    """Two dispatches in flight (hook mode), hooks afterwards, then two combines in flight:
    results alive at once stay independent, and their zero-copy buffers are distinct."""
    import torch.distributed as dist

    rank, num_ranks = dist.get_rank(), dist.get_world_size()
    experts = EXPERTS_PER_RANK * num_ranks
    compiled, portable = _buffers(num_ranks_per_node, MAX_TOKENS, 7168, experts)
    rounds = [_inputs(seed + i, rank, MAX_TOKENS - 3 * i, 1024, experts, 6, "masked") for i in range(2)]
    shape = (experts // num_ranks, num_ranks * MAX_TOKENS, 1024)
    outs = [_expert_outputs(seed + i, rank, shape) for i in range(2)]
    sent = [
        compiled.low_latency_dispatch(x, idx, MAX_TOKENS, experts, use_fp8=False, return_recv_hook=True)
        for x, idx, _ in rounds
    ]
    assert sent[0][2].buffer_index != sent[1][2].buffer_index
    for call in sent:
        call[4]()
    staging = [compiled.get_next_low_latency_combine_buffer(call[2]) for call in sent]
    assert staging[0].data_ptr() != staging[1].data_ptr()
    pending = []
    for (_, idx, w), call, out, buf in zip(rounds, sent, outs, staging):
        buf.copy_(out)
        pending.append(
            compiled.low_latency_combine(out, idx, w, call[2], zero_copy=True, return_recv_hook=True)
        )
    for p in pending:
        p[2]()
    for (x, idx, w), call, out, p in zip(rounds, sent, outs, pending):
        want = portable.low_latency_dispatch(x, idx, MAX_TOKENS, experts, use_fp8=False)
        _assert_same("recv_count", call[1], want[1])
        for e in range(experts // num_ranks):
            n = int(want[1][e])
            _assert_same(f"expert {e} rows", call[0][e, :n], want[0][e, :n])
        combined = portable.low_latency_combine(out, idx, w, want[2])[0]
        torch.cuda.synchronize()
        _assert_same("combined", p[0], combined)
    return True


def check_graph_replay(seed: int, num_ranks_per_node: int, replays: int) -> bool:
    """A dispatch + combine pair captured once in a CUDA graph and replayed on new inputs gives
    the portable backend's results every time (no host synchronisation inside)."""
    import torch.distributed as dist

    rank, num_ranks = dist.get_rank(), dist.get_world_size()
    experts = EXPERTS_PER_RANK * num_ranks
    compiled, portable = _buffers(num_ranks_per_node, MAX_TOKENS, 7168, experts)
    hidden, num_topk = 2048, 8
    x, topk_idx, topk_weights = _inputs(seed, rank, MAX_TOKENS, hidden, experts, num_topk, "masked")
    shape = (experts // num_ranks, num_ranks * MAX_TOKENS, hidden)
    expert_out = _expert_outputs(seed, rank, shape)

    def pair():
        recv, _, handle, _, _ = compiled.low_latency_dispatch(x, topk_idx, MAX_TOKENS, experts)
        combined = compiled.low_latency_combine(expert_out, topk_idx, topk_weights, handle)[0]
        return recv, handle, combined

    pair()  # warm-up outside the capture
    torch.cuda.synchronize()
    dist.barrier()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        recv, handle, combined = pair()
    for i in range(replays):
        new_x, new_idx, new_w = _inputs(seed + 1 + i, rank, MAX_TOKENS, hidden, experts, num_topk, "masked")
        x.copy_(new_x)
        topk_idx.copy_(new_idx)
        topk_weights.copy_(new_w)
        expert_out.copy_(_expert_outputs(seed + 1 + i, rank, shape))
        graph.replay()
        want = portable.low_latency_dispatch(x, topk_idx, MAX_TOKENS, experts)
        want_combined = portable.low_latency_combine(expert_out, topk_idx, topk_weights, want[2])[0]
        torch.cuda.synchronize()
        _assert_same(f"replay {i} recv_count", handle.recv_count, want[1])
        for e in range(experts // num_ranks):
            n = int(want[1][e])
            _assert_same(f"replay {i} expert {e} rows", recv[0][e, :n], want[0][0][e, :n])
            _assert_same(f"replay {i} expert {e} scales", recv[1][e, :n], want[0][1][e, :n])
        _assert_same(f"replay {i} combined", combined, want_combined)
    del graph
    return True


def check_absent_rank(absent_rank: int) -> str:
    """A rank that never dispatches: the others' receive times out within the configured time,
    and the next call raises TimeoutError naming the waiting rank, the peer and the phase."""
    import torch.distributed as dist

    from deepep_megatron import Buffer

    faulthandler.enable()  # a crash of a rank process shows its stack in the log
    os.environ["DEEPEP_MEGATRON_TIMEOUT_S"] = "3"
    rank, num_ranks = dist.get_rank(), dist.get_world_size()
    experts = EXPERTS_PER_RANK * num_ranks
    size = Buffer.get_low_latency_rdma_size_hint(16, 256, num_ranks, experts)
    buffer = Buffer(dist.group.WORLD, num_rdma_bytes=size, low_latency_mode=True, backend="cuda")
    x, topk_idx, _ = _inputs(5, rank, 16, 256, experts, 4, "random")
    dist.barrier()
    if rank == absent_rank:
        result = "absent"
    else:
        start = time.monotonic()
        buffer.low_latency_dispatch(x, topk_idx, 16, experts, use_fp8=False)
        torch.cuda.synchronize()  # the kernel gives up after the timeout
        elapsed = time.monotonic() - start
        assert elapsed < 3 + 10, f"the timed-out kernel took {elapsed:.1f} s"
        with pytest.raises(TimeoutError) as error:
            buffer.low_latency_dispatch(x, topk_idx, 16, experts, use_fp8=False)
        result = str(error.value)
        assert f"rank {rank}" in result and f"rank {absent_rank}" in result, result
        assert "low_latency_dispatch receive" in result, result
        with pytest.raises(TimeoutError):  # stays failed
            buffer.low_latency_dispatch(x, topk_idx, 16, experts, use_fp8=False)
    os.environ["DEEPEP_MEGATRON_TIMEOUT_S"] = "20"
    dist.barrier()  # the absent rank keeps its buffer until the others have given up
    del buffer
    gc.collect()
    dist.barrier()
    return result


def check_layout_mirror() -> bool:
    """The size hint covers what the kernels lay out, for many sizes (Python mirror == C++)."""
    import itertools

    from deepep_megatron import Buffer
    from deepep_megatron.backends import low_latency_layout

    runtime = nvshmem.module.LowLatencyRuntime
    for t, h, r, e in itertools.product([1, 5, 128], [2, 130, 640, 1152, 7168], [1, 3, 8], [24, 256]):
        if e % r:
            continue
        exact = runtime.required_bytes(t, h, r, e)
        assert low_latency_layout.required_bytes(t, h, r, e) == exact, (t, h, r, e)
        assert Buffer.get_low_latency_rdma_size_hint(t, h, r, e) >= exact, (t, h, r, e)
    return True


def destroy_buffers() -> bool:
    """Buffer.destroy() on every cached buffer (collective): NVSHMEM is finalized at the end."""
    for compiled, _ in _BUFFERS.values():
        compiled.destroy()
    _BUFFERS.clear()
    gc.collect()
    return nvshmem._job.members is None


# ----------------------------------------------------------------------------- tests
def test_layout_mirror():
    assert check_layout_mirror()


@pytest.mark.parametrize("num_ranks", [2, 3, 4, 8])
def test_kernels_match_portable(gpu_pools, num_ranks):
    pool = gpu_pools(num_ranks)
    received = pool.run(run_cases, 10 + num_ranks, _cases(num_ranks), timeout=600)
    assert sum(received) > 0


def test_hook_send_does_not_wait(gpu_pools):
    assert all(gpu_pools(4).run(check_hook_sends_without_waiting, 21))


@pytest.mark.parametrize("num_ranks_per_node", [4, 1])
def test_double_buffering(gpu_pools, num_ranks_per_node):
    assert all(gpu_pools(4).run(check_double_buffering, 31, num_ranks_per_node))


@pytest.mark.parametrize("num_ranks_per_node", [4, 2])
def test_graph_replay(gpu_pools, num_ranks_per_node):
    assert all(gpu_pools(4).run(check_graph_replay, 41, num_ranks_per_node, 3))


def test_benchmark_shape(gpu_pools):
    """DESIGN.md §4's shape on 8 ranks (128 tokens, hidden 7168, top-8 of 256), FP8 and BF16."""
    base = dict(num_experts=256, max_tokens=128, num_topk=8, num_tokens=128, hidden=7168)
    cases = [
        dict(base, num_ranks_per_node=8, fp8=True),
        dict(base, num_ranks_per_node=4, fp8=False, hook=True),
    ]
    assert sum(gpu_pools(8).run(run_cases, 51, cases, timeout=600)) > 0


def test_absent_rank_times_out(gpu_pools):
    messages = gpu_pools(4).run(check_absent_rank, 3, timeout=120)
    assert messages[3] == "absent"
    assert all("timed out" in m for m in messages[:3]), messages


def test_destroy_finalizes(gpu_pools):
    """Runs last: every buffer destroyed collectively, NVSHMEM finalized on every rank."""
    for world_size in (2, 3, 4, 8):
        assert all(gpu_pools(world_size).run(destroy_buffers))
