"""The contract every backend implements. `Buffer` validates inputs, manages streams and events,
then calls one of these methods with checked arguments; backends never see bad input."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from deepep_megatron.handle import DispatchHandle, LowLatencyHandle


@dataclass
class DispatchLayout:
    """Output of `get_dispatch_layout`.

    num_tokens_per_rank: `[R]` int32, tokens with at least one expert on each rank.
    num_tokens_per_rdma_rank: `[R / ranks_per_node]` int32, or None within one node.
    num_tokens_per_expert: `[E]` int32, (token, expert) selections per expert.
    is_token_in_rank: `[N, R]` bool.
    """

    num_tokens_per_rank: torch.Tensor
    num_tokens_per_rdma_rank: torch.Tensor | None
    num_tokens_per_expert: torch.Tensor
    is_token_in_rank: torch.Tensor


@dataclass
class DispatchRequest:
    """A checked dispatch call. `scales` is None for BF16. For a fresh dispatch the layout fields
    and (optionally) top-k are set and `handle` is None; for a cached dispatch only `handle`."""

    x: torch.Tensor
    scales: torch.Tensor | None
    handle: DispatchHandle | None
    num_tokens_per_rank: torch.Tensor | None = None
    is_token_in_rank: torch.Tensor | None = None
    num_tokens_per_expert: torch.Tensor | None = None
    topk_idx: torch.Tensor | None = None
    topk_weights: torch.Tensor | None = None
    expert_alignment: int = 1
    num_worst_tokens: int = 0
    num_sms: int = 20


@dataclass
class DispatchResult:
    """`recv_x`: `[M, H]`; `recv_scales`: `[M, H/128]` float32 (FP8 only); `recv_topk_idx`:
    `[M, K]` int64 local expert ids (-1 elsewhere); `recv_topk_weights`: `[M, K]` float32."""

    recv_x: torch.Tensor
    recv_scales: torch.Tensor | None
    recv_topk_idx: torch.Tensor | None
    recv_topk_weights: torch.Tensor | None
    handle: DispatchHandle


@dataclass
class LowLatencyDispatchResult:
    recv_x: torch.Tensor
    recv_scales: torch.Tensor | None
    recv_count: torch.Tensor
    handle: LowLatencyHandle
    finish: object  # callable that completes the receive (the hook), or None when already done


class Backend(Protocol):
    name: str

    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int) -> DispatchLayout: ...

    def dispatch(self, request: DispatchRequest) -> DispatchResult: ...

    def combine(
        self,
        x: torch.Tensor,
        handle: DispatchHandle,
        topk_weights: torch.Tensor | None,
        biases: tuple[torch.Tensor, ...],
        num_sms: int,
    ) -> tuple[torch.Tensor, torch.Tensor | None]: ...
