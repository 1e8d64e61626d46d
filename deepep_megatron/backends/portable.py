"""Portable backend for normal dispatch and combine, on torch.distributed: gloo on the CPU, NCCL
(or gloo staged through the host) on the GPU. Plain, vectorised torch code with the same results
and row order as the kernels; the reference in tests and the fallback wherever they cannot run.

Each exchange is counts first, then one all-to-all per tensor (`all_to_all.RowExchange`). There
are no per-token Python loops.

Summation order, shared with the compiled combine so results are bit-identical: for each token,
fp32 accumulation of the contributing ranks in ascending rank order, then `bias[0]`, then
`bias[1]`, then one rounding to bf16.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from deepep_megatron.alignment import align_up
from deepep_megatron.backends.all_to_all import RowExchange
from deepep_megatron.backends.protocols import (
    CombineRequest,
    CombineResult,
    DispatchLayout,
    DispatchRequest,
    DispatchResult,
    LayoutRequest,
)
from deepep_megatron.handle import DispatchHandle


class PortableBackend:
    """`NormalBackend` on torch.distributed for one process group."""

    name = "portable"

    def __init__(self, group: dist.ProcessGroup, num_ranks_per_node: int):
        self.group = group
        self.rank = dist.get_rank(group)
        self.num_ranks = dist.get_world_size(group)
        self.num_ranks_per_node = num_ranks_per_node
        self.exchange = RowExchange(group)

    def destroy(self, collective: bool) -> None:
        """Nothing to release: the portable backend holds no memory between calls."""

    # ------------------------------------------------------------------ layout
    def get_dispatch_layout(self, request: LayoutRequest) -> DispatchLayout:
        return dispatch_layout(request.topk_idx, request.num_experts, self.num_ranks, self.num_ranks_per_node)

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
        recv_meta = self.exchange.counts(torch.cat([send_counts_t.unsqueeze(1), expert_counts], dim=1))
        recv_counts_t = recv_meta[:, 0]
        num_tokens_matrix = self._gather_count_matrix(send_counts_t)
        send_counts, recv_counts = send_counts_t.tolist(), recv_counts_t.tolist()
        num_recv = sum(recv_counts)

        recv_x = self.exchange.rows(x.index_select(0, token_of_row), send_counts, recv_counts)
        recv_scales = None
        if request.scales is not None:
            recv_scales = self.exchange.rows(
                request.scales.index_select(0, token_of_row), send_counts, recv_counts
            )
        recv_src_idx = self.exchange.rows(token_of_row.int().unsqueeze(1), send_counts, recv_counts).view(-1)

        recv_topk_idx = recv_topk_weights = None
        if request.topk_idx is not None:
            global_idx = self.exchange.rows(
                request.topk_idx.index_select(0, token_of_row), send_counts, recv_counts
            )
            local_idx = global_idx - rank * experts_per_rank
            is_local = (global_idx >= 0) & (local_idx >= 0) & (local_idx < experts_per_rank)
            recv_topk_idx = torch.where(is_local, local_idx, torch.full_like(local_idx, -1))
            if request.topk_weights is not None:
                weights = self.exchange.rows(
                    request.topk_weights.index_select(0, token_of_row), send_counts, recv_counts
                )
                recv_topk_weights = torch.where(is_local, weights, torch.zeros_like(weights))

        per_expert = recv_meta[:, 1:].sum(0).tolist()
        num_recv_tokens_per_expert_list = [align_up(c, request.expert_alignment) for c in per_expert]

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
            backend=self,
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
        recv_x = self.exchange.rows(
            request.x.index_select(0, state.token_of_row), state.send_counts, state.recv_counts
        )
        recv_scales = None
        if request.scales is not None:
            recv_scales = self.exchange.rows(
                request.scales.index_select(0, state.token_of_row), state.send_counts, state.recv_counts
            )
        if handle.num_recv_rows > handle.num_recv_tokens:
            recv_x = _pad_rows(recv_x, handle.num_recv_rows, 0)
            recv_scales = _pad_rows(recv_scales, handle.num_recv_rows, 0)
        return DispatchResult(recv_x, recv_scales, None, None, handle)

    # ------------------------------------------------------------------ normal combine
    def combine(self, request: CombineRequest) -> CombineResult:
        handle, topk_weights = request.handle, request.topk_weights
        state: _PortableState = handle.backend_state
        valid_rows = handle.num_recv_tokens
        back_x = self.exchange.rows(request.x[:valid_rows], state.recv_counts, state.send_counts)
        combined = self._reduce_by_rank(back_x.float(), state, (handle.num_tokens, handle.hidden))
        for bias in request.biases:
            combined += bias.float()
        combined_weights = None
        if topk_weights is not None:
            back_w = self.exchange.rows(topk_weights[:valid_rows], state.recv_counts, state.send_counts)
            combined_weights = self._reduce_by_rank(back_w, state, (handle.num_tokens, topk_weights.size(1)))
        return CombineResult(combined.to(torch.bfloat16), combined_weights)

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


def dispatch_layout(
    topk_idx: torch.Tensor, num_experts: int, num_ranks: int, num_ranks_per_node: int
) -> DispatchLayout:
    """`get_dispatch_layout` in plain torch on `topk_idx`'s device (no communication): which
    ranks each token goes to, tokens per rank, per destination node (None within one node) and
    per expert. Shared by the portable backend and the internode family."""
    num_tokens = topk_idx.size(0)
    experts_per_rank = num_experts // num_ranks
    valid = topk_idx >= 0
    token_ids = torch.arange(num_tokens, device=topk_idx.device).unsqueeze(1).expand_as(topk_idx)
    is_token_in_rank = torch.zeros((num_tokens, num_ranks), dtype=torch.bool, device=topk_idx.device)
    is_token_in_rank[token_ids[valid], topk_idx[valid] // experts_per_rank] = True
    num_tokens_per_expert = torch.bincount(topk_idx[valid], minlength=num_experts).int()
    num_tokens_per_rank = is_token_in_rank.sum(0, dtype=torch.int32)
    num_tokens_per_rdma_rank = None
    if num_ranks_per_node < num_ranks:
        per_node = is_token_in_rank.view(num_tokens, num_ranks // num_ranks_per_node, num_ranks_per_node).any(
            -1
        )
        num_tokens_per_rdma_rank = per_node.sum(0, dtype=torch.int32)
    return DispatchLayout(
        num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank
    )


class _PortableState:
    """Split sizes and the send order of one normal dispatch (host lists, device index)."""

    __slots__ = ("token_of_row", "send_counts", "recv_counts")

    def __init__(self, token_of_row: torch.Tensor, send_counts: list[int], recv_counts: list[int]):
        self.token_of_row = token_of_row
        self.send_counts = send_counts
        self.recv_counts = recv_counts


def _pad_rows(tensor: torch.Tensor | None, num_rows: int, value) -> torch.Tensor | None:
    if tensor is None or tensor.size(0) == num_rows:
        return tensor
    padded = tensor.new_full((num_rows, *tensor.shape[1:]), value)
    padded[: tensor.size(0)] = tensor
    return padded
