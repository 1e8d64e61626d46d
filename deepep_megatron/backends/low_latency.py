"""The compiled low-latency family (`csrc/low_latency`, over NVSHMEM) behind the
`LowLatencyBackend` protocol.

Every rank holds one symmetric block (`backends/nvshmem.py`) with two banks that dispatch and
combine calls use in turn (a combine uses its dispatch's bank), so two calls of each kind can be
in flight without a barrier. Peers in this rank's node (`num_ranks_per_node` consecutive ranks)
are written through their mappings with loads and stores; peers in other nodes with NVSHMEM
put-with-signal. Outputs, packing and handle are those of the portable backend, bit for bit.

Hook mode: the call launches the send phase and returns; the hook launches the receive phase.
Between the two no kernel is resident. Nothing synchronises with the host, so calls can be
captured in CUDA graphs. Every device-side wait is bounded by `DEEPEP_MEGATRON_TIMEOUT_S`; a
timeout is raised as `TimeoutError` (naming the waiting rank, the peer and the phase) by the next
call of the buffer, and the buffer stays failed.

`dispatch_wait_recv_cost_stats` / `combine_wait_recv_cost_stats` (`[R]` int64) are incremented, per
source rank, by the nanoseconds (GPU global timer) from the start of the receive phase until that
source's data had all arrived.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

import deepep_megatron.limits as limits
from deepep_megatron.backends import nvshmem
from deepep_megatron.backends.protocols import (
    BackendUnavailable,
    BufferSizes,
    LowLatencyCombineRequest,
    LowLatencyCombineResult,
    LowLatencyDispatchRequest,
    LowLatencyDispatchResult,
    Topology,
)
from deepep_megatron.handle import LowLatencyHandle

POISON_ENV = "DEEPEP_MEGATRON_POISON_HOOK_OUTPUTS"  # "1": fill hook-mode outputs with NaN until the hook


def unavailable_reason(topology: Topology, sizes: BufferSizes) -> str | None:
    """Why the low-latency kernels cannot serve this buffer, or None if they can."""
    reason = nvshmem.unavailable_reason(topology.ranks_per_gpu)
    if reason is not None:
        return reason
    if not sizes.low_latency_mode:
        return "low_latency_mode is False"
    if sizes.num_rdma_bytes <= 0:
        return "num_rdma_bytes is 0"
    return None


def create(group: dist.ProcessGroup, topology: Topology, sizes: BufferSizes) -> LowLatencyKernelBackend:
    return LowLatencyKernelBackend(group, topology, sizes.num_rdma_bytes)


class _DispatchState:
    """What a handle of this backend keeps: the dispatch call (its outputs and receive), each
    packed row's route back (`[E_local, R * T]` int32, source * 16 + top-k slot) and the top-k
    shape the combine must match."""

    __slots__ = ("call", "recv_route", "topk_shape")

    def __init__(self, call, topk_shape):
        self.call = call
        self.recv_route = call.recv_route
        self.topk_shape = topk_shape


class LowLatencyKernelBackend:
    """`LowLatencyBackend` on the compiled kernels. Collective: every rank creates it together."""

    name = "low_latency"

    def __init__(self, group: dist.ProcessGroup, topology: Topology, num_rdma_bytes: int):
        self.group = group
        self.rank = dist.get_rank(group)
        self.num_ranks = dist.get_world_size(group)
        self.num_ranks_per_node = topology.num_ranks_per_node
        try:
            nvshmem.join(group, num_rdma_bytes, topology.ranks_per_gpu)
        except RuntimeError as error:  # the process belongs to another group's NVSHMEM job
            raise BackendUnavailable(str(error)) from error
        self.block = nvshmem.acquire(group, num_rdma_bytes)
        node = self.rank // self.num_ranks_per_node
        # Same node: loads and stores through the mapping; other nodes (or no mapping): puts.
        peer_bases = [
            self.block.peer_address(peer) if peer // self.num_ranks_per_node == node else 0
            for peer in range(self.num_ranks)
        ]
        peer_bases[self.rank] = self.block.address  # this rank's own block, as allocated
        self.runtime = nvshmem.module.LowLatencyRuntime(
            self.rank,
            self.num_ranks,
            self.block.address,
            self.block.num_bytes,
            peer_bases,
            limits.wait_timeout_seconds(),
        )
        self.num_put_peers = sum(base == 0 for base in peer_bases)
        self.poison_hook_outputs = os.environ.get(POISON_ENV) == "1"
        self._bank = 0
        dist.barrier(group=group)  # every rank's signals are zeroed before anyone sends

    def destroy(self, collective: bool) -> None:
        """See `nvshmem.release_runtime`."""
        if self.runtime is None:
            return
        runtime, self.runtime = self.runtime, None
        nvshmem.release_runtime(runtime, self.block, self.group, collective)

    def _live_runtime(self):
        if self.runtime is None:
            raise RuntimeError("the Buffer that made this low-latency handle was destroyed")
        return self.runtime

    # ------------------------------------------------------------------ dispatch
    def dispatch(self, request: LowLatencyDispatchRequest) -> LowLatencyDispatchResult:
        runtime = self._live_runtime()
        for name in ("cumulative_local_expert_recv_stats", "dispatch_wait_recv_cost_stats"):
            stats = getattr(request, name)
            if stats is not None and not stats.is_contiguous():
                raise ValueError(f"{name} must be contiguous")
        bank, self._bank = self._bank, self._bank ^ 1
        call = runtime.dispatch(
            request.x,
            request.topk_idx,
            request.num_max_dispatch_tokens_per_rank,
            request.num_experts,
            request.use_fp8,
            request.round_scale,
            request.use_ue8m0,
            bank,
            request.num_sms,
            not request.return_recv_hook,
            request.cumulative_local_expert_recv_stats,
            request.dispatch_wait_recv_cost_stats,
        )
        handle = LowLatencyHandle(
            recv_src_info=call.recv_src_info,
            recv_layout_range=call.recv_layout_range,
            recv_count=call.recv_count,
            num_max_dispatch_tokens_per_rank=request.num_max_dispatch_tokens_per_rank,
            hidden=request.x.size(1),
            num_experts=request.num_experts,
            buffer_index=bank,
            backend=self,
            backend_state=_DispatchState(call, tuple(request.topk_idx.shape)),
        )
        receive = None
        if request.return_recv_hook:
            if self.poison_hook_outputs:
                _poison(call.recv_x)
                if call.recv_scales is not None:
                    _poison(call.recv_scales)

            def receive() -> None:
                runtime.dispatch_receive(call)

        return LowLatencyDispatchResult(call.recv_x, call.recv_scales, call.recv_count, handle, receive)

    # ------------------------------------------------------------------ combine
    def combine(self, request: LowLatencyCombineRequest) -> LowLatencyCombineResult:
        runtime = self._live_runtime()
        handle = request.handle
        state: _DispatchState = handle.backend_state
        if tuple(request.topk_idx.shape) != state.topk_shape:
            raise ValueError(
                f"low_latency_combine: topk_idx has shape {tuple(request.topk_idx.shape)} (tokens, top-k), "
                f"the dispatch had {state.topk_shape}"
            )
        if not state.call.received:
            raise RuntimeError(
                "low_latency_combine: the dispatch has not received yet; call its hook() first"
            )
        stats = request.combine_wait_recv_cost_stats
        if stats is not None and not stats.is_contiguous():
            raise ValueError("combine_wait_recv_cost_stats must be contiguous")
        call = runtime.combine(
            request.x,
            request.topk_idx,
            request.topk_weights,
            handle.recv_count,
            handle.recv_src_info,
            state.recv_route,
            handle.num_max_dispatch_tokens_per_rank,
            handle.num_experts,
            handle.buffer_index,
            request.zero_copy,
            request.out,
            request.num_sms,
            not request.return_recv_hook,
            stats,
        )
        receive = None
        if request.return_recv_hook:

            def receive() -> None:
                runtime.combine_receive(call)

        return LowLatencyCombineResult(call.combined_x, receive)

    # ------------------------------------------------------------------ buffers
    def next_combine_buffer(self, handle: LowLatencyHandle) -> torch.Tensor:
        """The zero-copy buffer of the handle's bank: `[E_local, R * T, H]` bf16, a view of the
        symmetric block (valid while the Buffer lives)."""
        return self._live_runtime().combine_buffer(
            handle.buffer_index, handle.num_max_dispatch_tokens_per_rank, handle.hidden, handle.num_experts
        )

    def clean(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> None:
        """Collective: zero both banks' signals, counters and zero-copy buffers on every rank."""
        runtime = self._live_runtime()
        torch.cuda.synchronize()
        runtime.clean(num_max_dispatch_tokens_per_rank, hidden, num_experts)
        torch.cuda.synchronize()
        dist.barrier(group=self.group)


def _poison(tensor: torch.Tensor) -> None:
    """NaN for floats (e4m3 included), 0x7F bytes for packed UE8M0 scales (as the portable
    backend poisons)."""
    if tensor.dtype == torch.float8_e4m3fn:
        tensor.view(torch.uint8).fill_(0x7F)  # e4m3fn NaN (recv_x is contiguous)
    elif tensor.dtype.is_floating_point:
        tensor.fill_(float("nan"))
    else:
        tensor.fill_(int.from_bytes(b"\x7f" * tensor.element_size(), "little"))
