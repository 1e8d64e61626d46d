"""Bytes a normal dispatch and its combine send across nodes (the internode "RDMA" traffic).

A node is `num_ranks_per_node` consecutive ranks. The internode design sends a token over the
network once per destination node other than its own, whatever the number of ranks (and experts)
it reaches there; so the count depends only on the layout: for each token, the nodes that hold at
least one of its experts, minus the token's own node.

What crosses the network, per (token, remote node) pair:
- dispatch: the payload (2 bytes per channel in BF16; 1 byte per channel plus one float32 scale
  per 128 channels in FP8) and the top-k metadata (int64 expert ids and, when sent, float32
  weights);
- combine: one partial sum per pair, reduced inside the remote node, in fp32 (4 bytes per channel,
  which keeps the result equal to a sum of the rows in fp32), plus the float32 top-k weights when
  they are combined.

Group-limited gating (DeepSeek-V3: experts of at most `topk_groups` node groups per token) bounds
the remote nodes per token, which is where this count drops.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from deepep_megatron.limits import FP8_BLOCK_SIZE


@dataclass(frozen=True)
class RowFormat:
    """What one dispatched row carries: `hidden` channels, FP8 (with scales) or BF16, `num_topk`
    top-k slots, and whether top-k weights travel with the ids."""

    hidden: int
    fp8: bool = False
    num_topk: int = 0
    with_topk_weights: bool = True

    def dispatch_bytes(self) -> int:
        """Bytes of one row sent over the network by dispatch."""
        payload = self.hidden + self.hidden // FP8_BLOCK_SIZE * 4 if self.fp8 else self.hidden * 2
        return payload + self.num_topk * (8 + (4 if self.with_topk_weights else 0))

    def combine_bytes(self) -> int:
        """Bytes of one fp32 partial sum (and its summed top-k weights) sent back by combine."""
        return self.hidden * 4 + (self.num_topk * 4 if self.with_topk_weights else 0)


@dataclass(frozen=True)
class NetworkBytes:
    """One rank's network traffic for one dispatch and its combine.

    remote_pairs: (token, destination node other than the token's own) pairs;
    dispatch_bytes / combine_bytes: the bytes those pairs carry (`RowFormat`).
    """

    remote_pairs: int
    dispatch_bytes: int
    combine_bytes: int

    @classmethod
    def of(cls, remote_pairs: int, row: RowFormat) -> NetworkBytes:
        return cls(remote_pairs, remote_pairs * row.dispatch_bytes(), remote_pairs * row.combine_bytes())


def remote_pairs_from_layout(
    num_tokens_per_rdma_rank: torch.Tensor | None, rank: int, num_ranks_per_node: int
):
    """(token, remote node) pairs of one rank, from `get_dispatch_layout`'s tokens per destination
    node (None within one node: 0). A 0-dim int64 tensor on the layout's device (no host sync)."""
    if num_tokens_per_rdma_rank is None:
        return torch.zeros((), dtype=torch.int64)
    own_node = rank // num_ranks_per_node
    return num_tokens_per_rdma_rank.sum(dtype=torch.int64) - num_tokens_per_rdma_rank[own_node].long()


def remote_pairs_from_routing(is_token_in_rank: torch.Tensor, rank: int, num_ranks_per_node: int):
    """The same count from `is_token_in_rank [N, R]` (what a dispatch handle keeps). 0-dim int64."""
    num_tokens, num_ranks = is_token_in_rank.shape
    if num_ranks_per_node >= num_ranks:
        return torch.zeros((), dtype=torch.int64, device=is_token_in_rank.device)
    in_node = is_token_in_rank.view(num_tokens, num_ranks // num_ranks_per_node, num_ranks_per_node).any(-1)
    in_node[:, rank // num_ranks_per_node] = False
    return in_node.sum(dtype=torch.int64)


def network_bytes(
    num_tokens_per_rdma_rank: torch.Tensor | None, rank: int, num_ranks_per_node: int, row: RowFormat
) -> NetworkBytes:
    """`NetworkBytes` of one rank's dispatch from its layout (one host sync, for reporting)."""
    pairs = int(remote_pairs_from_layout(num_tokens_per_rdma_rank, rank, num_ranks_per_node))
    return NetworkBytes.of(pairs, row)
