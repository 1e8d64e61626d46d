"""`DeepEPTokenDispatcher`: megatron-core's token-dispatcher contract on `deepep_megatron.Buffer`.

The six stages, for one MoE layer on one expert-parallel rank (N local tokens, K = top-k,
R received rows, E_local local experts):

1. ``dispatch_preprocess``: ``[S, B, H]`` -> ``[N, H]``; the router's dense ``routing_map`` /
   ``probs`` ``[N, E]`` become ``topk_idx`` ``[N, K]`` (-1 where a token has fewer than K
   experts, e.g. after capacity dropping) and ``topk_probs`` ``[N, K]`` fp32.
2. ``token_dispatch``: ``Buffer.get_dispatch_layout`` + ``Buffer.dispatch`` on the Buffer's
   communication stream (FP8 payload when enabled: ``per_token_cast_to_fp8`` before sending,
   ``per_token_cast_back`` on receipt). Each token arrives once per destination rank, with its
   top-k probabilities masked to the rank's experts.
3. ``dispatch_postprocess``: the received rows are permuted into expert-major order for the
   grouped GEMM: for each local expert, the rows routed to it, by source rank then token index
   -- the same order megatron-core's alltoall dispatcher produces -- plus ``tokens_per_expert``
   (a CPU tensor) and the matching probabilities (``permuted_probs``).
4. The experts (``SequentialMLP``, ``TEGroupedMLP``...) apply ``permuted_probs`` to their
   activations, as they do for the alltoall dispatcher (megatron-core 0.19.2 applies the
   probabilities inside the experts, ``MLP.forward(..., per_token_scale)``).
5. ``combine_preprocess``: un-permute: the outputs of each received row's experts are summed
   (fp32 accumulation, one rounding), giving ``[R, H]``.
6. ``token_combine``: ``Buffer.combine`` (BF16, unweighted fp32 sum over ranks);
   ``combine_postprocess`` adds the shared experts and restores ``[S, B, H]``.

Backward (autograd Functions): the gradient of dispatch is a combine of the received rows'
gradients, whose ``topk_weights`` argument carries the gradients of the received probabilities
back to ``topk_probs``; the gradient of combine is a cached dispatch (the forward handle, no
layout, no host sync) of the output gradient. Gradients travel in BF16, probabilities' in fp32.

The one host synchronisation: a fresh ``Buffer.dispatch`` returns the number of rows per local
expert as a Python list (``num_recv_tokens_per_expert_list``), read on the host once per layer and
micro-batch. The grouped GEMM needs these counts on the host anyway (megatron-core's alltoall
dispatcher synchronises at the same point), and the sizes of every following tensor derive from
them, so nothing else synchronises: the permutation, the combine and both backward
communications are sync-free. The consequence is that a layer with this dispatcher cannot be
captured in a CUDA graph; :meth:`DeepEPTokenDispatcher.token_dispatch` raises a clear error if
one tries.
"""

from __future__ import annotations

import functools
import logging
import weakref

import torch
import torch.distributed as dist
from megatron.core.transformer.moe.token_dispatcher import MoETokenDispatcher

from deepep_megatron.backends.internode import rdma_size_hint
from deepep_megatron.buffer import Buffer, default_ranks_per_node
from deepep_megatron.config import Config
from deepep_megatron.fp8 import per_token_cast_back, per_token_cast_to_fp8
from deepep_megatron.limits import MAX_TOPK
from deepep_megatron.megatron.buffer_sizing import agreed_tokens_per_rank
from deepep_megatron.megatron.expert_padding import (
    pad_rows,
    padded_counts,
    padding_destinations,
    unpad_rows,
)
from deepep_megatron.megatron.expert_tensor_parallel import (
    check_group_order,
    expand_over_expert_tp,
    real_expert_counts,
)
from deepep_megatron.megatron.metrics import METRICS, call_network_bytes
from deepep_megatron.megatron.options import DeepEPOptions, fp8_dispatch_enabled, resolve_options
from deepep_megatron.network_bytes import RowFormat

