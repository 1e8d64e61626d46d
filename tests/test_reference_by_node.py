"""The node-by-node combine reference (what the internode kernels are checked against, bit for bit)
is a distinct, plain summation order: equal to the rank-by-rank reference on one node, and on rows
whose values expose the order of addition, different from it once there are several nodes (so the
GPU test that compares the kernels with it can tell the orders apart)."""

from __future__ import annotations

import torch

from deepep_megatron.testing.reference import (
    make_rank_inputs,
    make_rows,
    reference_combine,
    reference_combine_by_node,
    reference_dispatch,
)

NUM_RANKS, NUM_EXPERTS, HIDDEN = 4, 16, 64


def _setup(seed: int):
    inputs = [make_rank_inputs(seed, r, 40, HIDDEN, NUM_EXPERTS, 4) for r in range(NUM_RANKS)]
    counts = [len(reference_dispatch(inputs, r, NUM_EXPERTS).src_token) for r in range(NUM_RANKS)]
    return inputs, lambda r: make_rows(seed, r, counts[r], HIDDEN)


def _plain_rows(inputs):
    def rows_of(rank: int) -> torch.Tensor:
        count = len(reference_dispatch(inputs, rank, NUM_EXPERTS).src_token)
        return torch.randn(count, HIDDEN, generator=torch.Generator().manual_seed(rank)).bfloat16()

    return rows_of


def test_one_node_is_the_rank_by_rank_order():
    inputs, rows_of = _setup(1)
    bias = (torch.randn(40, HIDDEN).bfloat16(),)
    for rank in range(NUM_RANKS):
        by_node = reference_combine_by_node(inputs, rank, NUM_EXPERTS, rows_of, NUM_RANKS, bias)
        assert torch.equal(
            by_node.view(torch.int16),
            reference_combine(inputs, rank, NUM_EXPERTS, rows_of, bias).view(torch.int16),
        )


def test_several_nodes_sum_in_another_order():
    inputs, rows_of = _setup(2)
    differs = 0
    for rank in range(NUM_RANKS):
        by_node = reference_combine_by_node(inputs, rank, NUM_EXPERTS, rows_of, 2).float()
        by_rank = reference_combine(inputs, rank, NUM_EXPERTS, rows_of).float()
        differs += int((by_node != by_rank).sum())
        # Plain values: the orders agree up to rounding.
        plain = _plain_rows(inputs)
        a = reference_combine_by_node(inputs, rank, NUM_EXPERTS, plain, 2).float()
        b = reference_combine(inputs, rank, NUM_EXPERTS, plain).float()
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)
    assert differs > 0
