"""GPU tests of the compiled intranode kernels: R ranks on one GPU under MPS (or one rank per GPU).

Each check runs the same inputs through the compiled backend and through the portable backend on
the same gloo group, and requires bit-identical results (the portable backend is itself tested
against plain references on the CPU). Skipped without CUDA or without the built extension.
"""

from __future__ import annotations

import gc
import os
import time

import pytest
import torch

from deepep_megatron.backends import extension

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not (torch.cuda.is_available() and extension.extension_available()),
        reason="needs CUDA and the compiled extension",
    ),
]


@pytest.fixture(scope="module")
def gpu_pools():
    from deepep_megatron.testing.rank_pool import GpuPools

    pools = GpuPools({"DEEPEP_MEGATRON_TIMEOUT_S": "20"})
    yield pools
    pools.close()


# ----------------------------------------------------------------------------- rank functions
def _buffers(num_tokens: int, hidden: int, num_ranks: int):
    import torch.distributed as dist

    from deepep_megatron import Buffer, Config

    hint = Config(num_max_tokens_per_rank=max(num_tokens, 1)).get_nvl_buffer_size_hint(hidden * 2, num_ranks)
    compiled = Buffer(dist.group.WORLD, num_nvl_bytes=hint, backend="cuda")
    portable = Buffer(dist.group.WORLD, num_nvl_bytes=hint, backend="portable")
    return compiled, portable


def _inputs(seed, rank, num_tokens, hidden, num_experts, num_topk, case):
    from deepep_megatron.testing.reference import make_rank_inputs

    inputs = make_rank_inputs(
        seed,
        rank,
        num_tokens,
        hidden,
        num_experts,
        num_topk,
        masked_fraction=0.3 if case == "masked" else 0.0,
        single_expert=1 if case == "one_expert" else None,
    )
    return inputs.x.cuda(), inputs.topk_idx.cuda(), inputs.topk_weights.cuda()


def _run(buffer, x, topk_idx, topk_weights, num_experts, alignment, num_worst_tokens, num_sms, fp8):
    from deepep_megatron import Config
    from deepep_megatron.fp8 import per_token_cast_to_fp8

    config = Config(num_sms)
    layout = buffer.get_dispatch_layout(topk_idx, num_experts)
    payload = per_token_cast_to_fp8(x) if fp8 else x
    recv_x, recv_idx, recv_w, per_expert, handle, _ = buffer.dispatch(
        payload,
        num_tokens_per_rank=layout[0],
        is_token_in_rank=layout[3],
        num_tokens_per_expert=layout[2],
        topk_idx=topk_idx,
        topk_weights=topk_weights,
        expert_alignment=alignment,
        num_worst_tokens=num_worst_tokens,
        config=config,
    )
    rows = recv_x[0] if fp8 else recv_x
    # Expert "compute": a rank-dependent scale, so every source contributes distinctly.
    import torch.distributed as dist

    expert_out = (rows.float() * (dist.get_rank() + 1) * 0.5).to(torch.bfloat16)
    bias = (torch.ones_like(x) * 0.25, x)
    combined, combined_w, _ = buffer.combine(
        expert_out, handle, topk_weights=recv_w, bias=bias, config=config
    )
    cached = buffer.dispatch(payload, handle=handle, config=config)[0]
    return dict(
        layout=[t.cpu() if t is not None else None for t in layout[:4]],
        recv_x=[t.float().cpu() for t in recv_x] if fp8 else recv_x.cpu(),
        recv_idx=recv_idx.cpu(),
        recv_w=recv_w.cpu(),
        per_expert=per_expert,
        combined=combined.cpu(),
        combined_w=combined_w.cpu(),
        cached=[t.float().cpu() for t in cached] if fp8 else cached.cpu(),
        num_recv=handle.num_recv_tokens,
    )