logger = logging.getLogger(__name__)

WIRE_DTYPE = torch.bfloat16

# ---------------------------------------------------------------------------- buffers

_BUFFERS: dict[int, Buffer] = {}


def _group_key(group: dist.ProcessGroup) -> int:
    return id(group)


def get_buffer(group: dist.ProcessGroup, hidden: int, num_tokens: int, options: DeepEPOptions) -> Buffer:
    """The Buffer shared by every DeepEP MoE layer of ``group``, created on first use and
    re-created larger when a batch needs more room than it was sized for.

    Collective: the size follows the largest token count of any rank
    (:func:`~deepep_megatron.megatron.buffer_sizing.agreed_tokens_per_rank`), so every rank
    builds or rebuilds at the same call, with the same size."""
    group_size = dist.get_world_size(group)
    ranks_per_node = options.num_ranks_per_node or default_ranks_per_node(group_size)
    num_nvl_bytes, num_rdma_bytes = _buffer_bytes(group, hidden, num_tokens, options, ranks_per_node)
    if options.num_sms is not None and Buffer.num_sms != options.num_sms:
        Buffer.set_num_sms(options.num_sms)
    key = _group_key(group)
    buffer = _BUFFERS.get(key)
    if (
        buffer is None
        or buffer.num_nvl_bytes < num_nvl_bytes
        or buffer.num_rdma_bytes < num_rdma_bytes
        or buffer.num_ranks_per_node != ranks_per_node
        or buffer.backend_preference != options.backend
    ):
        _BUFFERS.pop(key, None)
        buffer = Buffer(
            group,
            num_nvl_bytes=num_nvl_bytes,
            num_rdma_bytes=num_rdma_bytes,
            backend=options.backend,
            num_ranks_per_node=ranks_per_node,
        )
        _BUFFERS[key] = buffer
    return buffer


def _buffer_bytes(
    group: dist.ProcessGroup, hidden: int, num_tokens: int, options: DeepEPOptions, ranks_per_node: int
) -> tuple[int, int]:
    """(num_nvl_bytes, num_rdma_bytes) for the largest token count of any rank (one MAX
    all-reduce, skipped when nothing is sized from it). A group spanning nodes also needs the
    internode kernels' buffer (0 where they are not built: the portable backend then serves)."""
    group_size = dist.get_world_size(group)
    spans_nodes = group_size > ranks_per_node
    if options.num_nvl_bytes is not None and not spans_nodes:
        return options.num_nvl_bytes, 0
    tokens = max(1, agreed_tokens_per_rank(group, num_tokens), options.max_tokens_per_rank or 0)
    num_nvl_bytes = options.num_nvl_bytes
    if num_nvl_bytes is None:
        config = Config(num_max_tokens_per_rank=tokens)
        num_nvl_bytes = config.get_nvl_buffer_size_hint(hidden * 2, group_size)
    if not spans_nodes:
        return num_nvl_bytes, 0
    return num_nvl_bytes, _rdma_bytes(tokens, hidden, group_size, ranks_per_node)


@functools.lru_cache(maxsize=64)
def _rdma_bytes(tokens: int, hidden: int, group_size: int, ranks_per_node: int) -> int:
    """The internode hint, asked of the extension once per shape (this runs at every dispatch)."""
    return rdma_size_hint(tokens, hidden, group_size, ranks_per_node, MAX_TOPK)


def release_buffers() -> None:
    """Drop the cached Buffers (tests, or before destroying process groups)."""
    _BUFFERS.clear()


# ---------------------------------------------------------------------------- per-call state


