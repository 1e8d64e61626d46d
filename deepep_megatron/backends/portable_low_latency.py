"""Portable backend for low-latency dispatch and combine (decode), on torch.distributed.

The reference for the low-latency kernels and their fallback: the same outputs, packing and
handle. One message per (token, selected expert) goes to the expert's rank; the receiver packs
each local expert's rows by source rank, then token (`[E_local, R * T, H]` slots).

It owns what DeepEP keeps per buffer for this mode: the bank index of the double buffer (kept so
handles say which bank they used, as the kernels' do) and the zero-copy combine buffers.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from deepep_megatron.backends.all_to_all import RowExchange
from deepep_megatron.backends.protocols import (
    LowLatencyCombineRequest,
    LowLatencyCombineResult,
    LowLatencyDispatchRequest,
    LowLatencyDispatchResult,
)
from deepep_megatron.fp8 import per_token_cast_to_fp8
from deepep_megatron.handle import LowLatencyHandle


class PortableLowLatencyBackend:
    """`LowLatencyBackend` on torch.distributed for one process group."""

    name = "portable"

    def __init__(self, group: dist.ProcessGroup):
        self.rank = dist.get_rank(group)
        self.num_ranks = dist.get_world_size(group)
        self.exchange = RowExchange(group)
        self._bank = 0
        self._combine_buffers: dict[int, torch.Tensor] = {}

    def destroy(self, collective: bool) -> None:
        self._combine_buffers.clear()

    # ------------------------------------------------------------------ dispatch
    def dispatch(self, request: LowLatencyDispatchRequest) -> LowLatencyDispatchResult:
        x, topk_idx = request.x, request.topk_idx
        num_ranks, device = self.num_ranks, x.device
        num_tokens, hidden = x.shape
        experts_per_rank = request.num_experts // num_ranks
        capacity = num_ranks * request.num_max_dispatch_tokens_per_rank
        bank, self._bank = self._bank, self._bank ^ 1

        # One message per (token, selected expert), grouped by destination rank, then local
        # expert, then token: the receiver unpacks each source's messages in that order.
        token_of_msg, k_of_msg = (topk_idx >= 0).nonzero(as_tuple=True)
        expert_of_msg = topk_idx[token_of_msg, k_of_msg]
        order = torch.argsort(expert_of_msg * max(num_tokens, 1) + token_of_msg, stable=True)
        token_of_msg, k_of_msg, expert_of_msg = token_of_msg[order], k_of_msg[order], expert_of_msg[order]
        dst_of_msg = expert_of_msg // experts_per_rank
        send_counts = torch.bincount(dst_of_msg, minlength=num_ranks)
        recv_counts = self.exchange.counts(send_counts.unsqueeze(1)).view(-1)
        send_counts_list, recv_counts_list = send_counts.tolist(), recv_counts.tolist()

        if request.use_fp8:
            x_fp8, scales = per_token_cast_to_fp8(
                x, round_scale=request.round_scale, use_ue8m0=request.use_ue8m0
            )
            payloads = [x_fp8.index_select(0, token_of_msg), scales.index_select(0, token_of_msg)]
        else:
            payloads = [x.index_select(0, token_of_msg)]
        header = torch.stack([expert_of_msg % experts_per_rank, token_of_msg], dim=1).int()
        pending = [self.exchange.start(t, send_counts_list, recv_counts_list) for t in [header, *payloads]]

        recv_x = torch.empty((experts_per_rank, capacity, hidden), dtype=payloads[0].dtype, device=device)
        recv_scales = None
        if request.use_fp8:
            # Column-major scales (token dimension contiguous), as DeepEP returns them.
            recv_scales = torch.empty(
                (experts_per_rank, payloads[1].size(1), capacity), dtype=payloads[1].dtype, device=device
            ).transpose(1, 2)
        recv_count = torch.full((experts_per_rank,), -1, dtype=torch.int32, device=device)
        state = _LowLatencyState(
            token_of_msg, k_of_msg, send_counts_list, recv_counts_list, tuple(topk_idx.shape)
        )
        handle = LowLatencyHandle(
            recv_src_info=torch.full((experts_per_rank, capacity), -1, dtype=torch.int32, device=device),
            recv_layout_range=torch.zeros((experts_per_rank, num_ranks), dtype=torch.int64, device=device),
            recv_count=recv_count,
            num_max_dispatch_tokens_per_rank=request.num_max_dispatch_tokens_per_rank,
            hidden=hidden,
            num_experts=request.num_experts,
            buffer_index=bank,
            backend=self,
            backend_state=state,
        )
        if request.return_recv_hook:
            # Nothing has been received yet: make stale data obvious rather than plausible.
            _poison(recv_x)
            if recv_scales is not None:
                _poison(recv_scales)

        def receive() -> None:
            start = time.perf_counter_ns()
            recv_header, *recv_payloads = (done() for done in pending)
            _add_wait_cost(
                request.dispatch_wait_recv_cost_stats, recv_counts_list, time.perf_counter_ns() - start
            )
            self._unpack(recv_header, recv_payloads, recv_counts_list, recv_x, recv_scales, handle)
            if request.cumulative_local_expert_recv_stats is not None:
                # After recv_count is written, on the same stream: the count is final here.
                request.cumulative_local_expert_recv_stats.add_(recv_count)

        if request.return_recv_hook:
            return LowLatencyDispatchResult(recv_x, recv_scales, recv_count, handle, receive)
        receive()
        return LowLatencyDispatchResult(recv_x, recv_scales, recv_count, handle, None)

    def _unpack(self, recv_header, recv_payloads, recv_counts_list, recv_x, recv_scales, handle) -> None:
        """Pack the arrived messages into per-expert slots: by source rank, then token."""
        device, num_ranks = recv_x.device, self.num_ranks
        experts_per_rank = recv_x.size(0)
        local_expert, src_token = recv_header[:, 0].long(), recv_header[:, 1]
        src_rank = torch.repeat_interleave(
            torch.arange(num_ranks, device=device), torch.tensor(recv_counts_list, device=device)
        )
        # Messages arrive by source rank, and by (local expert, token) inside a source; a stable
        # sort by expert packs each expert's rows by source rank, then token.
        by_expert = torch.argsort(local_expert, stable=True)
        counts = torch.bincount(local_expert, minlength=experts_per_rank)
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.arange(local_expert.numel(), device=device) - starts[local_expert[by_expert]]
        expert_sorted = local_expert[by_expert]
        recv_x[expert_sorted, slot] = recv_payloads[0][by_expert]
        if recv_scales is not None:
            recv_scales[expert_sorted, slot] = recv_payloads[1][by_expert]
        handle.recv_src_info[expert_sorted, slot] = src_token[by_expert]
        state: _LowLatencyState = handle.backend_state
        state.arrival_expert = torch.empty_like(local_expert)
        state.arrival_expert[by_expert] = expert_sorted
        state.arrival_slot = torch.empty_like(local_expert)
        state.arrival_slot[by_expert] = slot
        handle.recv_count.copy_(counts.int())
        pair_counts = torch.zeros((experts_per_rank, num_ranks), dtype=torch.int64, device=device)
        pair_counts.index_put_((local_expert, src_rank), torch.ones_like(local_expert), accumulate=True)
        pair_begin = torch.cumsum(pair_counts, 1) - pair_counts
        handle.recv_layout_range.copy_((pair_begin << 32) | pair_counts)

    # ------------------------------------------------------------------ combine
    def combine(self, request: LowLatencyCombineRequest) -> LowLatencyCombineResult:
        """Weighted sum over each token's top-k slots, accumulated in fp32 in top-k order."""
        x, topk_idx, topk_weights, handle = request.x, request.topk_idx, request.topk_weights, request.handle
        state: _LowLatencyState = handle.backend_state
        num_tokens, num_topk = topk_idx.shape
        if (num_tokens, num_topk) != state.topk_shape:
            raise ValueError(
                f"low_latency_combine: topk_idx has shape {(num_tokens, num_topk)} (tokens, top-k), "
                f"the dispatch had {state.topk_shape}"
            )
        if state.arrival_expert is None:
            raise RuntimeError(
                "low_latency_combine: the dispatch has not received yet; call its hook() first"
            )
        hidden = x.size(-1)
        # Expert side: every packed row goes back to its source in the order it arrived.
        pending = self.exchange.start(
            x[state.arrival_expert, state.arrival_slot], state.recv_counts, state.send_counts
        )
        result = request.out
        if result is None:
            result = torch.empty((num_tokens, hidden), dtype=torch.bfloat16, device=x.device)

        def receive() -> None:
            start = time.perf_counter_ns()
            back = pending()
            _add_wait_cost(
                request.combine_wait_recv_cost_stats, state.send_counts, time.perf_counter_ns() - start
            )
            contributions = torch.zeros((num_tokens, num_topk, hidden), dtype=torch.float32, device=x.device)
            contributions[state.token_of_msg, state.k_of_msg] = back.float()
            weights = torch.where(topk_idx >= 0, topk_weights, torch.zeros_like(topk_weights))
            acc = torch.zeros((num_tokens, hidden), dtype=torch.float32, device=x.device)
            for k in range(num_topk):
                acc += weights[:, k : k + 1] * contributions[:, k]
            result.copy_(acc.to(torch.bfloat16))

        if request.return_recv_hook:
            return LowLatencyCombineResult(result, receive)
        receive()
        return LowLatencyCombineResult(result, None)

    # ------------------------------------------------------------------ buffers
    def next_combine_buffer(self, handle: LowLatencyHandle) -> torch.Tensor:
        shape = (
            handle.num_experts // self.num_ranks,
            self.num_ranks * handle.num_max_dispatch_tokens_per_rank,
            handle.hidden,
        )
        buffer = self._combine_buffers.get(handle.buffer_index)
        if buffer is None or tuple(buffer.shape) != shape or buffer.device != handle.recv_count.device:
            buffer = torch.zeros(shape, dtype=torch.bfloat16, device=handle.recv_count.device)
            self._combine_buffers[handle.buffer_index] = buffer
        return buffer

    def clean(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> None:
        """Nothing persists between calls but the zero-copy combine buffers: zero them."""
        for buffer in self._combine_buffers.values():
            buffer.zero_()


def _add_wait_cost(stats: torch.Tensor | None, counts_per_rank: list[int], wait_ns: int) -> None:
    """Every source that sent rows arrived in the one exchange just waited for, so each is
    charged that wait (host nanoseconds; about 0 where the exchange runs asynchronously)."""
    if stats is None:
        return
    sent = torch.tensor([wait_ns if count > 0 else 0 for count in counts_per_rank], dtype=torch.int64)
    stats.add_(sent.to(stats.device, non_blocking=True))


class _LowLatencyState:
    """Sender side: which (token, top-k slot) each sent message was. Receiver side, filled when
    the receive completes: the packed (local expert, slot) of each arrived message."""

    __slots__ = (
        "token_of_msg",
        "k_of_msg",
        "send_counts",
        "recv_counts",
        "topk_shape",
        "arrival_expert",
        "arrival_slot",
    )

    def __init__(self, token_of_msg, k_of_msg, send_counts, recv_counts, topk_shape):
        self.token_of_msg = token_of_msg
        self.k_of_msg = k_of_msg
        self.send_counts = send_counts
        self.recv_counts = recv_counts
        self.topk_shape = topk_shape
        self.arrival_expert = None
        self.arrival_slot = None


def _poison(tensor: torch.Tensor) -> None:
    """Fill with NaN (floats, incl. e4m3) or 0x7F bytes (packed UE8M0 int32 scales). `fill_`
    rather than a byte view, because column-major scales cannot be viewed as bytes."""
    if tensor.dtype.is_floating_point:
        tensor.fill_(float("nan"))
    else:
        tensor.fill_(int.from_bytes(b"\x7f" * tensor.element_size(), "little"))
