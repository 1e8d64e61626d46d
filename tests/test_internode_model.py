"""The internode protocol's bookkeeping, checked on the CPU: the plan the adapter derives
(`backends/internode_routes.py`) is run through a plain model of the kernels' data flow
(`csrc/internode/README.md`: send -> landing/staging -> forward -> receive blocks; pull ->
partials -> reduce), with the same index expressions as the kernels, and the results must equal
the plain references: every rank's received rows, ids, weights and sources as
`reference_dispatch`, combine as `reference_combine_by_node` bit for bit. What this cannot check
(memory ordering, NVSHMEM, waits) is left to tests/test_gpu_internode.py."""

from __future__ import annotations

import pytest
import torch

from deepep_megatron.backends.internode_routes import local_counts, plan_dispatch, tokens_in_node
from deepep_megatron.backends.portable import dispatch_layout
from deepep_megatron.testing.reference import (
    make_rank_inputs,
    make_rows,
    reference_combine_by_node,
    reference_dispatch,
)


def _model(all_inputs, num_experts: int, ranks_per_node: int, num_worst_tokens: int = 0):
    """Run the plan of every rank through the model. Returns per rank: (received rows as
    (x, local ids, weights, source token) tuples in row order, plan, expert rows, combined)."""
    num_ranks = len(all_inputs)
    nodes = num_ranks // ranks_per_node
    experts_per_rank = num_experts // num_ranks
    layouts = [dispatch_layout(i.topk_idx, num_experts, num_ranks, ranks_per_node) for i in all_inputs]
    vectors = [
        local_counts(
            lay.is_token_in_rank,
            tokens_in_node(lay.is_token_in_rank, ranks_per_node),
            lay.num_tokens_per_expert,
        )
        for lay in layouts
    ]
    gathered = torch.stack(vectors)
    plans = [
        plan_dispatch(
            r, ranks_per_node, layouts[r].is_token_in_rank, gathered, num_worst_tokens=num_worst_tokens
        )
        for r in range(num_ranks)
    ]
    max_tokens = plans[0].routes.max_tokens
    assert all(p.routes.max_tokens == max_tokens for p in plans), "every rank lays out the same areas"
    assert all(p.routes.max_recv_rows == plans[0].routes.max_recv_rows for p in plans)

    # send: a record per token that goes anywhere, put to landing[my node][node slot] of (m, my local).
    staging, landing = {}, {r: {} for r in range(num_ranks)}
    arrived = [[0] * nodes for _ in range(num_ranks)]
    for s, inputs in enumerate(all_inputs):
        plan, node, local = plans[s], s // ranks_per_node, s % ranks_per_node
        first_row = [int(plan.count_matrix[:s, r].sum()) for r in range(num_ranks)]
        node_slot = plan.routes.node_slot
        for t in range(inputs.x.size(0)):
            if not (node_slot[t] >= 0).any():
                continue
            rows = [
                first_row[r] + int(plan.send_slot[t, r]) if plan.send_slot[t, r] >= 0 else -1
                for r in range(num_ranks)
            ]
            record = (t, rows, inputs.x[t], inputs.topk_idx[t], inputs.topk_weights[t])
            staging[(s, t)] = record
            for m in range(nodes):
                slot = int(node_slot[t, m])
                if slot < 0 or m == node:
                    continue
                dest = m * ranks_per_node + local
                assert (node, slot) not in landing[dest], "two records in one landing slot"
                assert slot < max_tokens
                landing[dest][(node, slot)] = record
                arrived[dest][node] += 1

    # forward: each rank places the records of its node into the receive blocks of its node.
    receive = [[None] * int(plans[r].count_matrix[:, r].sum()) for r in range(num_ranks)]
    forward_rows = {}
    for f in range(num_ranks):
        routes, node, local = plans[f].routes, f // ranks_per_node, f % ranks_per_node
        for n in range(nodes):
            if n != node:
                assert arrived[f][n] == routes.records_from_node[n], "arrival count the forwarder waits for"
            for k in range(routes.records_from_node[n]):
                if n == node:
                    record = staging[(f, int(routes.own_node_tokens[k]))]
                else:
                    record = landing[f][(n, k)]
                src_token, rows, x, ids, weights = record
                for d in range(ranks_per_node):
                    row = rows[node * ranks_per_node + d]
                    forward_rows[(f, n, k, d)] = row
                    if row < 0:
                        continue
                    dst = node * ranks_per_node + d
                    local_ids = [
                        int(e) - dst * experts_per_rank
                        if 0 <= int(e) - dst * experts_per_rank < experts_per_rank and e >= 0
                        else -1
                        for e in ids
                    ]
                    kept = [float(w) if i >= 0 else 0.0 for w, i in zip(weights, local_ids)]
                    assert receive[dst][row] is None, "two records in one receive row"
                    receive[dst][row] = (x, local_ids, kept, src_token)

    # combine: pull-reduce per record at the forwarder, then reduce per token at home.
    hidden = all_inputs[0].x.size(1)
    expert_rows = [make_rows(5, r, max(len(receive[r]), num_worst_tokens), hidden) for r in range(num_ranks)]
    partial_landing = {}
    for f in range(num_ranks):
        routes, node, local = plans[f].routes, f // ranks_per_node, f % ranks_per_node
        for n in range(nodes):
            for k in range(routes.records_from_node[n]):
                partial = torch.zeros(hidden, dtype=torch.float32)
                for d in range(ranks_per_node):
                    row = forward_rows[(f, n, k, d)]
                    if row >= 0:
                        partial += expert_rows[node * ranks_per_node + d][row].float()
                home = n * ranks_per_node + local
                partial_landing[(home, node, k)] = partial
    combined = []
    for h in range(num_ranks):
        routes = plans[h].routes
        out = torch.zeros((all_inputs[h].x.size(0), hidden), dtype=torch.float32)
        for t in range(out.size(0)):
            for m in range(nodes):
                slot = int(routes.node_slot[t, m])
                if slot >= 0:
                    out[t] += partial_landing[(h, m, slot)]
        combined.append(out.to(torch.bfloat16))
        assert sum(1 for key in partial_landing if key[0] == h) == sum(routes.tokens_to_node)
    return receive, plans, expert_rows, combined


