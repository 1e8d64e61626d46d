"""The compiled intranode family (`csrc/intranode`) behind the `NormalBackend` protocol.

Every rank allocates one region (signal area, staging, arena) and maps every peer's region
through CUDA IPC, so the ranks of the group must share one NVLink domain (or one GPU under MPS).
Dispatch outputs are views of the arena (zero copy) while it has room, ordinary tensors otherwise.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.distributed as dist

import deepep_megatron.limits as limits
from deepep_megatron.backends import extension
from deepep_megatron.backends.extension import fill_args
from deepep_megatron.backends.protocols import (
    BufferSizes,
    CombineRequest,
    CombineResult,
    DispatchLayout,
    DispatchRequest,
    DispatchResult,
    LayoutRequest,
    Topology,
)
from deepep_megatron.handle import DispatchHandle

ARENA_ENV = "DEEPEP_MEGATRON_ARENA_BYTES"  # zero-copy arena size (default: 2 * num_nvl_bytes)


def unavailable_reason(topology: Topology, sizes: BufferSizes) -> str | None:
    """Why the intranode kernels cannot serve this group, or None if they can."""
    if extension.module is None:
        return extension.unavailable_reason
    if not torch.cuda.is_available():
        return "CUDA is not available"
    if topology.num_ranks > limits.MAX_RANKS_PER_NODE:
        return (
            f"intranode kernels take at most {limits.MAX_RANKS_PER_NODE} ranks, "
            f"the group has {topology.num_ranks}"
        )
    if sizes.num_nvl_bytes <= 0:
        return "num_nvl_bytes is 0"
    return None


def create(group: dist.ProcessGroup, topology: Topology, sizes: BufferSizes) -> IntranodeBackend:
    return IntranodeBackend(group, sizes.num_nvl_bytes, sizes.num_arena_bytes)


class IntranodeBackend:
    """The compiled kernels for one intranode group. Collective: every rank creates it together."""

    name = "intranode"

    def __init__(self, group: dist.ProcessGroup, num_nvl_bytes: int, num_arena_bytes: int | None = None):
        self.group = group
        self.rank = dist.get_rank(group)
        self.num_ranks = dist.get_world_size(group)
        # Two worst-case dispatch outputs can be held zero-copy at once (e.g. one layer's output
        # while the next dispatch lands); past that, outputs are copied out of staging.
        if num_arena_bytes is None:
            num_arena_bytes = int(os.environ.get(ARENA_ENV, str(2 * num_nvl_bytes)))
        self.runtime = extension.module.IntranodeRuntime(
            self.rank, self.num_ranks, num_nvl_bytes, num_arena_bytes, limits.wait_timeout_seconds()
        )
        handles: list = [None] * self.num_ranks
        dist.all_gather_object(handles, self.runtime.ipc_handle(), group=group)
        self.runtime.open_peers(handles)
        self.num_copied_out = 0
        dist.barrier(group=group)

    def destroy(self, collective: bool) -> None:
        """Unmap the peers and release the region (it lives on while arena tensors view it).
        `collective`: synchronize and wait for every rank first, so that no peer still reads this
        rank's region (Buffer.destroy); garbage collection cannot wait for peers."""
        if collective:
            torch.cuda.synchronize()
            dist.barrier(group=self.group)
        self.runtime.destroy()

    def get_dispatch_layout(self, request: LayoutRequest) -> DispatchLayout:
        num_tokens_per_rank, num_tokens_per_expert, is_token_in_rank = self.runtime.layout(
            request.topk_idx, request.num_experts
        )
        return DispatchLayout(num_tokens_per_rank, None, num_tokens_per_expert, is_token_in_rank)

    def dispatch(self, request: DispatchRequest) -> DispatchResult:
        if request.is_cached:
            return self._dispatch_cached(request)
        outputs = self.runtime.dispatch_fresh(
            fill_args(
                extension.module.FreshDispatchArgs,
                x=request.x,
                scales=request.scales,
                topk_idx=request.topk_idx,
                topk_weights=request.topk_weights,
                is_token_in_rank=request.is_token_in_rank,
                num_tokens_per_expert=request.num_tokens_per_expert,
                num_worst_tokens=request.num_worst_tokens,
                expert_alignment=request.expert_alignment,
                num_sms=request.num_sms,
            )
        )
        self._note_copy_out(outputs)
        handle = DispatchHandle(
            backend=self,
            num_tokens=request.x.size(0),
            hidden=request.x.size(1),
            num_recv_rows=outputs.recv_x.size(0),
            num_recv_tokens=outputs.num_recv_tokens,
            is_token_in_rank=request.is_token_in_rank,
            num_tokens_matrix=outputs.count_matrix,
            send_slot=outputs.send_slot,
            recv_src_idx=outputs.recv_src_idx,
            num_recv_tokens_per_expert_list=list(outputs.num_recv_tokens_per_expert),
            backend_state=request.num_worst_tokens,
        )
        return DispatchResult(
            outputs.recv_x, outputs.recv_scales, outputs.recv_topk_idx, outputs.recv_topk_weights, handle
        )

    def _dispatch_cached(self, request: DispatchRequest) -> DispatchResult:
        handle = request.handle
        outputs = self.runtime.dispatch_cached(
            fill_args(
                extension.module.CachedDispatchArgs,
                x=request.x,
                scales=request.scales,
                count_matrix=handle.num_tokens_matrix,
                send_slot=handle.send_slot,
                num_recv_rows=handle.num_recv_rows,
                num_worst_tokens=handle.backend_state,
                num_sms=request.num_sms,
            )
        )
        self._note_copy_out(outputs)
        return DispatchResult(outputs.recv_x, outputs.recv_scales, None, None, handle)

    def _note_copy_out(self, outputs) -> None:
        """Count (and warn once about) dispatches that did not fit the zero-copy arena."""
        if outputs.zero_copy:
            return
        self.num_copied_out += 1
        if self.num_copied_out == 1:
            warnings.warn(
                f"deepep_megatron: a dispatch output did not fit the zero-copy arena "
                f"({self.runtime.arena_bytes_in_use} bytes held by live outputs) and was copied out of "
                "staging, which costs a second pass; raise Buffer(num_arena_bytes=...) or free outputs "
                "sooner",
                stacklevel=5,
            )

    def combine(self, request: CombineRequest) -> CombineResult:
        biases = request.biases
        handle = request.handle
        outputs = self.runtime.combine(
            fill_args(
                extension.module.CombineArgs,
                x=request.x,
                topk_weights=request.topk_weights,
                bias0=biases[0] if len(biases) > 0 else None,
                bias1=biases[1] if len(biases) > 1 else None,
                send_slot=handle.send_slot,
                count_matrix=handle.num_tokens_matrix,
                num_tokens=handle.num_tokens,
                num_sms=request.num_sms,
            )
        )
        return CombineResult(outputs.combined_x, outputs.combined_weights)