def check_against_portable(seed, num_tokens, hidden, num_experts, num_topk, case, fp8, num_worst, num_sms):
    import torch.distributed as dist

    rank, num_ranks = dist.get_rank(), dist.get_world_size()
    my_tokens = 0 if case == "zero_tokens" and rank == 0 else num_tokens
    x, topk_idx, topk_weights = _inputs(seed, rank, my_tokens, hidden, num_experts, num_topk, case)
    compiled, portable = _buffers(num_tokens, hidden, num_ranks)
    worst = num_worst * num_tokens * num_ranks
    got = _run(compiled, x, topk_idx, topk_weights, num_experts, 4, worst, num_sms, fp8)
    want = _run(portable, x, topk_idx, topk_weights, num_experts, 4, worst, num_sms, fp8)
    torch.cuda.synchronize()
    num_valid = want["num_recv"]
    for key in want:
        if key == "num_recv":
            continue  # the compiled backend skips the host sync in worst-case mode
        _assert_same(key, got[key], want[key], num_valid if worst and key in ("recv_x", "cached") else None)
    return got["num_recv"]


def _assert_same(key, got, want, num_valid_rows):
    """Bit-identical tensors (or lists of them, or plain values); rows past `num_valid_rows` are
    padding, unspecified in worst-case mode."""
    if isinstance(want, (list, tuple)):
        assert len(got) == len(want), f"{key}: {len(got)} items != {len(want)}"
        for i, (a, b) in enumerate(zip(got, want)):
            _assert_same(f"{key}[{i}]", a, b, num_valid_rows)
    elif isinstance(want, torch.Tensor):
        assert got.shape == want.shape, f"{key} shape {tuple(got.shape)} != {tuple(want.shape)}"
        if num_valid_rows is not None:
            got, want = got[:num_valid_rows], want[:num_valid_rows]
        assert torch.equal(got, want), f"{key} differs (max abs {(got.float() - want.float()).abs().max()})"
    else:
        assert got == want, f"{key}: {got} != {want}"


def check_timeout(absent_rank: int):
    import torch.distributed as dist

    from deepep_megatron import Buffer, Config

    os.environ["DEEPEP_MEGATRON_TIMEOUT_S"] = "3"
    rank, num_ranks = dist.get_rank(), dist.get_world_size()
    buffer = Buffer(
        dist.group.WORLD,
        num_nvl_bytes=Config(num_max_tokens_per_rank=64).get_nvl_buffer_size_hint(512, num_ranks),
    )
    x, topk_idx, _ = _inputs(7, rank, 64, 256, 8 * num_ranks, 4, "random")
    if rank == absent_rank:
        # Absent from the call, not gone: its region must outlive the others' timed-out kernels,
        # which still write into it (a freed region faults the context every rank shares).
        dist.barrier()
        return "absent"
    layout = buffer.get_dispatch_layout(topk_idx, 8 * num_ranks)
    start = time.monotonic()
    with pytest.raises(TimeoutError) as error:
        buffer.dispatch(
            x, num_tokens_per_rank=layout[0], is_token_in_rank=layout[3], num_tokens_per_expert=layout[2]
        )
    elapsed = time.monotonic() - start
    assert elapsed < 15, elapsed
    message = str(error.value)
    assert f"rank {rank}" in message and f"rank {absent_rank}" in message, message
    with pytest.raises(TimeoutError):  # the buffer stays failed, no hang
        buffer.get_dispatch_layout(topk_idx, 8 * num_ranks)
    dist.barrier()
    return message