@pytest.mark.parametrize(
    "num_ranks,ranks_per_node,tokens",
    [(4, 2, 20), (6, 3, 15), (6, 2, 15), (8, 4, 12), (8, 2, 12), (4, 1, 10)],
)
@pytest.mark.parametrize("masked", [0.0, 0.4])
def test_model_of_the_kernels_matches_the_references(num_ranks, ranks_per_node, tokens, masked):
    num_experts = 4 * num_ranks
    counts = [tokens if r != 1 else 0 for r in range(num_ranks)]  # rank 1 sends nothing
    all_inputs = [
        make_rank_inputs(3, r, counts[r], 32, num_experts, 4, masked_fraction=masked)
        for r in range(num_ranks)
    ]
    receive, plans, expert_rows, combined = _model(all_inputs, num_experts, ranks_per_node)
    for rank in range(num_ranks):
        ref = reference_dispatch(all_inputs, rank, num_experts)
        assert all(row is not None for row in receive[rank]), "every receive row is written"
        assert [row[3] for row in receive[rank]] == ref.src_token
        for i, (x, ids, weights, _) in enumerate(receive[rank]):
            assert torch.equal(x, ref.recv_x[i])
            assert ids == ref.recv_topk_idx[i].tolist()
            assert weights == ref.recv_topk_weights[i].tolist()
        want = reference_combine_by_node(
            all_inputs, rank, num_experts, lambda r: expert_rows[r], ranks_per_node
        )
        assert torch.equal(combined[rank].view(torch.int16), want.view(torch.int16)), f"rank {rank} combine"


def test_model_with_worst_case_rows():
    all_inputs = [make_rank_inputs(4, r, 16, 32, 16, 4) for r in range(4)]
    receive, plans, _, _ = _model(all_inputs, 16, 2, num_worst_tokens=64)
    assert all(p.routes.num_recv_rows == 64 for p in plans)
    assert [len(r) for r in receive] == [p.routes.num_recv_tokens for p in plans]
    with pytest.raises(RuntimeError, match="num_worst_tokens"):
        _model(all_inputs, 16, 2, num_worst_tokens=5)
