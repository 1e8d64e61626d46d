"""The seam between `Buffer` and the backends: one protocol per kind of call, with typed requests
and results.

`Buffer` checks every input, picks the backend through `backends.selection.BackendRouter`, puts
the call on the right stream, and hands the backend one request object. Backends never see bad
input and never touch streams or events: they launch on the current stream.

Two protocols, one per mode:
- `NormalBackend`: `get_dispatch_layout`, `dispatch`, `combine` (training and prefill). Served by
  the portable backend, the intranode kernels and the internode kernels.
- `LowLatencyBackend`: `dispatch`, `combine` into per-expert slots (decode), with the receive hook
  and the double buffer, `next_combine_buffer`, `clean`. Served by the portable backend and the
  low-latency kernels.

`BUFFER_CALLS` maps every communication call of `Buffer` to the protocol method that serves it; a
test keeps the two in step, so a new call cannot be added to one side only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from deepep_megatron.handle import DispatchHandle, LowLatencyHandle

# ------------------------------------------------------------------------ what a family is given


@dataclass(frozen=True)
class Topology:
    """The group as the kernels see it: `num_ranks` ranks, nodes of `num_ranks_per_node`
    consecutive ranks (one node may be emulated on one host), `ranks_per_gpu` ranks sharing this
    rank's GPU (MPS), `num_sms_per_gpu` SMs this rank sees (0 when unknown), and whether the
    sharing ranks compete for those SMs (`sms_shared`) or each sees its own share."""

    num_ranks: int
    num_ranks_per_node: int
    ranks_per_gpu: int = 1
    num_sms_per_gpu: int = 0
    sms_shared: bool = True

    @property
    def max_sms_per_rank(self) -> int:
        """The most SMs a rank's kernel may take so that every sharing rank's blocks fit on the
        GPU together (0: no limit known)."""
        if self.num_sms_per_gpu <= 0:
            return 0
        return self.num_sms_per_gpu // self.ranks_per_gpu if self.sms_shared else self.num_sms_per_gpu

    @property
    def num_nodes(self) -> int:
        return self.num_ranks // self.num_ranks_per_node

    @property
    def spans_nodes(self) -> bool:
        return self.num_nodes > 1


class BackendUnavailable(RuntimeError):
    """Raised by a family's `create` when it finds, while setting up collectively, that it cannot
    serve (the router then routes to the portable backend with this reason). Every rank must reach
    the same conclusion."""


@dataclass(frozen=True)
class BufferSizes:
    """What the user sized the buffer for (`Buffer`'s constructor arguments)."""

    num_nvl_bytes: int
    num_rdma_bytes: int
    low_latency_mode: bool
    num_arena_bytes: int | None = None


# ---------------------------------------------------------------------------------- normal mode


@dataclass(frozen=True)
class LayoutRequest:
    """`topk_idx`: `[N, K]` int64 expert ids, -1 for an empty slot; `num_experts`: E."""

    topk_idx: torch.Tensor
    num_experts: int


@dataclass
class DispatchLayout:
    """Output of `get_dispatch_layout`.

    num_tokens_per_rank: `[R]` int32, tokens with at least one expert on each rank.
    num_tokens_per_rdma_rank: `[R / ranks_per_node]` int32 tokens per destination node, or None
        within one node.
    num_tokens_per_expert: `[E]` int32, (token, expert) selections per expert.
    is_token_in_rank: `[N, R]` bool.
    """

    num_tokens_per_rank: torch.Tensor
    num_tokens_per_rdma_rank: torch.Tensor | None
    num_tokens_per_expert: torch.Tensor
    is_token_in_rank: torch.Tensor


@dataclass
class DispatchRequest:
    """A checked dispatch call.

    `x`: `[N, H]` bf16 or float8_e4m3fn payload; `scales`: `[N, H/128]` float32 for FP8, else
    None. A fresh dispatch sets the layout fields (and optionally top-k) and leaves `handle` None;
    a cached dispatch sets only `handle` (same layout, no top-k, no host sync).
    """

    x: torch.Tensor
    scales: torch.Tensor | None
    handle: DispatchHandle | None
    num_tokens_per_rank: torch.Tensor | None = None
    num_tokens_per_rdma_rank: torch.Tensor | None = None
    is_token_in_rank: torch.Tensor | None = None
    num_tokens_per_expert: torch.Tensor | None = None
    topk_idx: torch.Tensor | None = None
    topk_weights: torch.Tensor | None = None
    expert_alignment: int = 1
    num_worst_tokens: int = 0
    num_sms: int = 20

    @property
    def is_cached(self) -> bool:
        return self.handle is not None


@dataclass
class DispatchResult:
    """`recv_x`: `[M, H]` payload dtype; `recv_scales`: `[M, H/128]` float32 (FP8 only);
    `recv_topk_idx`: `[M, K]` int64 local expert ids (-1 elsewhere); `recv_topk_weights`: `[M, K]`
    float32 (0 where the id is -1). The top-k outputs are None for a cached dispatch."""

    recv_x: torch.Tensor
    recv_scales: torch.Tensor | None
    recv_topk_idx: torch.Tensor | None
    recv_topk_weights: torch.Tensor | None
    handle: DispatchHandle


@dataclass
class CombineRequest:
    """A checked combine call.

    `x`: `[handle.num_recv_rows, H]` bf16, rows in the order dispatch returned them;
    `topk_weights`: `[handle.num_recv_rows, K]` float32 or None; `biases`: up to two `[N, H]` bf16.
    """

    x: torch.Tensor
    handle: DispatchHandle
    topk_weights: torch.Tensor | None
    biases: tuple[torch.Tensor, ...]
    num_sms: int = 20


@dataclass
class CombineResult:
    """`combined_x`: `[N, H]` bf16; `combined_topk_weights`: `[N, K]` float32 or None."""

    combined_x: torch.Tensor
    combined_topk_weights: torch.Tensor | None


@runtime_checkable
class NormalBackend(Protocol):
    """High-throughput dispatch and combine. Every method is collective over the group."""

    name: str

    def get_dispatch_layout(self, request: LayoutRequest) -> DispatchLayout: ...

    def dispatch(self, request: DispatchRequest) -> DispatchResult: ...

    def combine(self, request: CombineRequest) -> CombineResult: ...

    def destroy(self, collective: bool) -> None: ...


# ----------------------------------------------------------------------------- low-latency mode


@dataclass
class LowLatencyDispatchRequest:
    """A checked low-latency dispatch.

    `x`: `[N, H]` bf16 with N <= `num_max_dispatch_tokens_per_rank`; `topk_idx`: `[N, K]` int64
    (-1: no expert). FP8: e4m3 with one float32 scale per 128 channels (power of two with
    `round_scale`, packed UE8M0 int32 with `use_ue8m0`). `cumulative_local_expert_recv_stats`:
    `[E_local]` int32, incremented by the rows each local expert received, once they have been
    received. `dispatch_wait_recv_cost_stats`: `[R]` int64, incremented per source rank by the
    nanoseconds spent waiting for it (0 where the backend cannot tell).
    """

    x: torch.Tensor
    topk_idx: torch.Tensor
    num_max_dispatch_tokens_per_rank: int
    num_experts: int
    use_fp8: bool = True
    round_scale: bool = False
    use_ue8m0: bool = False
    return_recv_hook: bool = False
    cumulative_local_expert_recv_stats: torch.Tensor | None = None
    dispatch_wait_recv_cost_stats: torch.Tensor | None = None
    num_sms: int = 20


@dataclass
class LowLatencyDispatchResult:
    """`recv_x`: `[E_local, R * T, H]` (bf16, or e4m3 with FP8); `recv_scales`:
    `[E_local, R * T, H/128]` float32 (or `[E_local, R * T, ceil(H/512)]` int32 with UE8M0),
    column-major (token dimension contiguous), None for BF16; `recv_count`: `[E_local]` int32.

    `receive`: with `return_recv_hook`, the work the hook does (a callable run on the stream the
    hook is called on); None when the call already received."""

    recv_x: torch.Tensor
    recv_scales: torch.Tensor | None
    recv_count: torch.Tensor
    handle: LowLatencyHandle
    receive: Callable[[], None] | None


@dataclass
class LowLatencyCombineRequest:
    """A checked low-latency combine.

    `x`: `[E_local, R * T, H]` bf16 in the dispatch's packing (already the buffer of
    `next_combine_buffer` when `zero_copy`); `topk_idx` `[N, K]` int64 and `topk_weights`
    `[N, K]` float32 as dispatched; `out`: optional `[N, H]` bf16 destination.
    `combine_wait_recv_cost_stats`: `[R]` int64, as for dispatch.
    """

    x: torch.Tensor
    topk_idx: torch.Tensor
    topk_weights: torch.Tensor
    handle: LowLatencyHandle
    zero_copy: bool = False
    out: torch.Tensor | None = None
    return_recv_hook: bool = False
    combine_wait_recv_cost_stats: torch.Tensor | None = None
    num_sms: int = 20


@dataclass
class LowLatencyCombineResult:
    """`combined_x`: `[N, H]` bf16, the weighted sum over each token's top-k slots (fp32
    accumulation); `receive` as for dispatch."""

    combined_x: torch.Tensor
    receive: Callable[[], None] | None


@runtime_checkable
class LowLatencyBackend(Protocol):
    """Low-latency dispatch and combine. The backend owns the double buffer (two banks used in
    turn, so consecutive calls need no barrier) and the zero-copy combine buffers."""

    name: str

    def dispatch(self, request: LowLatencyDispatchRequest) -> LowLatencyDispatchResult: ...

    def combine(self, request: LowLatencyCombineRequest) -> LowLatencyCombineResult: ...

    def next_combine_buffer(self, handle: LowLatencyHandle) -> torch.Tensor:
        """`[E_local, R * T, H]` bf16 that a `zero_copy` combine of `handle` reads its input from."""
        ...

    def clean(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> None:
        """Reset both banks (needed before reusing the buffer with other sizes)."""
        ...

    def destroy(self, collective: bool) -> None: ...


# `Buffer` method -> (protocol, method). Kept in step with `Buffer` by tests/test_architecture.py.
BUFFER_CALLS: dict[str, tuple[type, str]] = {
    "get_dispatch_layout": (NormalBackend, "get_dispatch_layout"),
    "dispatch": (NormalBackend, "dispatch"),
    "combine": (NormalBackend, "combine"),
    "low_latency_dispatch": (LowLatencyBackend, "dispatch"),
    "low_latency_combine": (LowLatencyBackend, "combine"),
    "get_next_low_latency_combine_buffer": (LowLatencyBackend, "next_combine_buffer"),
    "clean_low_latency_buffer": (LowLatencyBackend, "clean"),
}
