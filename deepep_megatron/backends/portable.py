"""Portable backend on torch.distributed: gloo on the CPU, NCCL (or gloo staged through the host)
on the GPU. Plain, vectorised torch code with the same results and row order as the kernels.

Each exchange is counts first, then one `all_to_all_single` per tensor, on raw bytes so every
dtype travels the same way. There are no per-token Python loops and nothing is pickled.

Summation order, shared with the compiled combine so results are bit-identical: for each token,
fp32 accumulation of the contributing ranks in ascending rank order, then `bias[0]`, then
`bias[1]`, then one rounding to bf16.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from deepep_megatron.backends.base import (
    DispatchLayout,
    DispatchRequest,
    DispatchResult,
    LowLatencyDispatchResult,
)
from deepep_megatron.fp8 import per_token_cast_to_fp8
from deepep_megatron.handle import DispatchHandle, LowLatencyHandle


def _as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """`[rows, ...]` of any dtype -> `[rows, row_bytes]` uint8 (copies only if not contiguous)."""
    row_bytes = tensor.element_size() * math.prod(tensor.shape[1:])
    return tensor.contiguous().view(torch.uint8).reshape(tensor.size(0), row_bytes)


def _round_up(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


class PortableBackend:
    """Collective implementation of the Buffer contract for one process group."""

    name = "portable"

    def __init__(self, group: dist.ProcessGroup, num_ranks_per_node: int):
        self.group = group
        self.rank = dist.get_rank(group)
        self.num_ranks = dist.get_world_size(group)
        self.num_ranks_per_node = num_ranks_per_node
        # gloo cannot move CUDA tensors in all_to_all: stage them through the host.
        self._stage_through_host = dist.get_backend(group) == "gloo"

    # ------------------------------------------------------------------ transport
    def _exchange(self, send: torch.Tensor, send_counts: list[int], recv_counts: list[int], async_op=False):
        """Row-wise all-to-all of `send` (`[sum(send_counts), ...]`). Returns the received
        `[sum(recv_counts), ...]` tensor, or `(tensor, finish)` when `async_op`."""
        row_shape = send.shape[1:]
        send_bytes = _as_bytes(send)
        row_bytes = send_bytes.size(1)
        device = send.device
        staged = self._stage_through_host and device.type == "cuda"
        if staged:
            send_bytes = send_bytes.cpu()
        recv_bytes = torch.empty((sum(recv_counts), row_bytes), dtype=torch.uint8, device=send_bytes.device)
        work = dist.all_to_all_single(
            recv_bytes, send_bytes, recv_counts, send_counts, group=self.group, async_op=async_op
        )

        def finish() -> torch.Tensor:
            if work is not None:
                work.wait()
            out = recv_bytes.to(device) if staged else recv_bytes
            return out.view(send.dtype).reshape(out.size(0), *row_shape)

        return (recv_bytes, finish) if async_op else finish()

    def _exchange_counts(self, counts: torch.Tensor) -> torch.Tensor:
        """`counts`: `[R, ...]` int, row r goes to rank r. Returns `[R, ...]`, row s from rank s."""
        ones = [1] * self.num_ranks
        return self._exchange(counts, ones, ones)

    # ------------------------------------------------------------------ layout
    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int) -> DispatchLayout:
        num_tokens = topk_idx.size(0)
        experts_per_rank = num_experts // self.num_ranks
        valid = topk_idx >= 0
        token_ids = torch.arange(num_tokens, device=topk_idx.device).unsqueeze(1).expand_as(topk_idx)
        is_token_in_rank = torch.zeros((num_tokens, self.num_ranks), dtype=torch.bool, device=topk_idx.device)
        is_token_in_rank[token_ids[valid], topk_idx[valid] // experts_per_rank] = True
        num_tokens_per_expert = torch.bincount(topk_idx[valid], minlength=num_experts).int()
        num_tokens_per_rank = is_token_in_rank.sum(0, dtype=torch.int32)
        num_tokens_per_rdma_rank = None
        if self.num_ranks_per_node < self.num_ranks:
            per_node = is_token_in_rank.view(num_tokens, -1, self.num_ranks_per_node).any(-1)
            num_tokens_per_rdma_rank = per_node.sum(0, dtype=torch.int32)
        return DispatchLayout(
            num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank
        )

    # ------------------------------------------------------------------ normal dispatch
    def dispatch(self, request: DispatchRequest) -> DispatchResult:
        if request.handle is not None:
            return self._cached_dispatch(request)
        x, rank, num_ranks = request.x, self.rank, self.num_ranks
        device = x.device
        is_token_in_rank = request.is_token_in_rank
        num_tokens, hidden = x.shape
        num_experts = request.num_tokens_per_expert.numel()
        experts_per_rank = num_experts // num_ranks

        # Rows go out grouped by destination rank, tokens in order inside each group.
        dst_of_row, token_of_row = is_token_in_rank.t().nonzero(as_tuple=True)
        send_counts_t = is_token_in_rank.sum(0, dtype=torch.int64)
        send_slot = (is_token_in_rank.long().cumsum(0) - 1).int().masked_fill_(~is_token_in_rank, -1)

        # Counts first: tokens and per-expert selections for the receiver's experts.
        expert_counts = request.num_tokens_per_expert.view(num_ranks, experts_per_rank).long()
        recv_meta = self._exchange_counts(torch.cat([send_counts_t.unsqueeze(1), expert_counts], dim=1))
        recv_counts_t = recv_meta[:, 0]
        num_tokens_matrix = self._gather_count_matrix(send_counts_t)
        send_counts, recv_counts = send_counts_t.tolist(), recv_counts_t.tolist()
        num_recv = sum(recv_counts)

        recv_x = self._exchange(x.index_select(0, token_of_row), send_counts, recv_counts)
        recv_scales = None
        if request.scales is not None:
            recv_scales = self._exchange(
                request.scales.index_select(0, token_of_row), send_counts, recv_counts
            )
        recv_src_idx = self._exchange(token_of_row.int().unsqueeze(1), send_counts, recv_counts).view(-1)

        recv_topk_idx = recv_topk_weights = None
        if request.topk_idx is not None:
            global_idx = self._exchange(
                request.topk_idx.index_select(0, token_of_row), send_counts, recv_counts
            )
            local_idx = global_idx - rank * experts_per_rank
            is_local = (global_idx >= 0) & (local_idx >= 0) & (local_idx < experts_per_rank)
            recv_topk_idx = torch.where(is_local, local_idx, torch.full_like(local_idx, -1))
            if request.topk_weights is not None:
                weights = self._exchange(
                    request.topk_weights.index_select(0, token_of_row), send_counts, recv_counts
                )
                recv_topk_weights = torch.where(is_local, weights, torch.zeros_like(weights))

        per_expert = recv_meta[:, 1:].sum(0).tolist()
        num_recv_tokens_per_expert_list = [_round_up(c, request.expert_alignment) for c in per_expert]

        num_rows = num_recv
        if request.num_worst_tokens > 0:
            if num_recv > request.num_worst_tokens:
                raise RuntimeError(
                    f"rank {rank} received {num_recv} tokens, "
                    f"more than num_worst_tokens={request.num_worst_tokens}"
                )
            num_rows = request.num_worst_tokens
            recv_x = _pad_rows(recv_x, num_rows, 0)
            recv_scales = _pad_rows(recv_scales, num_rows, 0)
            recv_src_idx = _pad_rows(recv_src_idx, num_rows, -1)
            recv_topk_idx = _pad_rows(recv_topk_idx, num_rows, -1)
            recv_topk_weights = _pad_rows(recv_topk_weights, num_rows, 0)
            num_recv_tokens_per_expert_list = []

        handle = DispatchHandle(
            backend=self.name,
            num_tokens=num_tokens,
            hidden=hidden,
            num_recv_rows=num_rows,
            num_recv_tokens=num_recv,
            is_token_in_rank=is_token_in_rank,
            num_tokens_matrix=num_tokens_matrix.to(device),
            send_slot=send_slot,
            recv_src_idx=recv_src_idx,
            num_recv_tokens_per_expert_list=num_recv_tokens_per_expert_list,
            backend_state=_PortableState(token_of_row, send_counts, recv_counts),
        )
        return DispatchResult(recv_x, recv_scales, recv_topk_idx, recv_topk_weights, handle)

    def _gather_count_matrix(self, send_counts: torch.Tensor) -> torch.Tensor:
        """`[R, R]` int32 on the host, `[src, dst]` = tokens src sends to dst."""
        rows = [torch.empty_like(send_counts.cpu()) for _ in range(self.num_ranks)]
        dist.all_gather(rows, send_counts.cpu(), group=self.group)
        return torch.stack(rows).int()

    def _cached_dispatch(self, request: DispatchRequest) -> DispatchResult:
        handle = request.handle
        state: _PortableState = handle.backend_state
        recv_x = self._exchange(
            request.x.index_select(0, state.token_of_row), state.send_counts, state.recv_counts
        )
        recv_scales = None
        if request.scales is not None:
            recv_scales = self._exchange(
                request.scales.index_select(0, state.token_of_row), state.send_counts, state.recv_counts
            )
        if handle.num_recv_rows > handle.num_recv_tokens:
            recv_x = _pad_rows(recv_x, handle.num_recv_rows, 0)
            recv_scales = _pad_rows(recv_scales, handle.num_recv_rows, 0)
        return DispatchResult(recv_x, recv_scales, None, None, handle)

    # ------------------------------------------------------------------ normal combine
    def combine(self, x, handle: DispatchHandle, topk_weights, biases, num_sms):
        state: _PortableState = handle.backend_state
        valid_rows = handle.num_recv_tokens
        back_x = self._exchange(x[:valid_rows], state.recv_counts, state.send_counts)
        combined = self._reduce_by_rank(back_x.float(), state, (handle.num_tokens, handle.hidden))
        for bias in biases:
            combined += bias.float()
        combined_weights = None
        if topk_weights is not None:
            back_w = self._exchange(topk_weights[:valid_rows], state.recv_counts, state.send_counts)
            combined_weights = self._reduce_by_rank(back_w, state, (handle.num_tokens, topk_weights.size(1)))
        return combined.to(torch.bfloat16), combined_weights

    @staticmethod
    def _reduce_by_rank(rows: torch.Tensor, state: _PortableState, shape) -> torch.Tensor:
        """Sum rows that came back from each rank into their tokens, in ascending rank order
        (one deterministic fp32 add per rank; a token appears at most once per rank)."""
        out = torch.zeros(shape, dtype=torch.float32, device=rows.device)
        start = 0
        for count in state.send_counts:
            tokens = state.token_of_row[start : start + count]
            out[tokens] += rows[start : start + count]
            start += count
        return out

    # ------------------------------------------------------------------ low latency
    def low_latency_dispatch(
        self,
        x,
        topk_idx,
        num_max_dispatch_tokens_per_rank,
        num_experts,
        use_fp8,
        round_scale,
        use_ue8m0,
        buffer_index,
        return_recv_hook,
    ) -> LowLatencyDispatchResult:
        num_ranks, device = self.num_ranks, x.device
        num_tokens, hidden = x.shape
        experts_per_rank = num_experts // num_ranks
        capacity = num_ranks * num_max_dispatch_tokens_per_rank

        # One message per (token, selected expert), grouped by destination rank, then local
        # expert, then token: the receiver unpacks each source's messages in that order.
        token_of_msg, k_of_msg = (topk_idx >= 0).nonzero(as_tuple=True)
        expert_of_msg = topk_idx[token_of_msg, k_of_msg]
        order = torch.argsort(expert_of_msg * max(num_tokens, 1) + token_of_msg, stable=True)
        token_of_msg, k_of_msg, expert_of_msg = token_of_msg[order], k_of_msg[order], expert_of_msg[order]
        dst_of_msg = expert_of_msg // experts_per_rank
        send_counts = torch.bincount(dst_of_msg, minlength=num_ranks)
        recv_counts = self._exchange_counts(send_counts.unsqueeze(1)).view(-1)
        send_counts_list, recv_counts_list = send_counts.tolist(), recv_counts.tolist()

        if use_fp8:
            x_fp8, scales = per_token_cast_to_fp8(x, round_scale=round_scale, use_ue8m0=use_ue8m0)
            payloads = [x_fp8.index_select(0, token_of_msg), scales.index_select(0, token_of_msg)]
        else:
            payloads = [x.index_select(0, token_of_msg)]
        header = torch.stack([expert_of_msg % experts_per_rank, token_of_msg], dim=1).int()
        pending = [
            self._exchange(t, send_counts_list, recv_counts_list, async_op=True) for t in [header, *payloads]
        ]

        recv_x = torch.empty((experts_per_rank, capacity, hidden), dtype=payloads[0].dtype, device=device)
        recv_scales = None
        if use_fp8:
            num_scale_cols = payloads[1].size(1)
            # Column-major scales (token dimension contiguous), as DeepEP returns them.
            recv_scales = torch.empty(
                (experts_per_rank, num_scale_cols, capacity), dtype=payloads[1].dtype, device=device
            ).transpose(1, 2)
        recv_count = torch.full((experts_per_rank,), -1, dtype=torch.int32, device=device)
        recv_src_info = torch.full((experts_per_rank, capacity), -1, dtype=torch.int32, device=device)
        recv_layout_range = torch.zeros((experts_per_rank, num_ranks), dtype=torch.int64, device=device)
        if return_recv_hook:
            # Nothing has been received yet: make stale data obvious rather than plausible.
            _poison(recv_x)
            if recv_scales is not None:
                _poison(recv_scales)

        def finish() -> None:
            recv_header, *recv_payloads = (done() for _, done in pending)
            local_expert, src_token = recv_header[:, 0].long(), recv_header[:, 1]
            src_rank = torch.repeat_interleave(
                torch.arange(num_ranks, device=device), torch.tensor(recv_counts_list, device=device)
            )
            # Messages arrive by source rank, and by (local expert, token) inside a source; a
            # stable sort by expert packs each expert's rows by source rank, then token.
            by_expert = torch.argsort(local_expert, stable=True)
            counts = torch.bincount(local_expert, minlength=experts_per_rank)
            starts = torch.cumsum(counts, 0) - counts
            slot = torch.arange(local_expert.numel(), device=device) - starts[local_expert[by_expert]]
            expert_sorted = local_expert[by_expert]
            recv_x[expert_sorted, slot] = recv_payloads[0][by_expert]
            if recv_scales is not None:
                recv_scales[expert_sorted, slot] = recv_payloads[1][by_expert]
            recv_src_info[expert_sorted, slot] = src_token[by_expert]
            state.arrival_expert = torch.empty_like(local_expert)
            state.arrival_expert[by_expert] = expert_sorted
            state.arrival_slot = torch.empty_like(local_expert)
            state.arrival_slot[by_expert] = slot
            recv_count.copy_(counts.int())
            pair_counts = torch.zeros((experts_per_rank, num_ranks), dtype=torch.int64, device=device)
            pair_counts.index_put_((local_expert, src_rank), torch.ones_like(local_expert), accumulate=True)
            pair_begin = torch.cumsum(pair_counts, 1) - pair_counts
            recv_layout_range.copy_((pair_begin << 32) | pair_counts)

        state = _LowLatencyState(
            token_of_msg, k_of_msg, send_counts_list, recv_counts_list, tuple(topk_idx.shape)
        )
        handle = LowLatencyHandle(
            recv_src_info=recv_src_info,
            recv_layout_range=recv_layout_range,
            recv_count=recv_count,
            num_max_dispatch_tokens_per_rank=num_max_dispatch_tokens_per_rank,
            hidden=hidden,
            num_experts=num_experts,
            buffer_index=buffer_index,
            backend_state=state,
        )
        if not return_recv_hook:
            finish()
            finish = None
        return LowLatencyDispatchResult(recv_x, recv_scales, recv_count, handle, finish)

    def low_latency_combine(self, x, topk_idx, topk_weights, handle: LowLatencyHandle, out, return_recv_hook):
        """`x`: `[E_local, R * max_tokens, H]` bf16 expert outputs in the dispatch's packing.
        Returns `(combined [N, H] bf16, finish or None)`; the sum over top-k slots is weighted and
        accumulated in fp32 in top-k order."""
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
        back_send = x[state.arrival_expert, state.arrival_slot]
        pending = self._exchange(back_send, state.recv_counts, state.send_counts, async_op=True)
        result = (
            out
            if out is not None
            else torch.empty((num_tokens, hidden), dtype=torch.bfloat16, device=x.device)
        )

        def finish() -> None:
            back = pending[1]()
            contributions = torch.zeros((num_tokens, num_topk, hidden), dtype=torch.float32, device=x.device)
            contributions[state.token_of_msg, state.k_of_msg] = back.float()
            weights = torch.where(topk_idx >= 0, topk_weights, torch.zeros_like(topk_weights))
            acc = torch.zeros((num_tokens, hidden), dtype=torch.float32, device=x.device)
            for k in range(num_topk):
                acc += weights[:, k : k + 1] * contributions[:, k]
            result.copy_(acc.to(torch.bfloat16))

        if not return_recv_hook:
            finish()
            return result, None
        return result, finish


class _PortableState:
    """Split sizes and the send order of one normal dispatch (host lists, device index)."""

    __slots__ = ("token_of_row", "send_counts", "recv_counts")

    def __init__(self, token_of_row: torch.Tensor, send_counts: list[int], recv_counts: list[int]):
        self.token_of_row = token_of_row
        self.send_counts = send_counts
        self.recv_counts = recv_counts


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
        self.topk_shape = topk_shape
        self.k_of_msg = k_of_msg
        self.send_counts = send_counts
        self.recv_counts = recv_counts
        self.arrival_expert = None
        self.arrival_slot = None


def _pad_rows(tensor: torch.Tensor | None, num_rows: int, value) -> torch.Tensor | None:
    if tensor is None or tensor.size(0) == num_rows:
        return tensor
    padded = tensor.new_full((num_rows, *tensor.shape[1:]), value)
    padded[: tensor.size(0)] = tensor
    return padded


def _poison(tensor: torch.Tensor) -> None:
    """Fill with NaN (floats, incl. e4m3) or 0x7F bytes (packed UE8M0 int32 scales). `fill_`
    rather than a byte view, because column-major scales cannot be viewed as bytes."""
    if tensor.dtype.is_floating_point:
        tensor.fill_(float("nan"))
    else:
        tensor.fill_(int.from_bytes(b"\x7f" * tensor.element_size(), "little"))