class _DispatchState:
    """What one forward pass of one layer hands from stage to stage (opaque to megatron).
    Backward never reads it: the autograd Functions keep their own references, so activation
    recomputation and interleaved micro-batches are safe."""

    __slots__ = (
        "handle",
        "recv_topk_idx",
        "tokens_per_expert",
        "permuted_rows",
        "slots",
        "num_recv_rows",
        "fp8",
        "rows_per_expert",
        "padding",
        "expert_tp",
    )

    def __init__(self) -> None:
        self.handle = None
        self.recv_topk_idx = None
        self.tokens_per_expert: list[int] = []
        self.permuted_rows = None
        self.slots = None
        self.num_recv_rows = 0
        self.fp8 = False
        self.rows_per_expert = None  # pad-to-capacity: rows of every local expert
        self.padding = None  # (destinations of the real rows, padded row count) when padded
        self.expert_tp = (1, 1)  # (local experts, expert-TP size): folds virtual expert counts


def _row_bytes(hidden: int, fp8: bool) -> float:
    return hidden * (1 + 4 / 128) if fp8 else hidden * 2


# ---------------------------------------------------------------------------- autograd


def _timed_on_comm_stream(buffer, layer, kind: str, handle, call):
    """Run one BF16 communication call of the layout `handle` on the Buffer's stream, ordered
    after the current stream (`call(previous_event)`), make the current stream wait for it, and
    record its time and bytes. Returns the call's outputs without the trailing event."""
    with METRICS.time(layer, kind, handle.is_token_in_rank.device) as timer:
        *outputs, event = call(buffer.capture())
        event.current_stream_wait()
        timer.num_bytes = handle.num_recv_rows * _row_bytes(handle.hidden, False)
        timer.network_bytes = call_network_bytes(
            kind, handle.is_token_in_rank, buffer.rank, buffer.num_ranks_per_node, RowFormat(handle.hidden)
        )
    return outputs


class _Dispatch(torch.autograd.Function):
    """Forward: (FP8 cast +) layout + dispatch. Backward: combine of the gradients."""

    @staticmethod
    def forward(ctx, x, topk_probs, topk_idx, buffer, num_experts, fp8, state, layer):
        metrics_device = x.device
        x_wire = x.to(WIRE_DTYPE).contiguous()
        payload = per_token_cast_to_fp8(x_wire) if fp8 else x_wire
        with METRICS.time(layer, "dispatch", metrics_device) as timer:
            previous = buffer.capture()
            num_per_rank, num_per_rdma_rank, num_per_expert, in_rank, event = buffer.get_dispatch_layout(
                topk_idx,
                num_experts,
                previous_event=previous,
                async_finish=True,
                allocate_on_comm_stream=True,
            )
            recv_x, recv_idx, recv_probs, counts, handle, event = buffer.dispatch(
                payload,
                num_tokens_per_rank=num_per_rank,
                num_tokens_per_rdma_rank=num_per_rdma_rank,
                is_token_in_rank=in_rank,
                num_tokens_per_expert=num_per_expert,
                topk_idx=topk_idx,
                topk_weights=topk_probs.float().contiguous(),
                previous_event=event,
                async_finish=True,
                allocate_on_comm_stream=True,
            )
            event.current_stream_wait()
            timer.num_bytes = handle.num_recv_rows * _row_bytes(x.size(1), fp8)
            timer.network_bytes = call_network_bytes(
                "dispatch",
                in_rank,
                buffer.rank,
                buffer.num_ranks_per_node,
                RowFormat(x.size(1), fp8, topk_idx.size(1)),
            )
        METRICS.add_expert_counts(layer, real_expert_counts(num_per_expert, *state.expert_tp))
        if fp8:
            recv_x = per_token_cast_back(*recv_x)
        recv_x = recv_x.to(x.dtype)
        state.handle = handle
        state.recv_topk_idx = recv_idx
        state.tokens_per_expert = list(counts)
        state.num_recv_rows = handle.num_recv_rows
        state.fp8 = fp8
        ctx.buffer, ctx.handle, ctx.layer = buffer, handle, layer
        ctx.x_dtype, ctx.probs_dtype = x.dtype, topk_probs.dtype
        ctx.recv_idx = recv_idx
        return recv_x, recv_probs

    @staticmethod
    def backward(ctx, grad_recv_x, grad_recv_probs):
        recv_idx, handle, buffer = ctx.recv_idx, ctx.handle, ctx.buffer
        if grad_recv_x is None:
            grad_recv_x = torch.zeros(
                (handle.num_recv_rows, handle.hidden), dtype=WIRE_DTYPE, device=recv_idx.device
            )
        if grad_recv_probs is None:
            grad_recv_probs = torch.zeros(recv_idx.shape, dtype=torch.float32, device=recv_idx.device)
        # Only the entries of this rank's experts are functions of topk_probs.
        grad_weights = grad_recv_probs.float().masked_fill(recv_idx < 0, 0.0).contiguous()
        grad_x, grad_probs = _timed_on_comm_stream(
            buffer,
            ctx.layer,
            "combine_bwd",
            handle,
            lambda previous: buffer.combine(
                grad_recv_x.to(WIRE_DTYPE).contiguous(),
                handle,
                topk_weights=grad_weights,
                previous_event=previous,
                async_finish=True,
                allocate_on_comm_stream=True,
            ),
        )
        ctx.handle = ctx.buffer = ctx.recv_idx = None
        return grad_x.to(ctx.x_dtype), grad_probs.to(ctx.probs_dtype), None, None, None, None, None, None


