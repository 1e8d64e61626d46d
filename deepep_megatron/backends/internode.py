"""The compiled internode family (`csrc/internode`, over NVSHMEM) behind the `NormalBackend`
protocol, for groups that span nodes (a node: `num_ranks_per_node` consecutive ranks, so one host
can emulate several).

A token crosses the network once per destination node other than its own: rank (n, j) sends it to
the rank with the same local index j in that node (NVSHMEM put-with-signal), which forwards it
over NVLink (peer mappings) to the ranks of its node that hold its experts. Combine is the
reverse: the forwarding rank sums, in fp32, what its node's ranks computed for the token and sends
one partial sum over the network to the token's home rank, which adds the partial sums (nodes in
ascending order) and the biases. `csrc/internode/README.md` has the protocol.

Per fresh dispatch, this adapter exchanges the counts (one all-gather over the Buffer's group: the
host sync of a fresh dispatch), derives where every row goes (`internode_routes.plan_dispatch`:
send slots, node slots, the count matrix) and runs the kernels; the runtime checks the sizes
derived from the exchanged counts, identically on every rank, so too small a buffer is refused
everywhere (`ValueError`) before any kernel. Results: dispatch rows, order and values are the portable
backend's bit for bit; combine equals a sum of each token's rows in fp32 taken node by node
(ranks ascending within a node, then nodes ascending), then the biases, rounded once to bf16, which
can differ from the portable backend's rank-by-rank fp32 order in the last bit of bf16.

Not in this version: CUDA-graph capture (operation numbers are kernel arguments, and a fresh
dispatch synchronises with the host even with `num_worst_tokens`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

import deepep_megatron.limits as limits
from deepep_megatron.backends import nvshmem
from deepep_megatron.backends.extension import fill_args
from deepep_megatron.backends.internode_routes import Routes, local_counts, plan_dispatch, tokens_in_node
from deepep_megatron.backends.portable import dispatch_layout
from deepep_megatron.backends.protocols import (
    BackendUnavailable,
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


def _kernels():
    """The internode runtime class of `_nvshmem`, or None when the module lacks it."""
    return getattr(nvshmem.module, "InternodeRuntime", None) if nvshmem.module is not None else None


def unavailable_reason(topology: Topology, sizes: BufferSizes) -> str | None:
    """Why the internode kernels cannot serve this group, or None if they can."""
    reason = nvshmem.unavailable_reason(topology.ranks_per_gpu)
    if reason is not None:
        return reason
    if _kernels() is None:
        return "the NVSHMEM module was built without the internode kernels; rebuild it"
    built = getattr(nvshmem.module, "MAX_NODES", None)
    if built != limits.MAX_NODES:
        return (
            f"the NVSHMEM module is stale (MAX_NODES: module {built}, Python {limits.MAX_NODES}); rebuild it"
        )
    if topology.num_ranks_per_node > limits.MAX_RANKS_PER_NODE:
        return f"internode kernels take at most {limits.MAX_RANKS_PER_NODE} ranks per node"
    if topology.num_nodes > limits.MAX_NODES:
        return f"internode kernels take at most {limits.MAX_NODES} nodes, the group has {topology.num_nodes}"
    if sizes.num_rdma_bytes <= 0:
        return "num_rdma_bytes is 0 (size it with deepep_megatron.backends.internode.rdma_size_hint)"
    return None


def rdma_size_hint(
    num_max_tokens_per_rank: int, hidden: int, num_ranks: int, num_ranks_per_node: int, num_topk: int
) -> int:
    """Bytes of `num_rdma_bytes` for the internode kernels: BF16 rows of `hidden` (FP8 rows are
    smaller), with scales room, top-k ids and weights, and any routing (a rank may receive every
    token). 0 where the kernels are not built (the portable backend then serves)."""
    runtime = _kernels()
    if runtime is None or num_ranks_per_node >= num_ranks:
        return 0
    return int(
        runtime.required_bytes(
            num_max_tokens_per_rank,
            hidden,
            num_topk,
            num_ranks,
            num_ranks_per_node,
            num_ranks * num_max_tokens_per_rank,
        )
    )


def create(group: dist.ProcessGroup, topology: Topology, sizes: BufferSizes) -> InternodeBackend:
    return InternodeBackend(group, topology, sizes.num_rdma_bytes)


class InternodeBackend:
    """The internode kernels for one group spanning nodes. Collective: every rank creates it."""

    name = "internode"

    def __init__(self, group: dist.ProcessGroup, topology: Topology, num_rdma_bytes: int):
        self.group = group
        self.rank = dist.get_rank(group)
        self.num_ranks = dist.get_world_size(group)
        self.ranks_per_node = topology.num_ranks_per_node
        self.num_nodes = topology.num_nodes
        self.node = self.rank // self.ranks_per_node
        try:
            nvshmem.join(group, num_rdma_bytes, topology.ranks_per_gpu)
        except RuntimeError as error:  # the process belongs to another group's NVSHMEM job
            raise BackendUnavailable(str(error)) from error
        self.block = nvshmem.acquire(group, num_rdma_bytes)
        first = self.node * self.ranks_per_node
        node_peer_bases = [self.block.peer_address(first + local) for local in range(self.ranks_per_node)]
        node_peer_bases[self.rank - first] = self.block.address
        # Every rank must map the blocks of its node's ranks; decided together, so all agree.
        mapped: list = [None] * self.num_ranks
        dist.all_gather_object(mapped, all(node_peer_bases), group=group)
        if not all(mapped):
            nvshmem.release(self.block)
            missing = [rank for rank, ok in enumerate(mapped) if not ok]
            raise BackendUnavailable(
                f"ranks {missing} cannot map their node peers' NVSHMEM memory (nvshmem_ptr gave 0): "
                "num_ranks_per_node must not exceed the ranks that share an NVLink domain"
            )
        self.runtime = _kernels()(
            self.rank,
            self.num_ranks,
            self.ranks_per_node,
            self.block.address,
            self.block.num_bytes,
            node_peer_bases,
            limits.wait_timeout_seconds(),
        )
        dist.barrier(group=group)  # every rank's signals are zeroed before anyone signals

    def destroy(self, collective: bool) -> None:
        """See `nvshmem.release_runtime`."""
        if self.runtime is None:
            return
        runtime, self.runtime = self.runtime, None
        nvshmem.release_runtime(runtime, self.block, self.group, collective)

    def _live_runtime(self):
        """The runtime, after raising TimeoutError if an earlier call of this buffer timed out (so a
        failed rank raises before it joins the next count exchange)."""
        if self.runtime is None:
            raise RuntimeError("the Buffer that made this internode handle was destroyed")
        self.runtime.check_health()
        return self.runtime

    # ------------------------------------------------------------------ layout
    def get_dispatch_layout(self, request: LayoutRequest) -> DispatchLayout:
        return dispatch_layout(request.topk_idx, request.num_experts, self.num_ranks, self.ranks_per_node)

    # ------------------------------------------------------------------ dispatch
    def _exchange_counts(self, mine: torch.Tensor) -> torch.Tensor:
        """Every rank's `local_counts`, `[R, ...]` int64 on the host (one all-gather: the host sync
        of a fresh dispatch)."""
        if dist.get_backend(self.group) == "gloo":
            mine = mine.cpu()
        gathered = [torch.empty_like(mine) for _ in range(self.num_ranks)]
        dist.all_gather(gathered, mine, group=self.group)
        return torch.stack(gathered).cpu()

    def dispatch(self, request: DispatchRequest) -> DispatchResult:
        runtime = self._live_runtime()
        if request.is_cached:
            return self._dispatch_cached(request, runtime)
        x, is_token_in_rank = request.x, request.is_token_in_rank
        in_node = tokens_in_node(is_token_in_rank, self.ranks_per_node)
        gathered = self._exchange_counts(
            local_counts(is_token_in_rank, in_node, request.num_tokens_per_expert)
        )
        plan = plan_dispatch(
            self.rank,
            self.ranks_per_node,
            is_token_in_rank,
            gathered,
            num_worst_tokens=request.num_worst_tokens,
            expert_alignment=request.expert_alignment,
        )
        routes = plan.routes
        device_matrix = plan.count_matrix.to(torch.int32).to(x.device)
        experts_per_rank = request.num_tokens_per_expert.numel() // self.num_ranks
        outputs = runtime.dispatch(
            fill_args(
                nvshmem.module.InternodeDispatchArgs,
                x=x,
                scales=request.scales,
                topk_idx=request.topk_idx,
                topk_weights=request.topk_weights,
                send_slot=plan.send_slot,
                count_matrix=device_matrix,
                **self._route_args(routes),
                experts_per_rank=experts_per_rank if request.topk_idx is not None else 0,
                num_sms=request.num_sms,
            )
        )
        routes.forward_rows = outputs.forward_rows
        handle = DispatchHandle(
            backend=self,
            num_tokens=x.size(0),
            hidden=x.size(1),
            num_recv_rows=routes.num_recv_rows,
            num_recv_tokens=routes.num_recv_tokens,
            is_token_in_rank=is_token_in_rank,
            num_tokens_matrix=device_matrix,
            send_slot=plan.send_slot,
            recv_src_idx=outputs.recv_src_idx,
            num_recv_tokens_per_expert_list=plan.num_recv_tokens_per_expert,
            backend_state=routes,
        )
        # Without weights the kernels still move zeros; the API returns None, as the portable backend.
        recv_weights = outputs.recv_topk_weights if request.topk_weights is not None else None
        return DispatchResult(
            outputs.recv_x, outputs.recv_scales, outputs.recv_topk_idx, recv_weights, handle
        )

    def _route_args(self, routes: Routes) -> dict:
        return {
            "node_slot": routes.node_slot,
            "own_node_tokens": routes.own_node_tokens,
            "records_from_node": routes.records_from_node,
            "max_tokens": routes.max_tokens,
            "max_recv_rows": routes.max_recv_rows,
            "num_recv_rows": routes.num_recv_rows,
            "num_recv_tokens": routes.num_recv_tokens,
        }

    def _dispatch_cached(self, request: DispatchRequest, runtime) -> DispatchResult:
        handle = request.handle
        routes: Routes = handle.backend_state
        outputs = runtime.dispatch(
            fill_args(
                nvshmem.module.InternodeDispatchArgs,
                x=request.x,
                scales=request.scales,
                send_slot=handle.send_slot,
                count_matrix=handle.num_tokens_matrix,
                **self._route_args(routes),
                experts_per_rank=0,
                num_sms=request.num_sms,
            )
        )
        return DispatchResult(outputs.recv_x, outputs.recv_scales, None, None, handle)

    # ------------------------------------------------------------------ combine
    def combine(self, request: CombineRequest) -> CombineResult:
        runtime = self._live_runtime()
        handle = request.handle
        routes: Routes = handle.backend_state
        biases = request.biases
        outputs = runtime.combine(
            fill_args(
                nvshmem.module.InternodeCombineArgs,
                x=request.x,
                topk_weights=request.topk_weights,
                bias0=biases[0] if len(biases) > 0 else None,
                bias1=biases[1] if len(biases) > 1 else None,
                forward_rows=routes.forward_rows,
                node_slot=routes.node_slot,
                records_from_node=routes.records_from_node,
                tokens_to_node=routes.tokens_to_node,
                max_tokens=routes.max_tokens,
                max_recv_rows=routes.max_recv_rows,
                num_recv_tokens=routes.num_recv_tokens,
                num_tokens=handle.num_tokens,
                num_sms=request.num_sms,
            )
        )
        return CombineResult(outputs.combined_x, outputs.combined_weights)
