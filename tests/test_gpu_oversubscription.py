"""Eight ranks on one GPU with the default settings (20 SMs each, 160 blocks for 132 SMs) must
complete or raise, never hang: `Buffer` clamps the SM count where ranks share a GPU, with one
warning that says so. Run under MPS on a one-GPU machine (skipped with several GPUs, where ranks do
not share one)."""

from __future__ import annotations

import pytest
import torch

from deepep_megatron.backends import extension

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not (torch.cuda.is_available() and extension.extension_available()),
        reason="needs CUDA and the compiled extension",
    ),
    pytest.mark.skipif(
        torch.cuda.is_available() and torch.cuda.device_count() > 1, reason="ranks share one GPU"
    ),
]

NUM_RANKS = 8


def _default_settings_round_trip() -> dict:
    import warnings

    import torch.distributed as dist

    from deepep_megatron import Buffer, Config
    from deepep_megatron.testing.reference import make_rank_inputs

    rank, num_ranks = dist.get_rank(), dist.get_world_size()
    num_tokens, hidden, num_experts = 256, 1024, 4 * num_ranks
    inputs = make_rank_inputs(3, rank, num_tokens, hidden, num_experts, 4)
    x, topk_idx = inputs.x.cuda(), inputs.topk_idx.cuda()
    hint = Config(num_max_tokens_per_rank=num_tokens).get_nvl_buffer_size_hint(hidden * 2, num_ranks)
    buffer = Buffer(dist.group.WORLD, num_nvl_bytes=hint)  # default Config: 20 SMs
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, num_experts)
            recv_x, _, _, _, handle, _ = buffer.dispatch(
                x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert
            )
            combined, _, _ = buffer.combine(recv_x, handle)
    torch.cuda.synchronize()
    reached = in_rank.sum(1, keepdim=True).float()
    clamp_warnings = [str(w.message) for w in caught if "share a GPU" in str(w.message)]
    return {
        "backend": buffer.backend_name,
        "max_sms_per_rank": buffer.topology.max_sms_per_rank,
        "ranks_per_gpu": buffer.topology.ranks_per_gpu,
        "correct": torch.equal(combined, (x.float() * reached).to(torch.bfloat16)),
        "clamp_warnings": clamp_warnings,
    }


def test_eight_ranks_on_one_gpu_with_default_settings_complete():
    from deepep_megatron.launch import start_mps_daemon
    from deepep_megatron.testing.rank_pool import RankPool

    daemon = start_mps_daemon()
    env = {"DEEPEP_MEGATRON_SHARE_GPU": "1", "DEEPEP_MEGATRON_TIMEOUT_S": "15", **daemon.env}
    pool = RankPool(NUM_RANKS, device="cuda", env=env)
    try:
        results = pool.run(_default_settings_round_trip, timeout=180)  # a hang fails here, not forever
    finally:
        pool.close()
        daemon.stop()
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    for result in results:
        assert result["backend"] == "intranode"
        assert result["ranks_per_gpu"] == NUM_RANKS
        assert result["max_sms_per_rank"] == num_sms // NUM_RANKS
        assert result["correct"]
        assert len(result["clamp_warnings"]) == 1, result["clamp_warnings"]  # one warning per Buffer
        assert f"run on {num_sms // NUM_RANKS} SMs per rank instead of 20" in result["clamp_warnings"][0]


TIMEOUT_S = 5


def _unclamped_round_trips() -> dict:
    """Three round trips on 20 SMs per rank, the clamp bypassed (160 blocks for 132 SMs, so not
    every block is resident): they must complete, or raise TimeoutError on every rank, within the
    timeout plus the host's margin, never hang."""
    import time

    import torch.distributed as dist

    from deepep_megatron import Buffer, Config
    from deepep_megatron.testing.reference import make_rank_inputs

    rank, num_ranks = dist.get_rank(), dist.get_world_size()
    num_tokens, hidden, num_experts = 256, 1024, 4 * num_ranks
    inputs = make_rank_inputs(5, rank, num_tokens, hidden, num_experts, 4)
    x, topk_idx = inputs.x.cuda(), inputs.topk_idx.cuda()
    hint = Config(num_max_tokens_per_rank=num_tokens).get_nvl_buffer_size_hint(hidden * 2, num_ranks)
    buffer = Buffer(dist.group.WORLD, num_nvl_bytes=hint)
    buffer._kernel_num_sms = lambda config, default: 20  # what the clamp prevents
    start = time.monotonic()
    outcome, correct = "completed", None
    try:
        for _ in range(3):
            per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, num_experts)
            recv_x, _, _, _, handle, _ = buffer.dispatch(
                x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert
            )
            combined, _, _ = buffer.combine(recv_x, handle)
        torch.cuda.synchronize()
        buffer.get_dispatch_layout(topk_idx, num_experts)  # an aborted combine surfaces here
        correct = torch.equal(combined, (x.float() * in_rank.sum(1, keepdim=True).float()).to(torch.bfloat16))
    except TimeoutError as error:
        outcome = str(error)
    elapsed = time.monotonic() - start
    later_call_raises = None  # after a timeout, every call raises before it launches
    if outcome != "completed":
        try:
            buffer.get_dispatch_layout(topk_idx, num_experts)
            later_call_raises = False
        except TimeoutError:
            later_call_raises = True
    torch.cuda.synchronize()  # every kernel of this rank has ended
    dist.barrier()  # and every other rank's: only then may a completed rank free its region
    return {"outcome": outcome, "correct": correct, "elapsed": elapsed, "later_raises": later_call_raises}


def test_oversubscribed_blocks_complete_or_time_out_on_every_rank_in_time():
    from deepep_megatron.launch import start_mps_daemon
    from deepep_megatron.testing.rank_pool import RankPool

    daemon = start_mps_daemon()
    env = {"DEEPEP_MEGATRON_SHARE_GPU": "1", "DEEPEP_MEGATRON_TIMEOUT_S": str(TIMEOUT_S), **daemon.env}
    pool = RankPool(NUM_RANKS, device="cuda", env=env)
    try:
        results = pool.run(_unclamped_round_trips, timeout=180)
    finally:
        pool.close()
        daemon.stop()
    # Every wait of an operation shares one deadline, so each rank ends within the timeout plus
    # the host margin (5 s) plus the round trips that completed before; each outcome is either a
    # correct result or a TimeoutError, after which the buffer refuses every call.
    assert max(r["elapsed"] for r in results) < 3 * TIMEOUT_S + 10, results
    for result in results:
        if result["outcome"] == "completed":
            assert result["correct"], results
        else:
            assert "timed out" in result["outcome"], results
            assert result["later_raises"], results
