"""Stream ordering on the GPU: `previous_event` orders a communication call after work on another
stream, and `async_finish` hands back an event that orders the caller's later work after it.

The producer writes `x` on a side stream after a long sleep, so a dispatch that did not wait for the
side stream's event would read stale zeros: the control case shows exactly that, so the test can
fail. Compiled backend, 2 ranks (on one GPU under MPS where there is only one).
"""

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
]

SLEEP_CYCLES = 400_000_000  # about 0.2 s at 2 GHz: far longer than a dispatch


def _ordering_case(use_previous_event: bool) -> dict:
    import torch.distributed as dist

    from deepep_megatron import Buffer, Config
    from deepep_megatron.testing.reference import make_rank_inputs

    rank, num_ranks = dist.get_rank(), dist.get_world_size()
    num_tokens, hidden, num_experts = 64, 256, 8 * num_ranks
    inputs = make_rank_inputs(7, rank, num_tokens, hidden, num_experts, 2)
    true_x, topk_idx = inputs.x.cuda(), inputs.topk_idx.cuda()
    hint = Config(num_max_tokens_per_rank=num_tokens).get_nvl_buffer_size_hint(hidden * 2, num_ranks)
    buffer = Buffer(dist.group.WORLD, num_nvl_bytes=hint, backend="cuda")
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, num_experts)
    reference = buffer.dispatch(
        true_x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert
    )[0].clone()
    torch.cuda.synchronize()
    dist.barrier()

    def produce_late(value: torch.Tensor) -> tuple[torch.Tensor, object]:
        """`value` copied into a fresh tensor on a side stream after a long sleep, and the side
        stream's event (captured there)."""
        out = torch.zeros_like(value)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            torch.cuda._sleep(SLEEP_CYCLES)
            out.copy_(value)
            produced = Buffer.capture()
        out.record_stream(side)
        return out, produced

    # Fresh dispatch (it syncs the host once for the counts, after the event).
    x, produced = produce_late(true_x)
    recv_x, _, _, _, handle, event = buffer.dispatch(
        x,
        num_tokens_per_rank=per_rank,
        is_token_in_rank=in_rank,
        num_tokens_per_expert=per_expert,
        previous_event=produced if use_previous_event else None,
        async_finish=True,
    )
    event.current_stream_wait()
    received = recv_x.clone()  # on the current stream, after the event
    # Cached dispatch: no host sync at all, so the call returns while it still waits.
    x, produced = produce_late(true_x)
    cached, _, _, _, _, cached_event = buffer.dispatch(
        x, handle=handle, previous_event=produced if use_previous_event else None, async_finish=True
    )
    pending_after_call = cached_event.event is not None and not cached_event.event.query()
    cached_event.current_stream_wait()
    cached = cached.clone()
    combined, _, combine_event = buffer.combine(recv_x, handle, async_finish=True)
    combine_event.current_stream_wait()
    reached = in_rank.sum(1, keepdim=True).float()
    combined_ok = torch.equal(combined, (true_x.float() * reached).to(torch.bfloat16))
    torch.cuda.synchronize()
    return {
        "dispatch_ok": torch.equal(received, reference),
        "cached_ok": torch.equal(cached, reference),
        "combine_ok": combined_ok,
        "pending_after_call": pending_after_call,
    }


@pytest.fixture(scope="module")
def pool():
    from deepep_megatron.launch import start_mps_daemon
    from deepep_megatron.testing.rank_pool import RankPool

    share_gpu = torch.cuda.device_count() < 2
    env = {"DEEPEP_MEGATRON_SHARE_GPU": "1" if share_gpu else "0", "DEEPEP_MEGATRON_TIMEOUT_S": "20"}
    daemon = start_mps_daemon() if share_gpu else None
    if daemon is not None:
        env.update(daemon.env)
    ranks = RankPool(2, device="cuda", env=env)
    yield ranks
    ranks.close()
    if daemon is not None:
        daemon.stop()


def test_previous_event_orders_dispatch_after_another_stream(pool):
    for result in pool.run(_ordering_case, True):
        assert result["dispatch_ok"], "dispatch read x before the producer's event"
        assert result["cached_ok"], "cached dispatch read x before the producer's event"
        assert result["pending_after_call"], "an async cached dispatch did not return before its work ended"
        assert result["combine_ok"]


def test_without_the_event_the_dispatch_reads_stale_input(pool):
    """The control: the same call without `previous_event` races the producer (and loses), which
    shows the ordering test above measures something."""
    results = pool.run(_ordering_case, False)
    assert not all(r["dispatch_ok"] for r in results)
    assert not all(r["cached_ok"] for r in results)
