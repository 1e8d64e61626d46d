"""Tokens per destination node and the bytes that cross nodes (CPU only).

`num_tokens_per_rdma_rank` and the network-bytes count are checked against plain token-by-token
counts; DeepSeek-V3 group-limited gating (one expert group per node, at most 4 groups per token)
must lower the count compared with unrestricted top-k on the same scores.
"""

from __future__ import annotations

import pytest
import torch

from deepep_megatron.backends.portable import dispatch_layout
from deepep_megatron.megatron.metrics import CommMetrics, call_network_bytes
from deepep_megatron.network_bytes import (
    NetworkBytes,
    RowFormat,
    network_bytes,
    remote_pairs_from_layout,
    remote_pairs_from_routing,
)
from deepep_megatron.routing import topk_routing
from deepep_megatron.testing.reference import reference_layout


def _plain_remote_pairs(topk_idx: torch.Tensor, rank: int, experts_per_rank: int, ranks_per_node: int) -> int:
    """(token, node other than `rank`'s) pairs, one token at a time."""
    own_node = rank // ranks_per_node
    pairs = 0
    for experts in topk_idx.tolist():
        nodes = {e // experts_per_rank // ranks_per_node for e in experts if e >= 0}
        pairs += len(nodes - {own_node})
    return pairs


def _routing(seed: int, num_tokens: int, num_experts: int, topk: int, groups: tuple[int, int] | None):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn((num_tokens, num_experts), generator=generator)
    num_groups, topk_groups = groups if groups else (None, None)
    topk_idx, _ = topk_routing(logits, topk, num_groups=num_groups, topk_groups=topk_groups)
    return topk_idx


@pytest.mark.parametrize(
    "num_ranks,ranks_per_node,groups,masked",
    [(4, 2, None, 0.0), (6, 3, None, 0.3), (6, 2, (3, 2), 0.0), (8, 2, (4, 2), 0.2), (16, 4, (4, 1), 0.0)],
)
def test_tokens_per_node_match_reference(num_ranks, ranks_per_node, groups, masked):
    num_experts, topk = 48, 4
    topk_idx = _routing(3, 200, num_experts, topk, groups)
    if masked:
        drop = torch.rand(topk_idx.shape, generator=torch.Generator().manual_seed(4)) < masked
        topk_idx = topk_idx.masked_fill(drop, -1)
    layout = dispatch_layout(topk_idx, num_experts, num_ranks, ranks_per_node)
    ref = reference_layout(topk_idx, num_experts, num_ranks, ranks_per_node)
    assert torch.equal(layout.num_tokens_per_rdma_rank, ref.num_tokens_per_rdma_rank)
    assert torch.equal(layout.num_tokens_per_rank, ref.num_tokens_per_rank)
    assert torch.equal(layout.is_token_in_rank, ref.is_token_in_rank)
    if groups is not None and groups[0] == num_ranks // ranks_per_node:
        # one group per node: no token reaches more than topk_groups nodes
        nodes_per_token = layout.is_token_in_rank.view(200, -1, ranks_per_node).any(-1).sum(1)
        assert int(nodes_per_token.max()) <= groups[1]


def test_within_one_node_there_is_no_network_traffic():
    topk_idx = _routing(5, 64, 32, 4, None)
    layout = dispatch_layout(topk_idx, 32, 4, 4)
    assert layout.num_tokens_per_rdma_rank is None
    assert network_bytes(None, 1, 4, RowFormat(128)) == NetworkBytes(0, 0, 0)
    assert int(remote_pairs_from_routing(layout.is_token_in_rank, 1, 4)) == 0


@pytest.mark.parametrize("num_ranks,ranks_per_node", [(4, 2), (6, 3), (6, 2), (8, 4), (8, 1)])
def test_network_bytes_match_plain_count(num_ranks, ranks_per_node):
    num_experts, topk, hidden = 8 * num_ranks, 6, 7168
    topk_idx = _routing(7, 300, num_experts, topk, None)
    topk_idx[::7, 1:] = -1  # some tokens with a single expert
    layout = dispatch_layout(topk_idx, num_experts, num_ranks, ranks_per_node)
    for rank in range(num_ranks):
        pairs = _plain_remote_pairs(topk_idx, rank, num_experts // num_ranks, ranks_per_node)
        assert int(remote_pairs_from_layout(layout.num_tokens_per_rdma_rank, rank, ranks_per_node)) == pairs
        assert int(remote_pairs_from_routing(layout.is_token_in_rank, rank, ranks_per_node)) == pairs
        bf16 = network_bytes(
            layout.num_tokens_per_rdma_rank, rank, ranks_per_node, RowFormat(hidden, False, topk)
        )
        assert bf16 == NetworkBytes(pairs, pairs * (hidden * 2 + topk * 12), pairs * (hidden * 4 + topk * 4))
        fp8 = RowFormat(hidden, True, topk, with_topk_weights=False)
        assert fp8.dispatch_bytes() == hidden + hidden // 128 * 4 + topk * 8
        assert fp8.combine_bytes() == hidden * 4


def test_group_limited_gating_lowers_network_bytes():
    """DeepSeek-V3 shape at EP64 as 8 nodes x 8: 256 experts, top-8, 8 groups (one per node), top-4
    groups. Unrestricted top-8 reaches ~4.6 remote nodes per token, group-limited at most 4 nodes
    (at most 3 or 4 remote), so the bytes must drop clearly."""
    num_ranks, ranks_per_node, num_experts, topk, num_tokens = 64, 8, 256, 8, 2048
    row = RowFormat(7168, True, topk)
    totals = {}
    for name, groups in (("random", None), ("group_limited", (8, 4))):
        topk_idx = _routing(11, num_tokens, num_experts, topk, groups)
        layout = dispatch_layout(topk_idx, num_experts, num_ranks, ranks_per_node)
        nodes_per_token = layout.is_token_in_rank.view(num_tokens, 8, ranks_per_node).any(-1).sum(1)
        if groups:
            assert int(nodes_per_token.max()) <= 4
        rank = 9  # node 1
        totals[name] = network_bytes(layout.num_tokens_per_rdma_rank, rank, ranks_per_node, row)
        expected_pairs = _plain_remote_pairs(topk_idx, rank, num_experts // num_ranks, ranks_per_node)
        assert totals[name].remote_pairs == expected_pairs
    assert totals["random"].remote_pairs > 4.2 * num_tokens
    assert totals["group_limited"].remote_pairs <= 4 * num_tokens
    assert totals["group_limited"].dispatch_bytes < 0.85 * totals["random"].dispatch_bytes
    assert totals["group_limited"].combine_bytes < 0.85 * totals["random"].combine_bytes


def test_metrics_report_rdma_bandwidth():
    metrics = CommMetrics()
    topk_idx = _routing(13, 100, 32, 4, None)
    layout = dispatch_layout(topk_idx, 32, 4, 2)
    row = RowFormat(256, False, 4)
    with metrics.time(1, "dispatch", torch.device("cpu")) as timer:
        timer.num_bytes = 1000.0
        timer.network_bytes = call_network_bytes("dispatch", layout.is_token_in_rank, 0, 2, row)
    with metrics.time(1, "combine", torch.device("cpu")) as timer:
        timer.num_bytes = 1000.0
    pairs = _plain_remote_pairs(topk_idx, 0, 8, 2)
    record = metrics._records[0]
    out = metrics.collect()
    seconds = record.seconds
    assert out["deepep/dispatch_rdma_GBps/layer_1"] == pytest.approx(
        pairs * row.dispatch_bytes() / seconds / 1e9
    )
    assert out["deepep/dispatch_rdma_GBps"] == out["deepep/dispatch_rdma_GBps/layer_1"]
    assert "deepep/combine_rdma_GBps" not in out  # nothing recorded for it
    assert (
        int(call_network_bytes("combine", layout.is_token_in_rank, 0, 2, row)) == pairs * row.combine_bytes()
    )


def test_a_rank_without_tokens_reports_zero_tokens_per_node():
    """Regression: the per-node view of an empty `is_token_in_rank` used to fail to reshape."""
    layout = dispatch_layout(torch.empty((0, 4), dtype=torch.int64), 32, 8, 2)
    assert layout.num_tokens_per_rdma_rank.tolist() == [0, 0, 0, 0]
    assert network_bytes(layout.num_tokens_per_rdma_rank, 3, 2, RowFormat(64)) == NetworkBytes(0, 0, 0)