class _Combine(torch.autograd.Function):
    """Forward: combine (BF16, fp32 sum). Backward: cached dispatch of the gradient."""

    @staticmethod
    def forward(ctx, x, buffer, handle, layer):
        combined, _ = _timed_on_comm_stream(
            buffer,
            layer,
            "combine",
            handle,
            lambda previous: buffer.combine(
                x.to(WIRE_DTYPE).contiguous(),
                handle,
                previous_event=previous,
                async_finish=True,
                allocate_on_comm_stream=True,
            ),
        )
        ctx.buffer, ctx.handle, ctx.layer, ctx.x_dtype = buffer, handle, layer, x.dtype
        return combined.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        handle, buffer = ctx.handle, ctx.buffer
        grad_x, *_ = _timed_on_comm_stream(
            buffer,
            ctx.layer,
            "dispatch_bwd",
            handle,
            lambda previous: buffer.dispatch(
                grad_out.to(WIRE_DTYPE).contiguous(),
                handle=handle,
                previous_event=previous,
                async_finish=True,
                allocate_on_comm_stream=True,
            ),
        )
        ctx.handle = ctx.buffer = None
        return grad_x.to(ctx.x_dtype), None, None, None


def _sum_slots(x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """``out[r] = sum_k x[slots[r, k]]`` over the K slots of each row, where ``slots`` holds row
    indices of ``x`` or ``x.size(0)`` for "nothing". Accumulates in fp32 in slot order and rounds
    once, so it is deterministic on every device (unlike ``index_add_`` with CUDA atomics)."""
    padded = torch.cat([x, x.new_zeros((1, x.size(1)))])
    out = torch.zeros((slots.size(0), x.size(1)), dtype=torch.float32, device=x.device)
    # One contiguous index row per slot (a column of ``slots`` would be copied by every
    # index_select); the in-place add promotes each gathered row to fp32 exactly, as ``.float()``
    # would, without a separate cast kernel and temporary.
    for index in slots.t().contiguous():
        out += padded.index_select(0, index)
    return out.to(x.dtype)


class _PermuteRows(torch.autograd.Function):
    """Received rows -> expert-major rows: ``x[rows]``. The backward sums each received row's
    gradients over its local experts (:func:`_sum_slots`)."""

    @staticmethod
    def forward(ctx, x, rows, slots):
        ctx.save_for_backward(slots)
        return x.index_select(0, rows)

    @staticmethod
    def backward(ctx, grad):
        (slots,) = ctx.saved_tensors
        return _sum_slots(grad, slots), None, None


class _UnpermuteRows(torch.autograd.Function):
    """Expert-major outputs -> one row per received token: the sum over its local experts
    (:func:`_sum_slots`, fp32, one rounding). The backward gathers."""

    @staticmethod
    def forward(ctx, x, rows, slots):
        ctx.save_for_backward(rows)
        return _sum_slots(x, slots)

    @staticmethod
    def backward(ctx, grad):
        (rows,) = ctx.saved_tensors
        return grad.index_select(0, rows), None, None


# ---------------------------------------------------------------------------- helpers


def routing_map_to_topk(routing_map: torch.Tensor, probs: torch.Tensor, topk: int):
    """Dense routing ``[N, E]`` (bool map, probabilities) -> ``(topk_idx [N, K] int64,
    topk_probs [N, K])``. The K columns hold each token's experts in ascending id order; a token
    with fewer than K experts (capacity dropping) gets -1 ids and zero probabilities after them.
    Differentiable in ``probs``."""
    order = torch.sort(routing_map.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :topk]
    selected = routing_map.gather(1, order)
    topk_idx = torch.where(selected, order, torch.full_like(order, -1))
    topk_probs = probs.gather(1, order).masked_fill(~selected, 0.0)
    return topk_idx, topk_probs


def expert_major_order(recv_topk_idx: torch.Tensor, num_local_experts: int, total: int):
    """The (received row, local expert) pairs in expert-major order (by expert, then row).

    ``total`` (the number of pairs) is known on the host, so this never synchronises.

    Returns:
        ``(positions [total], rows [total], slots [R, K])``: each pair's index in the flattened
        ``[R, K]`` top-k, its row, and for each top-k slot the pair's index in expert-major order
        (``total`` where the slot holds another rank's expert).
    """
    num_rows, k = recv_topk_idx.shape
    flat = recv_topk_idx.reshape(-1)
    rows = torch.arange(num_rows, device=flat.device).repeat_interleave(k)
    # Empty slots (-1) sort after every pair (key >= num_local_experts * num_rows) and are cut off.
    key = torch.where(flat >= 0, flat, num_local_experts) * num_rows + rows
    positions = torch.argsort(key, stable=True)[:total]
    slots = torch.full((num_rows * k,), total, dtype=torch.long, device=flat.device)
    slots[positions] = torch.arange(total, device=flat.device)
    return positions, positions.div(k, rounding_mode="floor"), slots.view(num_rows, k)


def _is_capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


# ---------------------------------------------------------------------------- the dispatcher


class DeepEPTokenDispatcher(MoETokenDispatcher):
    """Token dispatcher on ``deepep_megatron.Buffer`` (``--moe-token-dispatcher-type deepep``).

    Args:
        num_local_experts: experts on this expert-parallel rank.
        local_expert_indices: their global ids (contiguous).
        config: the layer's TransformerConfig.
        pg_collection: process groups (``ep`` is the communication group).
        options: overrides :func:`~deepep_megatron.megatron.options.resolve_options`.

    Expert tensor parallelism (``expert_tensor_parallel_size`` T > 1) dispatches over the
    combined expert-TP x EP group (:mod:`~deepep_megatron.megatron.expert_tensor_parallel`);
    ``moe_pad_expert_input_to_capacity`` and ``moe_router_padding_for_quantization`` pad the
    experts' inputs where they arrive (:mod:`~deepep_megatron.megatron.expert_padding`).
    """

    def __init__(
        self,
        num_local_experts: int,
        local_expert_indices: list[int],
        config,
        pg_collection=None,
        options: DeepEPOptions | None = None,
    ) -> None:
        if pg_collection is None:
            from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

            pg_collection = get_default_pg_collection()
        super().__init__(config=config, pg_collection=pg_collection)
        if config.num_moe_experts is None or config.num_moe_experts % self.ep_size != 0:
            raise ValueError(
                f"num_moe_experts={config.num_moe_experts} must be a multiple of EP={self.ep_size}"
            )
        if list(local_expert_indices) != list(
            range(local_expert_indices[0], local_expert_indices[0] + num_local_experts)
        ):
            raise ValueError("local_expert_indices must be contiguous")
        self._setup_expert_tp(config)
        self.pad_multiple = 0
        if config.moe_router_padding_for_quantization:
            from megatron.core.transformer.moe.moe_utils import get_align_size_for_quantization

            self.pad_multiple = get_align_size_for_quantization(config)
        self.num_local_experts = num_local_experts
        self.local_expert_indices = list(local_expert_indices)
        self.num_experts = config.num_moe_experts
        self.topk = config.moe_router_topk
        self.options = options if options is not None else resolve_options(config)
        self.owner_layer = None  # weakref to the MoELayer, set by install()'s MoELayer patch
        self._anonymous_layer = None
        self._state: _DispatchState | None = None
        self._buffer: Buffer | None = None
        self._topk_idx = None
        self.hidden_shape = None
        self.cudagraph_attrs = []

    # -------------------------------------------------------------- helpers
    def _setup_expert_tp(self, config) -> None:
        """The communication group and expert count of the dispatch: the EP group, or with
        expert-TP T > 1 the TP x EP group with T virtual experts per expert."""
        self.comm_group = self.ep_group
        self.num_dispatch_experts = config.num_moe_experts
        if self.tp_size == 1:
            return
        from deepep_megatron.limits import MAX_TOPK

        if config.moe_router_topk * self.tp_size > MAX_TOPK:
            raise ValueError(
                f"expert tensor parallelism {self.tp_size} x top-{config.moe_router_topk} sends each "
                f"token to {config.moe_router_topk * self.tp_size} ranks' experts, more than "
                f"the dispatch's top-k limit {MAX_TOPK}"
            )
        check_group_order(self.tp_ep_group, dist.get_rank(self.ep_group), self.tp_rank, self.tp_size)
        self.comm_group = self.tp_ep_group
        self.num_dispatch_experts = config.num_moe_experts * self.tp_size

    def _pad_to_capacity(self, num_tokens: int) -> int | None:
        """Rows per local expert with ``moe_pad_expert_input_to_capacity``: every sender's
        capacity (as the router computes it from ``num_tokens``), times the senders; else None."""
        if not self.config.moe_pad_expert_input_to_capacity:
            return None
        from megatron.core.transformer.moe.moe_utils import get_capacity

        capacity = get_capacity(
            num_tokens * self.topk, self.num_experts, self.config.moe_expert_capacity_factor
        )
        return capacity * dist.get_world_size(self.comm_group)

    @property
    def layer_id(self) -> int | None:
        """The MoE layer's number (for metrics); a stable made-up id outside an MoELayer; None
        when timing is off."""
        if not self.options.timing:
            return None
        layer = self.owner_layer() if self.owner_layer is not None else None
        if layer is not None and getattr(layer, "layer_number", None) is not None:
            return int(layer.layer_number)
        if self._anonymous_layer is None:
            self._anonymous_layer = METRICS.anonymous_layer_id()
        return self._anonymous_layer

    def attach_to_layer(self, layer) -> None:
        self.owner_layer = weakref.ref(layer)

    def fp8_dispatch(self, hidden: torch.Tensor) -> bool:
        return fp8_dispatch_enabled(self.options, hidden.size(-1), hidden.device)

    # -------------------------------------------------------------- the six stages
    def dispatch_preprocess(
        self, hidden_states: torch.Tensor, routing_map: torch.Tensor, probs: torch.Tensor
    ):
        """``[S, B, H]`` -> ``[N, H]``; dense routing -> top-k ids (kept) and fp32 top-k probs."""
        assert routing_map.dim() == 2 and routing_map.dtype == torch.bool, "routing_map must be [N, E] bool"
        self.hidden_shape = hidden_states.shape
        hidden_states = hidden_states.reshape(-1, self.hidden_shape[-1])
        if probs.dtype != torch.float32:
            probs = probs.float()
        if self.config.moe_pad_expert_input_to_capacity:
            # The router pads the map with probability-0 routes; send only the real ones and pad
            # where they arrive (dispatch_postprocess).
            routing_map = routing_map & (probs > 0)
        topk_idx, topk_probs = routing_map_to_topk(routing_map, probs, self.topk)
        self._topk_idx, topk_probs = expand_over_expert_tp(
            topk_idx, topk_probs, self.num_local_experts, self.tp_size
        )
        self._state = _DispatchState()
        self._state.rows_per_expert = self._pad_to_capacity(hidden_states.size(0))
        self._state.expert_tp = (self.num_local_experts, self.tp_size)
        return hidden_states, topk_probs

    def token_dispatch(self, hidden_states: torch.Tensor, probs: torch.Tensor):
        """Dispatch on the Buffer's communication stream. With shared-expert overlap, the shared
        experts' first GEMM is queued on their side stream first, so it runs during the
        dispatch (including its one host synchronisation)."""
        if _is_capturing():
            raise RuntimeError(
                "DeepEPTokenDispatcher synchronises with the host once per dispatch (tokens per "
                "expert for the grouped GEMM) and cannot be captured in a CUDA graph; leave the "
                "MoE layers out of --cuda-graph-modules"
            )
        if self.shared_experts is not None:
            self.shared_experts.wait_current_stream()
            self.shared_experts.pre_forward_comm(
                hidden_states.view(self.hidden_shape), wait_current_stream=False
            )
            self.shared_experts.linear_fc1_forward_and_act()
        buffer = get_buffer(self.comm_group, hidden_states.size(-1), hidden_states.size(0), self.options)
        state = self._state
        recv_x, recv_probs = _Dispatch.apply(
            hidden_states,
            probs,
            self._topk_idx,
            buffer,
            self.num_dispatch_experts,
            self.fp8_dispatch(hidden_states),
            state,
            self.layer_id,
        )
        self._buffer = buffer
        self._topk_idx = None
        return recv_x, recv_probs

    def dispatch_postprocess(self, hidden_states: torch.Tensor, probs: torch.Tensor):
        """Received rows -> expert-major rows, ``tokens_per_expert`` (CPU int64), and their
        probabilities (fp32)."""
        state = self._state
        counts = state.tokens_per_expert
        positions, rows, slots = expert_major_order(state.recv_topk_idx, self.num_local_experts, sum(counts))
        state.permuted_rows, state.slots = rows, slots
        permuted_tokens = _PermuteRows.apply(hidden_states, rows, slots)
        permuted_probs = probs.reshape(-1).index_select(0, positions)
        padded = padded_counts(counts, rows_per_expert=state.rows_per_expert, multiple=self.pad_multiple)
        if padded != counts:
            destinations = padding_destinations(counts, padded, permuted_tokens.device)
            state.padding = (destinations, sum(padded))
            permuted_tokens = pad_rows(permuted_tokens, destinations, sum(padded))
            permuted_probs = pad_rows(permuted_probs, destinations, sum(padded))
        tokens_per_expert = torch.tensor(padded, dtype=torch.long)
        return permuted_tokens, tokens_per_expert, permuted_probs

    def combine_preprocess(self, hidden_states: torch.Tensor):
        """Expert-major outputs -> one row per received token (sum over its local experts)."""
        state = self._state
        if state.padding is not None:
            hidden_states = unpad_rows(hidden_states, state.padding[0])
        return _UnpermuteRows.apply(hidden_states, state.permuted_rows, state.slots)

    def token_combine(self, hidden_states: torch.Tensor):
        """Combine on the Buffer's communication stream; the shared experts' second GEMM is
        queued on their side stream first, to overlap with it."""
        if self.shared_experts is not None:
            self.shared_experts.wait_current_stream()
            self.shared_experts.linear_fc2_forward()
        state = self._state
        out = _Combine.apply(hidden_states, self._buffer, state.handle, self.layer_id)
        self._state = None
        self._buffer = None
        return out

    def combine_postprocess(self, hidden_states: torch.Tensor):
        """Add the shared experts' output (overlap mode) and restore ``[S, B, H]``."""
        output = hidden_states.view(self.hidden_shape)
        if self.shared_experts is not None:
            self.shared_experts.post_forward_comm()
            output = output + self.shared_experts.get_output()
        return output
