"""Typed handles returned by dispatch calls. Code above `Buffer` treats them as opaque.

Programs written for DeepEP sometimes index its handles, which are tuples. Ours index the same
way (`handle[i]`, `len`, unpacking), position for position, where our design has the same
quantity, and give None where DeepEP's ring-buffer design keeps something ours has no use for.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(eq=False)
class DispatchHandle:
    """Everything `combine` and a cached `dispatch` need to repeat or invert one normal dispatch.

    Attributes:
        backend: the backend that made it (a `NormalBackend`; `backend.name` says which); a
            handle only works with that backend, hence only with the Buffer that made it.
        num_tokens: N, tokens this rank dispatched.
        hidden: H of the dispatched payload.
        num_recv_rows: rows of the received tensors (exact count, or `num_worst_tokens`).
        num_recv_tokens: rows actually received, or -1 when unknown on the host
            (`num_worst_tokens` mode skips the host sync).
        is_token_in_rank: `[N, R]` bool, which ranks each token went to.
        num_tokens_matrix: `[R, R]` int32 on the tensors' device, `[src, dst]` = tokens `src`
            sent to `dst`. Received rows from `src` start at `num_tokens_matrix[:src, rank].sum()`.
        send_slot: `[N, R]` int32, position of token `t` among the rows this rank sent to rank
            `r`, or -1 where it was not sent.
        recv_src_idx: `[num_recv_rows]` int32, the source-rank token index of each received row.
        num_recv_tokens_per_expert_list: rows per local expert, rounded up to the alignment
            (empty in `num_worst_tokens` mode).
        backend_state: whatever else the backend keeps (split sizes, region offsets).
    """

    backend: Any
    num_tokens: int
    hidden: int
    num_recv_rows: int
    num_recv_tokens: int
    is_token_in_rank: torch.Tensor
    num_tokens_matrix: torch.Tensor
    send_slot: torch.Tensor
    recv_src_idx: torch.Tensor
    num_recv_tokens_per_expert_list: list[int] = field(default_factory=list)
    backend_state: Any = None

    def as_deepep_tuple(self) -> tuple:
        """DeepEP's intranode handle, position for position:
        0 `rank_prefix_matrix` `[R, R]` int32 (`[s, d]`: tokens ranks 0..s send to rank d),
        1 `channel_prefix_matrix` and 2 `recv_channel_prefix_matrix`: None (no channels here),
        3 `recv_src_idx` `[M]` int32, 4 `is_token_in_rank` `[N, R]` bool,
        5 `send_head` `[N, R]` int32: the token's position among the rows sent to each rank, -1
        where it was not sent (DeepEP keeps the ring slot there)."""
        return (
            self.num_tokens_matrix.cumsum(0, dtype=torch.int32),
            None,
            None,
            self.recv_src_idx,
            self.is_token_in_rank,
            self.send_slot,
        )

    def __getitem__(self, index):
        return self.as_deepep_tuple()[index]

    def __len__(self) -> int:
        return 6

    def __iter__(self):
        return iter(self.as_deepep_tuple())


@dataclass(eq=False)
class LowLatencyHandle:
    """Layout of one low-latency dispatch, needed by `low_latency_combine`.

    Attributes:
        recv_src_info: `[E_local, R * max_tokens]` int32, the source token index of each packed
            row (-1 past `recv_count`).
        recv_layout_range: `[E_local, R]` int64, for each (local expert, source rank) the packed
            pair `(begin << 32) | count` of its rows in the expert's slots.
        recv_count: `[E_local]` int32, rows received per local expert.
        num_max_dispatch_tokens_per_rank, hidden, num_experts: the call's sizes.
        buffer_index: which of the two low-latency banks the call used (double buffering).
        backend: the `LowLatencyBackend` that made it.
        backend_state: whatever else the backend keeps.
    """

    recv_src_info: torch.Tensor
    recv_layout_range: torch.Tensor
    recv_count: torch.Tensor
    num_max_dispatch_tokens_per_rank: int
    hidden: int
    num_experts: int
    buffer_index: int = 0
    backend: Any = None
    backend_state: Any = None

    def as_deepep_tuple(self) -> tuple:
        """DeepEP's low-latency handle, position for position: `(src_info [E_local, R * T] int32,
        layout_range [E_local, R] int64, num_max_dispatch_tokens_per_rank, hidden, num_experts)`."""
        return (
            self.recv_src_info,
            self.recv_layout_range,
            self.num_max_dispatch_tokens_per_rank,
            self.hidden,
            self.num_experts,
        )

    def __getitem__(self, index):
        return self.as_deepep_tuple()[index]

    def __len__(self) -> int:
        return 5

    def __iter__(self):
        return iter(self.as_deepep_tuple())
