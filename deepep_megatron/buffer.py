"""`Buffer`: the DeepEP-compatible entry point for expert-parallel dispatch and combine.

`Buffer` checks every input, owns the communication stream and its events, and hands the work to
a backend: the compiled kernels (`cuda`) where they can serve, otherwise the portable
torch.distributed backend. Both give the same results in the same order.
"""

from __future__ import annotations

import os
import socket
import warnings
from collections.abc import Callable
from contextlib import contextmanager

import torch
import torch.distributed as dist

import deepep_megatron.limits as limits
import deepep_megatron.validation as check
from deepep_megatron.alignment import align_up
from deepep_megatron.backends import low_latency_layout
from deepep_megatron.backends.protocols import (
    BufferSizes,
    CombineRequest,
    DispatchRequest,
    LayoutRequest,
    LowLatencyCombineRequest,
    LowLatencyDispatchRequest,
    Topology,
)
from deepep_megatron.backends.selection import BackendRouter
from deepep_megatron.config import Config, max_tokens_per_rank
from deepep_megatron.event import EventOverlap
from deepep_megatron.handle import DispatchHandle, LowLatencyHandle

BACKEND_ENV = "DEEPEP_MEGATRON_BACKEND"  # "auto" (default), "portable" or "cuda"
MPS_THREAD_PERCENTAGE_ENV = "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"


def default_ranks_per_node(group_size: int) -> int:
    """Ranks per node when the caller does not say: the whole group up to one NVLink domain, as
    DeepEP assumes (nodes of MAX_RANKS_PER_NODE consecutive ranks)."""
    return min(group_size, limits.MAX_RANKS_PER_NODE)


def _check_num_ranks(num_ranks: int) -> None:
    if num_ranks <= 0:
        raise ValueError(f"num_ranks must be positive, got {num_ranks}")


def _probe_topology(group: dist.ProcessGroup, num_ranks: int, num_ranks_per_node: int) -> Topology:
    """The group's topology, with how many of its ranks share this rank's GPU (ranks under MPS on
    one GPU see the same device UUID on the same host) and that GPU's SM count."""
    num_sms = ranks_per_gpu = 0
    gpu_id = None
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(torch.cuda.current_device())
        num_sms = properties.multi_processor_count
        gpu_id = (socket.gethostname(), str(properties.uuid))
    if num_ranks > 1 and gpu_id is not None:
        gpu_ids: list = [None] * num_ranks
        dist.all_gather_object(gpu_ids, gpu_id, group=group)
        ranks_per_gpu = sum(other == gpu_id for other in gpu_ids)
    # With MPS thread percentages set, each rank already sees only its share of the SMs.
    shared_sms = not os.environ.get(MPS_THREAD_PERCENTAGE_ENV)
    return Topology(num_ranks, num_ranks_per_node, max(1, ranks_per_gpu), num_sms, shared_sms)


