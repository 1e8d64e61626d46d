"""The compiled internode family (`csrc/internode`, over NVSHMEM) behind the `NormalBackend`
protocol, for groups that span nodes (a node: `num_ranks_per_node` consecutive ranks, so one host
can emulate several).

A token crosses the network once per destination node other than its own: rank (n, j) sends it to
the rank with the same local index j in that node (NVSHMEM put-with-signal), which forwards it
over NVLink (peer mappings) to the ranks of its node that hold its experts. Combine is the
reverse: the forwarding rank sums, in fp32, what its node's ranks computed for the token and sends
one partial sum over the network to the token's home rank, which adds the partial sums (nodes in
ascending order) and the biases. `csrc/internode/README.md` has the protocol.

Per call, this adapter exchanges the counts (one all-gather over the Buffer's group: the host
sync of a fresh dispatch), derives where every row goes (send slots, node slots, the count
matrix), checks the sizes on every rank alike (so a refusal happens everywhere, before any
kernel), and runs the kernels. Results: dispatch rows, order and values are the portable
backend's bit for bit; combine equals a sum of each token's rows in fp32 taken node by node
(ranks ascending within a node, then nodes ascending), then the biases, rounded once to bf16, which
can differ from the portable backend's rank-by-rank fp32 order in the last bit of bf16.

Not in this version: CUDA-graph capture (operation numbers are kernel arguments, and a fresh
dispatch synchronises with the host even with `num_worst_tokens`).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

import deepep_megatron.limits as limits
from deepep_megatron.backends import nvshmem
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
from deepep_megatron.config import align_up
from deepep_megatron.handle import DispatchHandle

TIMEOUT_ENV = "DEEPEP_MEGATRON_TIMEOUT_S"  # bound on every device-side wait (default 100 s)


def _kernels():
    """The internode runtime class of `_nvshmem`, or None when the module lacks it."""
    return getattr(nvshmem.module, "InternodeRuntime", None) if nvshmem.module is not None else None


def unavailable_reason(topology: Topology, sizes: BufferSizes) -> str | None:
    """Why the internode kernels cannot serve this group, or None if they can."""
    reason = nvshmem.unavailable_reason()
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


def timeout_seconds() -> float:
    return float(os.environ.get(TIMEOUT_ENV, "100"))


class _Routes:
    """Where the rows of one dispatch go, kept by its handle for combine and cached dispatches.

    max_tokens: the most tokens any rank sends (sizes the per-node landing areas);
    max_recv_rows: the most rows any rank receives (sizes the receive and combine-input areas);
    num_recv_rows: rows this rank returns (`num_worst_tokens` or the received count);
    num_recv_tokens: rows this rank received;
    node_slot: `[N, nodes]` int32 (device), a token's index among this rank's tokens to that node;
    own_node_tokens: `[n]` int32 (device), this rank's tokens that go to its own node, ascending;
    records_from_node: per source node, the tokens rank (node, my local index) sends to my node
        (the records I forward, and the partial sums I return);
    tokens_to_node: per node, this rank's tokens that go there (the partial sums it gets back);
    forward_rows: `[nodes, max_tokens, ranks_per_node]` int32 (device), filled by the dispatch: for
        each record this rank forwarded, the row at each rank of its node (-1: none).
    """

    __slots__ = (
        "max_tokens",
        "max_recv_rows",
        "num_recv_rows",
        "num_recv_tokens",
        "node_slot",
        "own_node_tokens",
        "records_from_node",
        "tokens_to_node",
        "forward_rows",
    )

    def __init__(self, **fields):
        for name in self.__slots__:
            setattr(self, name, fields.get(name))


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
            timeout_seconds(),
        )
        dist.barrier(group=group)  # every rank's signals are zeroed before anyone signals

    def destroy(self, collective: bool) -> None:
        """As the low-latency family: `collective` waits for every rank, releases the block and
        finalizes NVSHMEM when no buffer of the process uses it; otherwise the block goes back to
        the pool."""
        if self.runtime is None:
            return
        if collective:
            torch.cuda.synchronize()
            dist.barrier(group=self.group)
        self.runtime.destroy()
        self.runtime = None
        nvshmem.release(self.block)
        if collective:
            nvshmem.shutdown(self.group)

    def _live_runtime(self):
        if self.runtime is None:
            raise RuntimeError("the Buffer that made this internode handle was destroyed")
        return self.runtime

    # ------------------------------------------------------------------ layout
    def get_dispatch_layout(self, request: LayoutRequest) -> DispatchLayout:
        return dispatch_layout(request.topk_idx, request.num_experts, self.num_ranks, self.ranks_per_node)

    # ------------------------------------------------------------------ dispatch
    def _exchange_counts(self, request: DispatchRequest, in_node: torch.Tensor) -> torch.Tensor:
        """`[R, 1 + R + nodes + E]` int64 on the host: every rank's token count, its tokens per
        destination rank, per destination node and its selections per expert (one all-gather: the
        host sync of a fresh dispatch)."""
        mine = torch.cat(
            [
                torch.tensor([request.x.size(0)], dtype=torch.int64, device=request.x.device),
                request.is_token_in_rank.sum(0, dtype=torch.int64),
                in_node.sum(0, dtype=torch.int64),
                request.num_tokens_per_expert.long(),
            ]
        )
        if dist.get_backend(self.group) == "gloo":
            mine = mine.cpu()
        gathered = [torch.empty_like(mine) for _ in range(self.num_ranks)]
        dist.all_gather(gathered, mine, group=self.group)
        return torch.stack(gathered).cpu()

    def _node_slots(self, is_token_in_rank: torch.Tensor):
        """`([N, nodes] int32 node slots, [N, nodes] bool)`: a token's index among this rank's tokens
        to each node (-1 where it does not go)."""
        num_tokens = is_token_in_rank.size(0)
        in_node = is_token_in_rank.view(num_tokens, self.num_nodes, self.ranks_per_node).any(-1)
        node_slot = (in_node.int().cumsum(0, dtype=torch.int32) - 1).masked_fill_(~in_node, -1)
        return node_slot, in_node

    def dispatch(self, request: DispatchRequest) -> DispatchResult:
        runtime = self._live_runtime()
        if request.is_cached:
            return self._dispatch_cached(request, runtime)
        x = request.x
        num_tokens, hidden = x.shape
        num_experts = request.num_tokens_per_expert.numel()
        experts_per_rank = num_experts // self.num_ranks
        is_token_in_rank = request.is_token_in_rank
        node_slot, in_node = self._node_slots(is_token_in_rank)
        counts = self._exchange_counts(request, in_node)
        R, nodes = self.num_ranks, self.num_nodes
        tokens_per_rank = counts[:, 0]
        count_matrix = counts[:, 1 : 1 + R]  # [src, dst]
        to_node = counts[:, 1 + R : 1 + R + nodes]  # [src, node]
        expert_counts = counts[:, 1 + R + nodes :]
        recv_totals = count_matrix.sum(0)
        num_recv = int(recv_totals[self.rank])
        if request.num_worst_tokens > 0:
            over = [r for r in range(R) if int(recv_totals[r]) > request.num_worst_tokens]
            if over:  # every rank sees the same totals, so every rank raises
                raise RuntimeError(
                    f"ranks {over} would receive {[int(recv_totals[r]) for r in over]} tokens, "
                    f"more than num_worst_tokens={request.num_worst_tokens}"
                )
        num_rows = request.num_worst_tokens or num_recv
        mine = slice(self.rank * experts_per_rank, (self.rank + 1) * experts_per_rank)
        per_expert = expert_counts[:, mine].sum(0).tolist()
        per_expert_list = (
            []
            if request.num_worst_tokens > 0
            else [align_up(c, request.expert_alignment) for c in per_expert]
        )
        local = self.rank % self.ranks_per_node
        sources = [node * self.ranks_per_node + local for node in range(nodes)]
        routes = _Routes(
            max_tokens=max(1, int(tokens_per_rank.max())),
            max_recv_rows=max(1, int(recv_totals.max()), num_rows),
            num_recv_rows=num_rows,
            num_recv_tokens=num_recv,
            node_slot=node_slot,
            own_node_tokens=in_node[:, self.node].nonzero().view(-1).to(torch.int32),
            records_from_node=[int(to_node[src, self.node]) for src in sources],
            tokens_to_node=to_node[self.rank].tolist(),
        )

        send_slot = (is_token_in_rank.int().cumsum(0, dtype=torch.int32) - 1).masked_fill_(
            ~is_token_in_rank, -1
        )
        device_matrix = count_matrix.to(torch.int32).to(x.device)
        outputs = runtime.dispatch(
            _args(
                nvshmem.module.InternodeDispatchArgs,
                x=x,
                scales=request.scales,
                topk_idx=request.topk_idx,
                topk_weights=request.topk_weights,
                send_slot=send_slot,
                count_matrix=device_matrix,
                **self._route_args(routes),
                experts_per_rank=experts_per_rank if request.topk_idx is not None else 0,
                num_sms=request.num_sms,
            )
        )
        routes.forward_rows = outputs.forward_rows
        handle = DispatchHandle(
            backend=self,
            num_tokens=num_tokens,
            hidden=hidden,
            num_recv_rows=num_rows,
            num_recv_tokens=num_recv,
            is_token_in_rank=is_token_in_rank,
            num_tokens_matrix=device_matrix,
            send_slot=send_slot,
            recv_src_idx=outputs.recv_src_idx,
            num_recv_tokens_per_expert_list=per_expert_list,
            backend_state=routes,
        )
        # Without weights the kernels still move zeros; the API returns None, as the portable backend.
        recv_weights = outputs.recv_topk_weights if request.topk_weights is not None else None
        return DispatchResult(
            outputs.recv_x, outputs.recv_scales, outputs.recv_topk_idx, recv_weights, handle
        )

    def _route_args(self, routes: _Routes) -> dict:
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
        routes: _Routes = handle.backend_state
        outputs = runtime.dispatch(
            _args(
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
        routes: _Routes = handle.backend_state
        biases = request.biases
        outputs = runtime.combine(
            _args(
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


def _args(cls, **fields):
    """An argument struct of the extension with its fields set by name."""
    args = cls()
    for name, value in fields.items():
        setattr(args, name, value)
    return args
