"""The benchmark's rank side: everything here runs inside the rank processes of a `RankPool`
(functions are sent by name). One Buffer per configuration is kept per process."""

from __future__ import annotations

import platform
import time
from functools import partial

from deepep_megatron.bench.measures import GROUP_LIMITED

# Everything below down to the driver runs inside the rank processes of a RankPool.
_RANK_STATE: dict = {}


def _dist():
    import torch.distributed as dist

    return dist


def _device():
    import torch

    return (
        torch.device("cuda", torch.cuda.current_device())
        if _RANK_STATE["device"] == "cuda"
        else torch.device("cpu")
    )


def _barrier() -> None:
    import torch

    dist = _dist()
    if _RANK_STATE["device"] == "cuda":
        torch.cuda.synchronize()
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def _all_gather_ints(values: list[int]) -> list[list[int]]:
    """Gather a short int list from every rank (on the host, whatever the backend)."""
    import torch

    dist = _dist()
    tensor = torch.tensor(values, dtype=torch.int64)
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor)
    return [t.cpu().tolist() for t in gathered]


def rank_info(device: str) -> dict:
    """Facts about a rank's process: device name, SM count, torch version, process-group backend."""
    import torch

    _RANK_STATE["device"] = device
    info = {
        "torch": torch.__version__,
        "dist_backend": _dist().get_backend(),
        "python": platform.python_version(),
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        info.update(
            device_name=props.name,
            num_device_sms=props.multi_processor_count,
            cuda=torch.version.cuda,
            device_index=torch.cuda.current_device(),
        )
    else:
        info.update(device_name=f"CPU ({platform.machine() or 'unknown'})", num_device_sms=None)
    return info


def _buffer(
    backend: str,
    num_nvl_bytes: int,
    num_rdma_bytes: int = 0,
    low_latency: bool = False,
    num_qps: int = 1,
    num_ranks_per_node: int | None = None,
):
    """One Buffer per rank process and configuration (they are reused across cases)."""
    from deepep_megatron.buffer import Buffer

    key = (backend, num_nvl_bytes, num_rdma_bytes, low_latency, num_ranks_per_node)
    buffers = _RANK_STATE.setdefault("buffers", {})
    if key not in buffers:
        buffers[key] = Buffer(
            None,
            num_nvl_bytes,
            num_rdma_bytes,
            low_latency_mode=low_latency,
            num_qps_per_rank=num_qps,
            backend=backend,
            num_ranks_per_node=num_ranks_per_node,
        )
    return buffers[key]


def _routing(spec: dict, num_tokens: int, generator, device):
    from deepep_megatron.routing import random_routing

    groups = GROUP_LIMITED if spec["routing"] == "group-limited" else {}
    return random_routing(
        num_tokens,
        spec["num_experts"],
        spec["num_topk"],
        generator=generator,
        device=device,
        num_groups=groups.get("num_groups"),
        topk_groups=groups.get("topk_groups"),
    )


def _inputs(spec: dict, num_tokens: int):
    import torch

    rank = _dist().get_rank()
    device = _device()
    generator = torch.Generator(device=device).manual_seed(spec["seed"] * 1009 + rank)
    x = torch.randn((num_tokens, spec["hidden"]), generator=generator, device=device).to(torch.bfloat16)
    topk_idx, topk_weights = _routing(spec, num_tokens, generator, device)
    return x, topk_idx, topk_weights


def _time_calls(fn, warmup: int, iters: int) -> list[float]:
    """Seconds per call of `fn` (which should do nothing but the measured call)."""
    import torch

    for _ in range(warmup):
        fn()
    if _RANK_STATE["device"] == "cuda":
        flush = torch.empty(int(256e6 // 4), dtype=torch.int32, device=_device())  # L2, as DeepEP does
        flush.zero_()
        del flush
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        _barrier()
        for start, end in zip(starts, ends):
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return [start.elapsed_time(end) / 1e3 for start, end in zip(starts, ends)]
    times = []
    for _ in range(iters):
        _barrier()
        begin = time.perf_counter()
        fn()
        times.append(time.perf_counter() - begin)
    return times


def _check_close(name: str, actual, expected) -> None:
    import torch

    if actual.shape != expected.shape or not torch.allclose(
        actual.float(), expected.float(), rtol=1e-2, atol=1e-2
    ):
        worst = (
            (actual.float() - expected.float()).abs().max().item() if actual.shape == expected.shape else None
        )
        raise AssertionError(
            f"rank {_dist().get_rank()}: {name} check failed (shape {tuple(actual.shape)} vs "
            f"{tuple(expected.shape)}, max abs error {worst})"
        )


def run_normal_case(spec: dict) -> dict:
    """Check, then time dispatch (BF16, FP8) and combine for one (routing, SMs) case on this rank."""
    import torch

    from deepep_megatron.config import Config
    from deepep_megatron.fp8 import per_token_cast_back, per_token_cast_to_fp8

    dist = _dist()
    num_ranks, rank = dist.get_world_size(), dist.get_rank()
    num_tokens, hidden, num_experts = spec["num_tokens"], spec["hidden"], spec["num_experts"]
    config = Config(spec["num_sms"], num_max_tokens_per_rank=num_tokens)
    num_ranks_per_node = spec.get("num_ranks_per_node") or min(num_ranks, 8)
    num_rdma_bytes = 0
    if num_ranks_per_node < num_ranks:
        from deepep_megatron.backends.internode import rdma_size_hint

        num_rdma_bytes = rdma_size_hint(num_tokens, hidden, num_ranks, num_ranks_per_node, spec["num_topk"])
    buffer = _buffer(
        spec["backend"],
        config.get_nvl_buffer_size_hint(hidden * 2, num_ranks),
        num_rdma_bytes,
        num_ranks_per_node=num_ranks_per_node,
    )
    x, topk_idx, topk_weights = _inputs(spec, num_tokens)
    x_fp8 = per_token_cast_to_fp8(x)

    # One fresh dispatch, checked through combine.
    num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank, _ = (
        buffer.get_dispatch_layout(topk_idx, num_experts)
    )
    layout = {
        "num_tokens_per_rank": num_tokens_per_rank,
        "is_token_in_rank": is_token_in_rank,
        "num_tokens_per_expert": num_tokens_per_expert,
    }
    recv_x, _, _, _, handle, _ = buffer.dispatch(
        x, topk_idx=topk_idx, topk_weights=topk_weights, config=config, **layout
    )
    expected_rows = sum(row[rank] for row in _all_gather_ints(num_tokens_per_rank.cpu().tolist()))
    if recv_x.size(0) != expected_rows:
        raise AssertionError(f"rank {rank}: received {recv_x.size(0)} rows, the layouts say {expected_rows}")
    reached = is_token_in_rank.sum(1, dtype=torch.float32).unsqueeze(1)
    combined, _, _ = buffer.combine(recv_x, handle, config=config)
    _check_close(
        "combine(dispatch(x)) == x * ranks reached", combined, (x.float() * reached).to(torch.bfloat16)
    )
    recv_fp8, _, _, _, _, _ = buffer.dispatch(x_fp8, handle=handle, config=config)
    dequantized = per_token_cast_back(*recv_fp8)
    combined_fp8, _, _ = buffer.combine(dequantized, handle, config=config)
    expected_fp8 = (per_token_cast_back(*x_fp8).float() * reached).to(torch.bfloat16)
    _check_close("combine(dequantized FP8 dispatch(x))", combined_fp8, expected_fp8)
    del dequantized, combined, combined_fp8, recv_fp8

    if spec["fresh"]:
        calls = {
            "dispatch_bf16": partial(
                buffer.dispatch, x, topk_idx=topk_idx, topk_weights=topk_weights, config=config, **layout
            ),
            "dispatch_fp8": partial(
                buffer.dispatch, x_fp8, topk_idx=topk_idx, topk_weights=topk_weights, config=config, **layout
            ),
        }
    else:
        calls = {
            "dispatch_bf16": partial(buffer.dispatch, x, handle=handle, config=config),
            "dispatch_fp8": partial(buffer.dispatch, x_fp8, handle=handle, config=config),
        }
    calls["combine_bf16"] = partial(buffer.combine, recv_x, handle, config=config)
    times = {op: _time_calls(fn, spec["warmup"], spec["iters"]) for op, fn in calls.items()}

    recv_rows = int(recv_x.size(0))
    network = {}
    if num_tokens_per_rdma_rank is not None:
        from deepep_megatron.network_bytes import RowFormat, network_bytes

        # Timed calls: fresh dispatches carry top-k ids and weights, cached ones only the payload.
        num_topk = spec["num_topk"] if spec["fresh"] else 0
        for op, fp8 in (("dispatch_bf16", False), ("dispatch_fp8", True), ("combine_bf16", False)):
            row = RowFormat(hidden, fp8, 0 if op.startswith("combine") else num_topk)
            counted = network_bytes(num_tokens_per_rdma_rank, rank, num_ranks_per_node, row)
            network[op] = counted.combine_bytes if op.startswith("combine") else counted.dispatch_bytes
        network["remote_pairs"] = counted.remote_pairs
    result = {
        "rank": rank,
        "backend": handle.backend.name,
        "backend_summary": buffer.backend_summary,
        "checked": "combine(dispatch(x)) == x * ranks reached, in BF16 and in dequantised FP8",
        "recv_rows": recv_rows,
        "times_s": times,
        "network_bytes": network or None,
        "num_ranks_per_node": num_ranks_per_node,
    }
    if spec["nccl_baseline"]:
        result["nccl_baseline"] = _nccl_baseline(spec, is_token_in_rank, recv_x.size(0))
    return result


def _nccl_baseline(spec: dict, is_token_in_rank, num_recv_rows: int):
    """`all_to_all_single` of the same BF16 bytes as dispatch (only on an NCCL process group)."""
    import torch

    dist = _dist()
    if dist.get_backend() != "nccl":
        return None
    row_bytes = spec["hidden"] * 2
    send_rows = is_token_in_rank.sum(0).cpu().tolist()
    recv_rows = [row[dist.get_rank()] for row in _all_gather_ints(send_rows)]
    send = torch.empty(sum(send_rows) * row_bytes, dtype=torch.uint8, device=_device())
    recv = torch.empty(num_recv_rows * row_bytes, dtype=torch.uint8, device=_device())
    fn = partial(
        dist.all_to_all_single,
        recv,
        send,
        [r * row_bytes for r in recv_rows],
        [r * row_bytes for r in send_rows],
    )
    return _time_calls(fn, spec["warmup"], spec["iters"])


def _time_graphs(functions: list, warmup: int, iters: int) -> list[list[float]]:
    """Capture each function in its own CUDA graph (in order, so later ones may use earlier
    ones' outputs), then replay them in turn `iters` times: seconds per replay of each."""
    import torch

    graphs = []
    for fn in functions:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        graphs.append(graph)
    for _ in range(warmup):
        for graph in graphs:
            graph.replay()
    events = [[torch.cuda.Event(enable_timing=True) for _ in range(len(graphs) + 1)] for _ in range(iters)]
    _barrier()
    for marks in events:
        marks[0].record()
        for graph, mark in zip(graphs, marks[1:]):
            graph.replay()
            mark.record()
    torch.cuda.synchronize()
    times = [[marks[i].elapsed_time(marks[i + 1]) / 1e3 for marks in events] for i in range(len(graphs))]
    del graphs
    return times


def _time_low_latency_gpu(buffer, x, topk_idx, topk_weights, expert_out, spec: dict) -> dict:
    """GPU-only measurements: graph replays of each call and of each hook phase, and a GEMM alone
    and between a hook-mode send and its hook."""
    import torch

    num_tokens, num_experts = spec["num_tokens"], spec["num_experts"]
    warmup, iters = spec["warmup"], spec["iters"]
    times = {}
    state: dict = {}

    def dispatch(hook=False):
        state["dispatch"] = buffer.low_latency_dispatch(
            x, topk_idx, num_tokens, num_experts, use_fp8=True, return_recv_hook=hook
        )

    def combine(hook=False):
        state["combine"] = buffer.low_latency_combine(
            expert_out, topk_idx, topk_weights, state["dispatch"][2], return_recv_hook=hook
        )

    dispatch(), combine()  # outputs exist before capture
    torch.cuda.synchronize()
    times["ll_graph_dispatch_fp8"], times["ll_graph_combine_bf16"] = _time_graphs(
        [dispatch, combine], warmup, iters
    )
    phases = _time_graphs(
        [
            lambda: dispatch(hook=True),
            lambda: state["dispatch"][4](),
            lambda: combine(hook=True),
            lambda: state["combine"][2](),
        ],
        warmup,
        iters,
    )
    for name, values in zip(
        ("ll_hook_dispatch_send", "ll_hook_dispatch_recv", "ll_hook_combine_send", "ll_hook_combine_recv"),
        phases,
    ):
        times[name] = values

    gemm_times = _time_gemm_around_hook(buffer, x, topk_idx, spec)
    times["gemm_alone"], times["gemm_between_send_and_hook"] = gemm_times
    return times


def _time_gemm_around_hook(buffer, x, topk_idx, spec: dict) -> list[list[float]]:
    """Seconds of a GEMM on rank 0 with the GPU otherwise idle: after rank 0's hook (nothing
    pending), and between rank 0's hook-mode send and its hook (its receive pending). The other
    ranks send and receive before rank 0's GEMM starts, alike in both cases, so the two differ only
    in whether a pending receive holds anything on the GPU: with nothing resident, they are the
    same. Every rank returns rank 0's times."""
    import torch

    num_tokens, num_experts = spec["num_tokens"], spec["num_experts"]
    warmup, iters = spec["warmup"], spec["iters"]
    is_first = _dist().get_rank() == 0
    a = torch.randn((4096, spec["hidden"]), device=x.device).to(torch.bfloat16)
    b = torch.randn((spec["hidden"], 4096), device=x.device).to(torch.bfloat16)
    for _ in range(warmup):
        torch.mm(a, b)
    alone, overlapped = [], []
    for receive_first, times_of in ((True, alone), (False, overlapped)):
        for _ in range(iters):
            out = buffer.low_latency_dispatch(x, topk_idx, num_tokens, num_experts, return_recv_hook=True)
            if not is_first or receive_first:
                out[4]()
            torch.cuda.synchronize()
            _barrier()  # every send and every other receive has ended
            if is_first:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                torch.mm(a, b)
                end.record()
                times_of.append((start, end))
                if not receive_first:
                    out[4]()
            torch.cuda.synchronize()
            _barrier()
    torch.cuda.synchronize()
    gemm = [[s.elapsed_time(e) / 1e3 for s, e in alone], [s.elapsed_time(e) / 1e3 for s, e in overlapped]]
    shared = [gemm]
    _dist().broadcast_object_list(shared, src=0)
    return shared[0]


def run_low_latency_case(spec: dict) -> dict:
    """Check, then time low_latency_dispatch (FP8) and low_latency_combine on this rank."""
    import torch

    from deepep_megatron.buffer import Buffer

    dist = _dist()
    num_ranks, rank = dist.get_world_size(), dist.get_rank()
    num_tokens, hidden, num_experts = spec["num_tokens"], spec["hidden"], spec["num_experts"]
    if spec.get("num_sms"):
        Buffer.set_num_sms(spec["num_sms"])
    num_rdma_bytes = Buffer.get_low_latency_rdma_size_hint(num_tokens, hidden, num_ranks, num_experts)
    buffer = _buffer(
        spec["backend"], 0, num_rdma_bytes, low_latency=True, num_qps=max(1, num_experts // num_ranks)
    )
    x, topk_idx, topk_weights = _inputs(spec, num_tokens)
    hook_mode = spec["hook"]

    # Check with BF16: sending each received row back gives x times the sum of its weights.
    recv_x, _, handle, _, hook = buffer.low_latency_dispatch(
        x, topk_idx, num_tokens, num_experts, use_fp8=False, return_recv_hook=hook_mode
    )
    if hook is not None:
        hook()
    combined, _, hook = buffer.low_latency_combine(
        recv_x, topk_idx, topk_weights, handle, return_recv_hook=hook_mode
    )
    if hook is not None:
        hook()
    weight_sum = torch.where(topk_idx >= 0, topk_weights, torch.zeros_like(topk_weights)).sum(1, keepdim=True)
    expected = (x.float() * weight_sum).to(torch.bfloat16)
    _check_close("low_latency_combine(low_latency_dispatch(x))", combined, expected)

    # Timed: FP8 dispatch, then BF16 combine of stand-in expert outputs with that dispatch's handle.
    # In hook mode the hook is called at once and counts in the call's time.
    expert_out = torch.randn(recv_x.shape, device=recv_x.device).to(torch.bfloat16)
    dispatch = partial(
        buffer.low_latency_dispatch, x, topk_idx, num_tokens, num_experts, use_fp8=True,
        return_recv_hook=hook_mode,
    )  # fmt: skip
    combine = partial(
        buffer.low_latency_combine, expert_out, topk_idx, topk_weights, return_recv_hook=hook_mode
    )
    for _ in range(spec["warmup"]):
        out = dispatch()
        if hook_mode:
            out[4]()
        out = combine(out[2])
        if hook_mode:
            out[2]()
    dispatch_times, combine_times = [], []
    extra = {}
    if _RANK_STATE["device"] == "cuda":
        events = [[torch.cuda.Event(enable_timing=True) for _ in range(3)] for _ in range(spec["iters"])]
        _barrier()
        for begin, middle, end in events:
            begin.record()
            out = dispatch()
            if hook_mode:
                out[4]()
            middle.record()
            out = combine(out[2])
            if hook_mode:
                out[2]()
            end.record()
        torch.cuda.synchronize()
        dispatch_times = [b.elapsed_time(m) / 1e3 for b, m, _ in events]
        combine_times = [m.elapsed_time(e) / 1e3 for _, m, e in events]
        extra = _time_low_latency_gpu(buffer, x, topk_idx, topk_weights, expert_out, spec)
    else:
        for _ in range(spec["iters"]):
            _barrier()
            begin = time.perf_counter()
            out = dispatch()
            if hook_mode:
                out[4]()
            middle = time.perf_counter()
            _barrier()
            resume = time.perf_counter()
            out = combine(out[2])
            if hook_mode:
                out[2]()
            dispatch_times.append(middle - begin)
            combine_times.append(time.perf_counter() - resume)
    return {
        "rank": rank,
        "backend": handle.backend.name,
        "backend_summary": buffer.backend_summary,
        "checked": "low_latency_combine(low_latency_dispatch(x)) == x * sum of its top-k weights (BF16)",
        "num_selections": int((topk_idx >= 0).sum()),
        "ranks_sharing_gpu": buffer.topology.ranks_per_gpu,
        "times_s": {
            "low_latency_dispatch_fp8": dispatch_times,
            "low_latency_combine_bf16": combine_times,
            **extra,
        },
    }