class Buffer:
    """Communication buffer for one expert-parallel process group (a drop-in for
    `deep_ep.Buffer`).

    Args:
        group: the expert-parallel process group.
        num_nvl_bytes: bytes of the intranode receive region per rank (normal kernels). Size it
            with `Config.get_nvl_buffer_size_hint`; dispatching more tokens per rank than it was
            sized for raises `ValueError`.
        num_rdma_bytes: bytes for the low-latency and internode buffers (NVSHMEM). Size it with
            `Buffer.get_low_latency_rdma_size_hint` in low-latency mode, and for groups spanning
            nodes with `deepep_megatron.backends.internode.rdma_size_hint` (or
            `Config.get_rdma_buffer_size_hint` for nodes of 8); a dispatch whose counts need more
            raises `ValueError` on every rank before any kernel runs.
        low_latency_mode: enable `low_latency_dispatch` / `low_latency_combine`.
        num_qps_per_rank, allow_nvlink_for_low_latency_mode, allow_mnnvl, use_fabric,
        enable_shrink, comm: accepted for compatibility with DeepEP; unused.
        explicitly_destroy: if True, resources are released only by `destroy()` (collective).
            Otherwise they go with the Buffer object. Either way, every rank keeps its Buffer
            until all ranks' last calls have ended: peers write into this rank's registered
            memory, and a region freed under a running kernel faults the GPU context. A Buffer
            whose call timed out keeps that memory until the process ends, for the same reason.
        backend: "auto" (compiled kernels where they can serve), "portable" or "cuda". Defaults
            to the `DEEPEP_MEGATRON_BACKEND` environment variable, else "auto".
        num_ranks_per_node: ranks that share one NVLink domain (default: the whole group, up to
            8); a node is that many consecutive ranks, so one host can emulate several. Groups
            larger than a node report `num_tokens_per_rdma_rank` and are served by the internode
            kernels (NVSHMEM between nodes, NVLink inside one) where they are built.
        num_arena_bytes: compiled backend only: bytes of registered memory that dispatch outputs
            are returned in (zero copy: senders write each row at its final place). Default
            `2 * num_nvl_bytes` (or `DEEPEP_MEGATRON_ARENA_BYTES`). When live outputs fill it,
            further dispatches land in the staging area and are copied out (slower, still correct).
    """

    num_sms: int = 20

    def __init__(
        self,
        group: dist.ProcessGroup,
        num_nvl_bytes: int = 0,
        num_rdma_bytes: int = 0,
        low_latency_mode: bool = False,
        num_qps_per_rank: int = 24,
        allow_nvlink_for_low_latency_mode: bool = True,
        allow_mnnvl: bool = False,
        use_fabric: bool = False,
        explicitly_destroy: bool = False,
        enable_shrink: bool = False,
        comm=None,
        *,
        backend: str | None = None,
        num_ranks_per_node: int | None = None,
        num_arena_bytes: int | None = None,
    ):
        if group is None:
            group = dist.group.WORLD
        self.group = group
        self.rank = dist.get_rank(group)
        self.group_size = dist.get_world_size(group)
        self.num_nvl_bytes = int(num_nvl_bytes)
        self.num_rdma_bytes = int(num_rdma_bytes)
        self.low_latency_mode = low_latency_mode
        self.explicitly_destroy = explicitly_destroy
        self.num_ranks_per_node = num_ranks_per_node or default_ranks_per_node(self.group_size)
        if self.num_nvl_bytes < 0 or self.num_rdma_bytes < 0:
            raise ValueError("num_nvl_bytes and num_rdma_bytes must be non-negative")
        if self.group_size % self.num_ranks_per_node != 0:
            raise ValueError(
                f"group size {self.group_size} is not a multiple of "
                f"num_ranks_per_node={self.num_ranks_per_node}"
            )
        self.num_arena_bytes = num_arena_bytes
        self.backend_preference = (backend or os.environ.get(BACKEND_ENV, "auto")).lower()

        self.topology = _probe_topology(group, self.group_size, self.num_ranks_per_node)
        sizes = BufferSizes(self.num_nvl_bytes, self.num_rdma_bytes, low_latency_mode, num_arena_bytes)
        self._router = BackendRouter(group, self.topology, sizes, self.backend_preference)
        self._comm_stream = torch.cuda.Stream() if torch.cuda.is_available() else None
        self._warned_sm_clamp = False
        self._local_buffers: dict[str, torch.Tensor] = {}
        self._destroyed = False

    @property
    def backend_name(self) -> str:
        """What serves CUDA tensors in normal mode: a compiled family ("intranode", ...) or
        "portable"."""
        return self._router.normal_route.family or "portable"

    @property
    def backend_summary(self) -> str:
        """One line: which backend serves CUDA tensors in each mode and, where the kernels do not,
        why (what the benchmark and the Megatron banner print)."""
        return self._router.describe()

    def _kernel_num_sms(self, config: Config | None, default: Callable[[int], Config]) -> int:
        """The SM count a kernel launches with: the config's, clamped where ranks share a GPU so
        that every rank's blocks fit on it together (kernels of different ranks wait on each
        other, so blocks that cannot be resident would never meet)."""
        requested = (config or default(self.group_size)).num_sms
        limit = self.topology.max_sms_per_rank
        if limit <= 0 or requested <= limit:
            return requested
        if not self._warned_sm_clamp:
            self._warned_sm_clamp = True
            warnings.warn(
                f"deepep_megatron: {self.topology.ranks_per_gpu} ranks share a GPU with "
                f"{self.topology.num_sms_per_gpu} SMs, so kernels run on {limit} SMs per rank instead of "
                f"{requested} (all ranks' blocks must be resident together); pass Config(num_sms<={limit}) "
                "or call Buffer.set_num_sms to choose",
                stacklevel=3,
            )
        return limit

    # ------------------------------------------------------------------ class helpers (DeepEP API)
    @staticmethod
    def set_num_sms(new_num_sms: int) -> None:
        """Set the SM count the default configs use."""
        if new_num_sms <= 0:
            raise ValueError(f"num_sms must be positive, got {new_num_sms}")
        Buffer.num_sms = new_num_sms

    @staticmethod
    def get_dispatch_config(num_ranks: int) -> Config:
        """Recommended dispatch config for any rank count (DeepEP only has a table for some):
        the SM count of `set_num_sms`. Direct placement needs no per-rank-count chunk tuning."""
        _check_num_ranks(num_ranks)
        return Config(Buffer.num_sms)

    @staticmethod
    def get_combine_config(num_ranks: int) -> Config:
        """Recommended combine config for any rank count (see `get_dispatch_config`)."""
        _check_num_ranks(num_ranks)
        return Config(Buffer.num_sms)

    @staticmethod
    def get_low_latency_rdma_size_hint(
        num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int, num_experts: int
    ) -> int:
        """Bytes for `num_rdma_bytes` in low-latency mode: what the low-latency kernels lay out
        in symmetric memory (two banks, each with per-(expert, source) landing slots for every
        rank's tokens, combine landing rows, staging and the zero-copy combine buffer, and
        signals); see `backends/low_latency_layout.py`. About 1.94 GB at 128 tokens, hidden 7168,
        256 experts, 8 ranks."""
        hint = low_latency_layout.size_hint(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts)
        return align_up(hint, 128)

    @staticmethod
    def is_sm90_compiled() -> bool:
        """Whether the compiled kernels (built for Hopper, sm_90) are available."""
        from deepep_megatron.backends import extension

        return extension.extension_available()

    def get_local_buffer_tensor(
        self,
        dtype: torch.dtype,
        size: torch.Size | None = None,
        offset: int = 0,
        use_rdma_buffer: bool = False,
    ) -> torch.Tensor:
        """A tensor over this rank's own communication memory, as DeepEP offers it: `num_nvl_bytes`
        (or `num_rdma_bytes` with `use_rdma_buffer`) bytes from `offset`, viewed as `dtype` and
        shaped `size` (default: 1-D, all that fits). Where the backend keeps no such memory
        between calls (the portable one), a persistent local tensor of that size stands in."""
        self._check_alive()
        num_bytes = self.num_rdma_bytes if use_rdma_buffer else self.num_nvl_bytes
        element_size = torch.empty((), dtype=dtype).element_size()
        if offset < 0 or offset > num_bytes or offset % element_size:
            raise ValueError(f"offset {offset} must be a multiple of {element_size} within {num_bytes} bytes")
        available = (num_bytes - offset) // element_size
        numel = available if size is None else int(torch.Size(size).numel())
        if numel > available:
            raise ValueError(
                f"{numel} elements of {dtype} do not fit {num_bytes - offset} bytes from offset {offset}"
            )
        key = "rdma" if use_rdma_buffer else "nvl"
        memory = self._local_buffers.get(key)
        if memory is None:
            device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
            memory = self._local_buffers[key] = torch.zeros(num_bytes, dtype=torch.uint8, device=device)
        view = memory[offset : offset + numel * element_size].view(dtype)
        return view if size is None else view.view(size)

    def get_comm_stream(self) -> torch.cuda.Stream | None:
        return self._comm_stream

    def get_local_device_id(self) -> int:
        return torch.cuda.current_device() if torch.cuda.is_available() else -1

    def get_num_rdma_ranks(self) -> int:
        return self.group_size // self.num_ranks_per_node

    def get_rdma_rank(self) -> int:
        return self.rank // self.num_ranks_per_node

    def get_root_rdma_rank(self, global_: bool) -> int:
        return self.rank % self.num_ranks_per_node if global_ else 0

    @staticmethod
    def capture() -> EventOverlap:
        """An event on the current stream, to pass as `previous_event` (static, as in DeepEP)."""
        if not torch.cuda.is_available():
            return EventOverlap(None)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream())
        return EventOverlap(event)

    def destroy(self) -> None:
        """Release the buffer's resources (only with `explicitly_destroy=True`)."""
        if not self.explicitly_destroy:
            raise RuntimeError("destroy() needs Buffer(..., explicitly_destroy=True)")
        self._release(collective=True)

    def _release(self, collective: bool = False) -> None:
        if self._destroyed:
            return
        self._router.destroy(collective)
        self._local_buffers.clear()
        self._destroyed = True

    def __del__(self):
        try:
            if not self.explicitly_destroy:
                self._release()
        except Exception:  # interpreter shutdown: nothing sensible left to do
            pass

    def _check_alive(self) -> None:
        if self._destroyed:
            raise RuntimeError("this Buffer was destroyed")

    # ------------------------------------------------------------------ streams
    @contextmanager
    def _ordered(
        self, device: torch.device, previous_event: EventOverlap | None, async_finish: bool, outputs: list
    ):
        """Order the body's kernels: after `previous_event` (or the current stream's work), and
        before the current stream's later work unless `async_finish` asks for an event instead.

        A synchronous call (no `async_finish`) runs on the current stream itself: waiting for the
        comm stream and back would order it the same and cost two cross-stream waits per call.
        An asynchronous one runs on the communication stream and hands back its event.

        `outputs` is filled by the body with tensors to protect; on exit it holds the
        `EventOverlap` as its last element."""
        if device.type != "cuda":
            yield
            outputs.append(EventOverlap(None))
            return
        compute_stream = torch.cuda.current_stream()
        previous = previous_event.event if previous_event is not None else None
        if not async_finish:
            if previous is not None:
                compute_stream.wait_event(previous)
            yield
            outputs.append(EventOverlap(None))
            return
        comm_stream = self._comm_stream
        if previous is not None:
            comm_stream.wait_event(previous)
        else:
            comm_stream.wait_stream(compute_stream)
        with torch.cuda.stream(comm_stream):
            yield
        tensors = [t for t in outputs if isinstance(t, torch.Tensor)]
        for tensor in tensors:  # allocated on the comm stream, used on the compute stream
            tensor.record_stream(compute_stream)
        event = torch.cuda.Event()
        event.record(comm_stream)
        outputs.append(EventOverlap(event, tensors))

    @staticmethod
    def _protect_inputs(async_finish: bool, device: torch.device, *tensors) -> None:
        """Inputs read on the comm stream must not be freed and reused by the compute stream
        while an async call is still reading them."""
        if async_finish and device.type == "cuda":
            for tensor in tensors:
                if isinstance(tensor, torch.Tensor):
                    tensor.record_stream(torch.cuda.current_stream())

    # ------------------------------------------------------------------ layout
    def get_dispatch_layout(
        self,
        topk_idx: torch.Tensor,
        num_experts: int,
        previous_event: EventOverlap | None = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ):
        """Count tokens per rank and per expert from the routing.

        Args:
            topk_idx: `[N, K]` int64 expert ids, -1 for an empty slot.
            num_experts: E, a multiple of the group size.
            previous_event, async_finish: order the call after `previous_event` (else after the
                current stream's work); with `async_finish`, run it on the comm stream and return
                an event to wait for instead of ordering the current stream after it.
            allocate_on_comm_stream: accepted for compatibility and unused: outputs are always
                safe to use on the current stream once the call (or its event) has completed.

        Returns:
            `(num_tokens_per_rank [R] int32, num_tokens_per_rdma_rank [R/ranks_per_node] int32
            or None, num_tokens_per_expert [E] int32, is_token_in_rank [N, R] bool, event)`.
        """
        self._check_alive()
        check.check_topk_idx(topk_idx, num_experts, self.group_size)
        backend = self._router.normal(topk_idx.device)
        outputs: list = []
        with self._ordered(topk_idx.device, previous_event, async_finish, outputs):
            layout = backend.get_dispatch_layout(LayoutRequest(topk_idx, num_experts))
            outputs += [layout.num_tokens_per_rank, layout.num_tokens_per_expert, layout.is_token_in_rank]
        return (
            layout.num_tokens_per_rank,
            layout.num_tokens_per_rdma_rank,
            layout.num_tokens_per_expert,
            layout.is_token_in_rank,
            outputs[-1],
        )

    # ------------------------------------------------------------------ dispatch
    def dispatch(
        self,
        x,
        handle: DispatchHandle | None = None,
        num_tokens_per_rank: torch.Tensor | None = None,
        num_tokens_per_rdma_rank: torch.Tensor | None = None,
        is_token_in_rank: torch.Tensor | None = None,
        num_tokens_per_expert: torch.Tensor | None = None,
        topk_idx: torch.Tensor | None = None,
        topk_weights: torch.Tensor | None = None,
        expert_alignment: int = 1,
        num_worst_tokens: int = 0,
        config: Config | None = None,
        previous_event: EventOverlap | None = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ):
        """Send each token to every rank that holds one of its experts.

        Args:
            x: `[N, H]` bf16, or `(x_fp8 [N, H] float8_e4m3fn, scales [N, H/128] float32)`.
            handle: a previous dispatch's handle for a cached dispatch (same layout, no top-k,
                no host sync).
            num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert: from
                `get_dispatch_layout` (fresh dispatch only).
            topk_idx: `[N, K]` int64, topk_weights: `[N, K]` float32 (optional).
            expert_alignment: round each per-expert count up to this multiple.
            num_worst_tokens: if > 0, size the outputs to this many rows and skip the host sync
                (CUDA-graph capturable); the per-expert list is then empty.
            previous_event, async_finish: order the call after `previous_event` (else after the
                current stream's work); with `async_finish`, run it on the comm stream and return
                an event to wait for instead of ordering the current stream after it.
            allocate_on_comm_stream: accepted for compatibility and unused: outputs are always
                safe to use on the current stream once the call (or its event) has completed.

        Returns:
            `(recv_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list, handle,
            event)`. Rows are ordered by source rank, then token index; each token arrives once
            per rank. `recv_x` is a tensor or an `(x_fp8, scales)` tuple like `x`.
            `recv_topk_idx` holds local expert ids (-1 for other ranks' experts) and
            `recv_topk_weights` is 0 there. A cached dispatch returns
            `(recv_x, None, None, None, None, event)`.
        """
        self._check_alive()
        payload, scales = check.split_payload(x)
        device = payload.device
        num_tokens = payload.size(0)
        check.check_expert_alignment(expert_alignment)
        if num_worst_tokens < 0:
            raise ValueError(f"num_worst_tokens must be >= 0, got {num_worst_tokens}")
        request = DispatchRequest(
            x=payload,
            scales=scales,
            handle=handle,
            expert_alignment=expert_alignment,
            num_worst_tokens=num_worst_tokens,
            num_sms=self._kernel_num_sms(config, Buffer.get_dispatch_config),
        )
        if handle is not None:
            self._check_cached_dispatch(handle, payload, topk_idx, topk_weights)
        else:
            # Rows first: x and topk_idx from different batches is the likelier mistake than a
            # malformed layout, and the message should say so.
            check.check_same_rows(num_tokens, topk_idx=topk_idx, is_token_in_rank=is_token_in_rank)
            check.check_layout_inputs(
                num_tokens,
                self.group_size,
                None,
                device,
                num_tokens_per_rank,
                is_token_in_rank,
                num_tokens_per_expert,
            )
            if topk_idx is not None:
                check.check_topk_idx(topk_idx, num_tokens_per_expert.numel(), self.group_size, device)
            if topk_weights is not None:
                if topk_idx is None:
                    raise ValueError("topk_weights needs topk_idx")
                check.check_topk_weights(topk_weights, topk_idx)
            request.num_tokens_per_rank = num_tokens_per_rank
            request.num_tokens_per_rdma_rank = num_tokens_per_rdma_rank
            request.is_token_in_rank = is_token_in_rank
            request.num_tokens_per_expert = num_tokens_per_expert
            request.topk_idx = topk_idx
            request.topk_weights = topk_weights
        backend = self._router.for_handle(handle) if handle is not None else self._router.normal(device)
        self._check_capacity(num_tokens, payload, scales, num_worst_tokens)

        self._protect_inputs(async_finish, device, payload, scales, topk_idx, topk_weights)
        outputs: list = []
        with self._ordered(device, previous_event, async_finish, outputs):
            result = backend.dispatch(request)
            outputs += [result.recv_x, result.recv_scales, result.recv_topk_idx, result.recv_topk_weights]
        event = outputs[-1]
        recv_x = (result.recv_x, result.recv_scales) if scales is not None else result.recv_x
        if handle is not None:
            return recv_x, None, None, None, None, event
        return (
            recv_x,
            result.recv_topk_idx,
            result.recv_topk_weights,
            list(result.handle.num_recv_tokens_per_expert_list),
            result.handle,
            event,
        )

    def _check_cached_dispatch(self, handle, payload, topk_idx, topk_weights) -> None:
        if not isinstance(handle, DispatchHandle):
            raise TypeError(
                f"handle must be a DispatchHandle from Buffer.dispatch, got {type(handle).__name__}"
            )
        if topk_idx is not None or topk_weights is not None:
            raise ValueError("a cached dispatch (handle given) takes no topk_idx / topk_weights")
        if payload.size(0) != handle.num_tokens:
            raise ValueError(
                f"cached dispatch: x has {payload.size(0)} rows, the handle was made for {handle.num_tokens}"
            )
        if payload.device != handle.is_token_in_rank.device:
            raise TypeError(
                f"cached dispatch: x is on device {payload.device}, "
                f"the handle on {handle.is_token_in_rank.device}"
            )

    def _check_capacity(self, num_tokens: int, payload, scales, num_worst_tokens: int) -> None:
        """The same limit on every backend: what `num_nvl_bytes` holds (no limit when it is 0).
        A rank receives at most `group_size` times the per-rank limit, so that also bounds the
        rows a `num_worst_tokens` dispatch asks for."""
        if self.num_nvl_bytes <= 0:
            return
        hidden_bytes = payload.size(1) * payload.element_size()
        limit = max_tokens_per_rank(
            self.num_nvl_bytes, hidden_bytes, 0 if scales is None else scales.size(1), self.group_size
        )
        if num_tokens > limit:
            raise ValueError(
                f"{num_tokens} tokens exceed what this Buffer holds for hidden={payload.size(1)} "
                f"({limit} tokens per rank with num_nvl_bytes={self.num_nvl_bytes}); "
                "size it with Config.get_nvl_buffer_size_hint"
            )
        if num_worst_tokens > limit * self.group_size:
            raise ValueError(
                f"num_worst_tokens={num_worst_tokens} exceeds the {limit * self.group_size} rows this "
                f"Buffer can receive for hidden={payload.size(1)} (num_nvl_bytes={self.num_nvl_bytes})"
            )

    # ------------------------------------------------------------------ combine
    def combine(
        self,
        x: torch.Tensor,
        handle: DispatchHandle,
        topk_weights: torch.Tensor | None = None,
        bias=None,
        config: Config | None = None,
        previous_event: EventOverlap | None = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ):
        """Send each received row back to its source rank and sum the rows of each token.

        Args:
            x: `[num_recv_rows, H]` bf16, rows in the order `dispatch` returned them.
            handle: the dispatch's handle.
            topk_weights: `[num_recv_rows, K]` float32, summed the same way (optional).
            bias: None, a `[N, H]` bf16 tensor, or a tuple of up to two, added to the result.
            previous_event, async_finish: order the call after `previous_event` (else after the
                current stream's work); with `async_finish`, run it on the comm stream and return
                an event to wait for instead of ordering the current stream after it.
            allocate_on_comm_stream: accepted for compatibility and unused: outputs are always
                safe to use on the current stream once the call (or its event) has completed.

        Returns:
            `(combined_x [N, H] bf16, combined_topk_weights [N, K] float32 or None, event)`. The
            sum is unweighted and accumulated in fp32: ranks in ascending order, then the biases.
        """
        self._check_alive()
        if not isinstance(handle, DispatchHandle):
            raise TypeError(
                f"handle must be a DispatchHandle from Buffer.dispatch, got {type(handle).__name__}"
            )
        check.check_tensor("x", x, dtype=torch.bfloat16, ndim=2, device=handle.is_token_in_rank.device)
        if tuple(x.shape) != (handle.num_recv_rows, handle.hidden):
            raise ValueError(
                f"combine x must have shape {(handle.num_recv_rows, handle.hidden)}, got {tuple(x.shape)}"
            )
        if topk_weights is not None:
            check.check_tensor("topk_weights", topk_weights, dtype=torch.float32, ndim=2, device=x.device)
            if topk_weights.size(0) != handle.num_recv_rows:
                raise ValueError(
                    f"topk_weights must have {handle.num_recv_rows} rows, got {topk_weights.size(0)}"
                )
        biases = check.normalize_bias(bias, handle.num_tokens, handle.hidden, x.device)
        backend = self._router.for_handle(handle)
        request = CombineRequest(
            x, handle, topk_weights, biases, self._kernel_num_sms(config, Buffer.get_combine_config)
        )

        self._protect_inputs(async_finish, x.device, x, topk_weights, *biases)
        outputs: list = []
        with self._ordered(x.device, previous_event, async_finish, outputs):
            result = backend.combine(request)
            outputs += [result.combined_x, result.combined_topk_weights]
        return result.combined_x, result.combined_topk_weights, outputs[-1]

    # ------------------------------------------------------------------ low latency
    def _check_low_latency(
        self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int
    ) -> None:
        if not self.low_latency_mode:
            raise RuntimeError("low-latency calls need Buffer(..., low_latency_mode=True)")
        needed = self.get_low_latency_rdma_size_hint(
            num_max_dispatch_tokens_per_rank, hidden, self.group_size, num_experts
        )
        if self.num_rdma_bytes < needed:
            raise ValueError(
                f"num_rdma_bytes={self.num_rdma_bytes} is too small for "
                f"{num_max_dispatch_tokens_per_rank} tokens, hidden={hidden}, {num_experts} experts: "
                f"need {needed} (Buffer.get_low_latency_rdma_size_hint)"
            )

    def low_latency_dispatch(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        num_max_dispatch_tokens_per_rank: int,
        num_experts: int,
        cumulative_local_expert_recv_stats: torch.Tensor | None = None,
        dispatch_wait_recv_cost_stats: torch.Tensor | None = None,
        use_fp8: bool = True,
        round_scale: bool = False,
        use_ue8m0: bool = False,
        async_finish: bool = False,
        return_recv_hook: bool = False,
    ):
        """Low-latency dispatch into per-expert slots (inference decode).

        Args:
            x: `[N, H]` bf16, N <= num_max_dispatch_tokens_per_rank; H % 128 == 0 for FP8.
            topk_idx: `[N, K]` int64, -1 for an empty slot.
            cumulative_local_expert_recv_stats: optional `[E_local]` int32, incremented by the
                received counts.
            dispatch_wait_recv_cost_stats: optional `[R]` int64, incremented per source rank by the
                nanoseconds this rank waited for it (0 where the backend cannot tell apart).
            use_fp8, round_scale, use_ue8m0: cast to e4m3 with per-128-channel scales (power-of-
                two with round_scale; packed UE8M0 int32 with use_ue8m0) before sending.
            return_recv_hook: return at once after sending; the received tensors are valid only
                after `hook()` is called.

        Returns:
            `(recv_x, recv_count, handle, event, hook)`: recv_x is `[E_local, R * max, H]` bf16,
            or `(x_fp8 [E_local, R * max, H], scales [E_local, R * max, H/128])` with FP8
            (scales are column-major: the token dimension is contiguous); `recv_count` is
            `[E_local]` int32; `hook` is None unless `return_recv_hook`.
        """
        self._check_alive()
        check.check_tensor("x", x, dtype=torch.bfloat16, ndim=2, device=None)
        check.check_topk_idx(topk_idx, num_experts, self.group_size, x.device)
        check.check_recv_stats(cumulative_local_expert_recv_stats, num_experts // self.group_size, x.device)
        if topk_idx.size(0) != x.size(0):
            raise ValueError(f"topk_idx has {topk_idx.size(0)} rows but x has {x.size(0)}")
        if x.size(0) > num_max_dispatch_tokens_per_rank:
            raise ValueError(
                f"{x.size(0)} tokens exceed "
                f"num_max_dispatch_tokens_per_rank={num_max_dispatch_tokens_per_rank}"
            )
        if use_fp8 and x.size(1) % limits.FP8_BLOCK_SIZE != 0:
            raise ValueError(
                f"FP8 low-latency dispatch needs hidden % {limits.FP8_BLOCK_SIZE} == 0, got {x.size(1)}"
            )
        if use_ue8m0 and not use_fp8:
            raise ValueError("use_ue8m0 needs use_fp8")
        self._check_low_latency(num_max_dispatch_tokens_per_rank, x.size(1), num_experts)
        check.check_wait_cost_stats(
            "dispatch_wait_recv_cost_stats", dispatch_wait_recv_cost_stats, self.group_size, x.device
        )
        request = LowLatencyDispatchRequest(
            x=x,
            topk_idx=topk_idx,
            num_max_dispatch_tokens_per_rank=num_max_dispatch_tokens_per_rank,
            num_experts=num_experts,
            use_fp8=use_fp8,
            round_scale=round_scale,
            use_ue8m0=use_ue8m0,
            return_recv_hook=return_recv_hook,
            cumulative_local_expert_recv_stats=cumulative_local_expert_recv_stats,
            dispatch_wait_recv_cost_stats=dispatch_wait_recv_cost_stats,
            num_sms=self._kernel_num_sms(None, Buffer.get_dispatch_config),
        )
        backend = self._router.low_latency(x.device)
        outputs: list = []
        with self._ordered(x.device, None, async_finish, outputs):
            result = backend.dispatch(request)
            outputs += [result.recv_x, result.recv_scales, result.recv_count]
        recv_x = (result.recv_x, result.recv_scales) if use_fp8 else result.recv_x
        return recv_x, result.recv_count, result.handle, outputs[-1], self._hook(result.receive, x.device)

    def _hook(self, receive: Callable[[], None] | None, device: torch.device):
        """The hook a low-latency call returns: it runs the receive on the comm stream, after
        which the current stream may use the outputs."""
        if receive is None:
            return None

        def hook() -> None:
            if device.type == "cuda":
                self._comm_stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(self._comm_stream):
                    receive()
                torch.cuda.current_stream().wait_stream(self._comm_stream)
            else:
                receive()

        return hook

    def _check_low_latency_handle(self, handle: LowLatencyHandle) -> None:
        if not isinstance(handle, LowLatencyHandle):
            raise TypeError(
                f"handle must be the LowLatencyHandle from low_latency_dispatch, got {type(handle).__name__}"
            )

    def get_next_low_latency_combine_buffer(self, handle: LowLatencyHandle) -> torch.Tensor:
        """`[E_local, R * max, H]` bf16 tensor that a `zero_copy` combine reads its input from.
        Write expert outputs here and call `low_latency_combine(..., zero_copy=True)`."""
        self._check_alive()
        self._check_low_latency_handle(handle)
        return self._router.for_handle(handle).next_combine_buffer(handle)

    def clean_low_latency_buffer(
        self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int
    ) -> None:
        """Reset the low-latency buffers; needed (as in DeepEP) before reusing them with other
        sizes. Collective where the low-latency kernels serve."""
        self._check_alive()
        self._check_low_latency(num_max_dispatch_tokens_per_rank, hidden, num_experts)
        self._router.low_latency_route.backend.clean(num_max_dispatch_tokens_per_rank, hidden, num_experts)
        self._router.portable_low_latency.clean(num_max_dispatch_tokens_per_rank, hidden, num_experts)

    def low_latency_combine(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor,
        handle: LowLatencyHandle,
        use_logfmt: bool = False,
        zero_copy: bool = False,
        async_finish: bool = False,
        return_recv_hook: bool = False,
        out: torch.Tensor | None = None,
        combine_wait_recv_cost_stats: torch.Tensor | None = None,
    ):
        """Send expert outputs back and reduce them, weighted by `topk_weights`.

        Args:
            x: `[E_local, R * max, H]` bf16 in the packing `low_latency_dispatch` produced.
            topk_idx: `[N, K]` int64 and topk_weights: `[N, K]` float32, as dispatched.
            handle: the low-latency dispatch's handle.
            use_logfmt: accepted; unused (combine is BF16).
            zero_copy: read the input from `get_next_low_latency_combine_buffer(handle)`
                instead of `x`.
            out: optional `[N, H]` bf16 output tensor.
            combine_wait_recv_cost_stats: optional `[R]` int64, as for dispatch.

        Returns:
            `(combined_x [N, H] bf16, event, hook)`.
        """
        self._check_alive()
        self._check_low_latency_handle(handle)
        experts_per_rank = handle.num_experts // self.group_size
        expected = (
            experts_per_rank,
            self.group_size * handle.num_max_dispatch_tokens_per_rank,
            handle.hidden,
        )
        check.check_tensor("x", x, dtype=torch.bfloat16, ndim=3, device=handle.recv_count.device)
        if tuple(x.shape) != expected:
            raise ValueError(f"low_latency_combine x must have shape {expected}, got {tuple(x.shape)}")
        check.check_topk_idx(topk_idx, handle.num_experts, self.group_size, x.device)
        check.check_topk_weights(topk_weights, topk_idx)
        if out is not None:
            check.check_tensor("out", out, dtype=torch.bfloat16, ndim=2, device=x.device)
            if tuple(out.shape) != (topk_idx.size(0), handle.hidden):
                raise ValueError(f"out must have shape {(topk_idx.size(0), handle.hidden)}")
        check.check_wait_cost_stats(
            "combine_wait_recv_cost_stats", combine_wait_recv_cost_stats, self.group_size, x.device
        )
        backend = self._router.for_handle(handle)
        if zero_copy:
            x = backend.next_combine_buffer(handle)
        request = LowLatencyCombineRequest(
            x=x,
            topk_idx=topk_idx,
            topk_weights=topk_weights,
            handle=handle,
            zero_copy=zero_copy,
            out=out,
            return_recv_hook=return_recv_hook,
            combine_wait_recv_cost_stats=combine_wait_recv_cost_stats,
            num_sms=self._kernel_num_sms(None, Buffer.get_combine_config),
        )
        outputs: list = []
        with self._ordered(x.device, None, async_finish, outputs):
            result = backend.combine(request)
            outputs.append(result.combined_x)
        return result.combined_x, outputs[-1], self._hook(result.receive, x.device)