def _soak_iteration(buffer, iteration: int, choice: list[int], max_tokens: int, num_experts: int) -> None:
    """One dispatch/combine round; every tensor it makes dies when it returns."""
    import torch.distributed as dist

    from deepep_megatron import Config

    rank = dist.get_rank()
    hidden = [256, 2048, 1000, 7 * 128][choice[0] % 4]
    num_tokens = (choice[1] + rank * 7919) % (max_tokens + 1)
    x = torch.randn((num_tokens, hidden), device="cuda").to(torch.bfloat16)
    topk_idx = torch.rand((num_tokens, num_experts), device="cuda").topk(6, dim=1).indices
    layout = buffer.get_dispatch_layout(topk_idx, num_experts)
    recv_x, _, _, _, handle, _ = buffer.dispatch(
        x,
        num_tokens_per_rank=layout[0],
        is_token_in_rank=layout[3],
        num_tokens_per_expert=layout[2],
        config=Config(8 + choice[2] % 9),
    )
    combined = buffer.combine(recv_x, handle)[0]
    # Each rank sends its rows back unchanged, so a token comes back times the ranks it reached.
    reached = layout[3].sum(1, keepdim=True).float()
    expected = (x.float() * reached).to(torch.bfloat16)
    if not torch.equal(combined, expected):
        bad = (combined != expected).any(1).nonzero().flatten()[:5].tolist()
        raise AssertionError(
            f"rank {rank} iteration {iteration} (N={num_tokens}, H={hidden}): tokens {bad} differ"
        )
    sent = int(layout[0].sum())
    assert sent == int(handle.num_tokens_matrix[rank].sum()), f"iteration {iteration}: count matrix row"


def soak(seed: int, iterations: int):
    """Back-to-back dispatch/combine with changing shapes and SM counts; checksums every
    iteration; no growth of device memory or of the zero-copy arena."""
    import torch.distributed as dist

    from deepep_megatron import Buffer, Config

    num_ranks = dist.get_world_size()
    max_tokens, num_experts = 512, 16 * num_ranks
    hint = Config(num_max_tokens_per_rank=max_tokens).get_nvl_buffer_size_hint(2048 * 2, num_ranks)
    buffer = Buffer(dist.group.WORLD, num_nvl_bytes=hint)
    generator = torch.Generator().manual_seed(seed)  # same on every rank: same shapes and SMs
    gc.collect()  # leftovers of earlier tests in this process must not move the baseline
    memory = []
    for iteration in range(iterations):
        choice = torch.randint(0, 1 << 30, (3,), generator=generator).tolist()
        _soak_iteration(buffer, iteration, choice, max_tokens, num_experts)
        if iteration % 100 == 99:
            gc.collect()
            torch.cuda.synchronize()
            memory.append(torch.cuda.memory_allocated())
    arena_in_use = buffer._router.normal_route.backend.runtime.arena_bytes_in_use
    assert max(memory) <= memory[0], f"device memory grew across iterations: {memory}"
    assert arena_in_use == 0, f"{arena_in_use} arena bytes still in use"
    assert buffer._router.normal_route.backend.num_copied_out == 0, (
        "outputs were copied out although the arena had room"
    )
    return memory[-1]


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("num_ranks", [1, 2, 3, 4, 8])
@pytest.mark.parametrize(
    "case,hidden,fp8,num_worst",
    [
        ("random", 7168, False, 0),
        ("random", 7168, True, 0),
        ("masked", 256, False, 1),
        ("masked", 512, True, 1),
        ("one_expert", 130, False, 0),
        ("zero_tokens", 6, False, 0),
        ("random", 2, False, 0),
    ],
)
def test_compiled_matches_portable(gpu_pools, num_ranks, case, hidden, fp8, num_worst):
    pool = gpu_pools(num_ranks)
    num_tokens = 128 if hidden >= 4096 else 300
    received = pool.run(
        check_against_portable,
        11 + num_ranks,
        num_tokens,
        hidden,
        8 * num_ranks,
        8 if num_ranks > 1 else 4,
        case,
        fp8,
        num_worst,
        max(1, min(16, 128 // num_ranks)),
    )
    assert len(received) == num_ranks


@pytest.mark.parametrize("fp8", [False, True])
def test_compiled_matches_portable_topk16(gpu_pools, fp8):
    """The widest top-k the kernels take, with masked slots."""
    pool = gpu_pools(4)
    pool.run(check_against_portable, 99, 200, 384, 64, 16, "masked", fp8, 0, 12)


def test_absent_rank_times_out(gpu_pools):
    pool = gpu_pools(4)
    messages = pool.run(check_timeout, 3)
    assert messages[3] == "absent"
    assert all("timed out" in m for m in messages[:3]), messages


@pytest.mark.slow
def test_soak_1000_iterations(gpu_pools):
    pool = gpu_pools(4)
    pool.run(soak, 5, 1000, timeout=900)
