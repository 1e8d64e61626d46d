"""Where the rows of an internode dispatch go: plain torch, no communication and no kernels.

From one rank's `is_token_in_rank` and every rank's exchanged counts, this derives what the
internode kernels need (`csrc/internode/README.md`): each token's index among this rank's tokens
to every rank (`send_slot`) and to every node (`node_slot`), the `[src, dst]` count matrix, the
sizes that lay out every rank's symmetric block identically, and per node the records this rank
forwards and the partial sums it gets back. The adapter (`backends/internode.py`) all-gathers the
vectors of `local_counts` and calls `plan_dispatch`; `tests/test_internode_model.py` runs the same
plan through a plain model of the kernels' data flow.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from deepep_megatron.alignment import align_up


@dataclass
class Routes:
    """Kept by a dispatch handle, for its combine and its cached dispatches.

    max_tokens: the most tokens any rank sends (sizes the per-node landing areas);
    max_recv_rows: the most rows any rank returns (sizes the receive and combine-input areas);
    num_recv_rows: rows this rank returns (`num_worst_tokens`, or the received count);
    num_recv_tokens: rows this rank receives;
    node_slot: `[N, nodes]` int32, a token's index among this rank's tokens to each node, -1 if none;
    own_node_tokens: `[n]` int32, this rank's tokens that go to its own node, ascending;
    records_from_node: per source node n, the tokens rank (n, my local index) sends to my node
        (the records I forward, and the partial sums I return);
    tokens_to_node: per node, this rank's tokens that go there (the partial sums it gets back);
    forward_rows: `[nodes, max_tokens, ranks_per_node]` int32, filled by the dispatch: for each
        record this rank forwarded, the row at each rank of its node (-1: none).
    """

    max_tokens: int
    max_recv_rows: int
    num_recv_rows: int
    num_recv_tokens: int
    node_slot: torch.Tensor
    own_node_tokens: torch.Tensor
    records_from_node: list[int]
    tokens_to_node: list[int]
    forward_rows: torch.Tensor | None = None


@dataclass
class DispatchPlan:
    """One fresh dispatch of one rank: its routes, `send_slot [N, R]` int32, the count matrix
    `[R, R]` int64 (host, `[src, dst]`) and the per-expert counts of its experts (aligned; empty
    with `num_worst_tokens`)."""

    routes: Routes
    send_slot: torch.Tensor
    count_matrix: torch.Tensor
    num_recv_tokens_per_expert: list[int]


def running_index(member: torch.Tensor) -> torch.Tensor:
    """`[N, C]` bool -> `[N, C]` int32: the index of each True among the Trues of its column, in
    token order; -1 where False."""
    return (member.int().cumsum(0, dtype=torch.int32) - 1).masked_fill_(~member, -1)


def tokens_in_node(is_token_in_rank: torch.Tensor, ranks_per_node: int) -> torch.Tensor:
    """`[N, R]` bool -> `[N, nodes]` bool: the nodes holding one of each token's experts."""
    num_tokens, num_ranks = is_token_in_rank.shape
    return is_token_in_rank.view(num_tokens, num_ranks // ranks_per_node, ranks_per_node).any(-1)


def local_counts(
    is_token_in_rank: torch.Tensor, in_node: torch.Tensor, num_tokens_per_expert: torch.Tensor
) -> torch.Tensor:
    """This rank's part of the count exchange, `[1 + R + nodes + E]` int64 on its device: its token
    count, its tokens per destination rank, per destination node, and its selections per expert."""
    device = is_token_in_rank.device
    return torch.cat(
        [
            torch.tensor([is_token_in_rank.size(0)], dtype=torch.int64, device=device),
            is_token_in_rank.sum(0, dtype=torch.int64),
            in_node.sum(0, dtype=torch.int64),
            num_tokens_per_expert.to(device).long(),
        ]
    )


def plan_dispatch(
    rank: int,
    ranks_per_node: int,
    is_token_in_rank: torch.Tensor,
    gathered: torch.Tensor,
    *,
    num_worst_tokens: int = 0,
    expert_alignment: int = 1,
) -> DispatchPlan:
    """The plan of `rank` from its `is_token_in_rank [N, R]` and `gathered [R, 1 + R + nodes + E]`
    (every rank's `local_counts`, host). Raises RuntimeError, identically on every rank, when a rank
    would receive more than `num_worst_tokens` rows."""
    num_ranks = is_token_in_rank.size(1)
    nodes = num_ranks // ranks_per_node
    node, local = divmod(rank, ranks_per_node)
    tokens_per_rank = gathered[:, 0]
    count_matrix = gathered[:, 1 : 1 + num_ranks]
    to_node = gathered[:, 1 + num_ranks : 1 + num_ranks + nodes]
    expert_counts = gathered[:, 1 + num_ranks + nodes :]
    experts_per_rank = expert_counts.size(1) // num_ranks
    recv_totals = count_matrix.sum(0)
    if num_worst_tokens > 0:
        over = [r for r in range(num_ranks) if int(recv_totals[r]) > num_worst_tokens]
        if over:  # every rank sees the same totals, so every rank raises
            raise RuntimeError(
                f"ranks {over} would receive {[int(recv_totals[r]) for r in over]} tokens, "
                f"more than num_worst_tokens={num_worst_tokens}"
            )
    num_recv = int(recv_totals[rank])
    num_rows = num_worst_tokens or num_recv
    mine = expert_counts[:, rank * experts_per_rank : (rank + 1) * experts_per_rank].sum(0).tolist()
    per_expert = [] if num_worst_tokens > 0 else [align_up(int(c), expert_alignment) for c in mine]
    in_node = tokens_in_node(is_token_in_rank, ranks_per_node)
    routes = Routes(
        max_tokens=max(1, int(tokens_per_rank.max())),
        max_recv_rows=max(1, int(recv_totals.max()), num_rows),
        num_recv_rows=num_rows,
        num_recv_tokens=num_recv,
        node_slot=running_index(in_node),
        own_node_tokens=in_node[:, node].nonzero().view(-1).to(torch.int32),
        records_from_node=[int(to_node[n * ranks_per_node + local, node]) for n in range(nodes)],
        tokens_to_node=[int(c) for c in to_node[rank]],
    )
    return DispatchPlan(routes, running_index(is_token_in_rank), count_matrix, per_expert)
