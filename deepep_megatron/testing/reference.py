"""Plain reference implementations of dispatch and combine, written for clarity, not speed.

Every rank regenerates every rank's inputs from a seed (`make_rank_inputs`), so each rank can
compute what it should receive without any communication. Tests compare `Buffer` (any backend)
against these.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RankInputs:
    """One rank's dispatch inputs: `x [N, H]` bf16, `topk_idx [N, K]` int64 (-1 = empty slot),
    `topk_weights [N, K]` float32."""

    x: torch.Tensor
    topk_idx: torch.Tensor
    topk_weights: torch.Tensor


def make_rank_inputs(
    seed: int,
    rank: int,
    num_tokens: int,
    hidden: int,
    num_experts: int,
    num_topk: int,
    *,
    masked_fraction: float = 0.0,
    single_expert: int | None = None,
) -> RankInputs:
    """Random routing without repeated experts per token; `masked_fraction` of the slots are -1;
    with `single_expert`, every token picks only that expert (the other slots are -1)."""
    generator = torch.Generator().manual_seed(seed * 1000 + rank)
    x = torch.randn((num_tokens, hidden), generator=generator).to(torch.bfloat16)
    scores = torch.rand((num_tokens, num_experts), generator=generator)
    topk_idx = scores.topk(num_topk, dim=1).indices.to(torch.int64)
    if masked_fraction > 0:
        mask = torch.rand((num_tokens, num_topk), generator=generator) < masked_fraction
        topk_idx = topk_idx.masked_fill(mask, -1)
    if single_expert is not None:
        topk_idx = torch.full((num_tokens, num_topk), -1, dtype=torch.int64)
        topk_idx[:, 0] = single_expert
    topk_weights = torch.rand((num_tokens, num_topk), generator=generator) + 0.1
    return RankInputs(x, topk_idx, topk_weights)


@dataclass
class ReferenceDispatch:
    """What one rank receives: rows ordered by source rank, then token index."""

    src_rank: list[int]
    src_token: list[int]
    recv_x: torch.Tensor
    recv_topk_idx: torch.Tensor
    recv_topk_weights: torch.Tensor
    num_recv_tokens_per_expert: list[int]


def reference_dispatch(all_inputs: list[RankInputs], rank: int, num_experts: int, expert_alignment: int = 1):
    num_ranks = len(all_inputs)
    experts_per_rank = num_experts // num_ranks
    src_rank, src_token, rows, ids, weights = [], [], [], [], []
    for src, inputs in enumerate(all_inputs):
        for token in range(inputs.x.size(0)):
            experts = [int(e) for e in inputs.topk_idx[token]]
            if not any(e >= 0 and e // experts_per_rank == rank for e in experts):
                continue
            src_rank.append(src)
            src_token.append(token)
            rows.append(inputs.x[token])
            local = [
                e - rank * experts_per_rank if e >= 0 and e // experts_per_rank == rank else -1
                for e in experts
            ]
            ids.append(local)
            weights.append([float(w) if l >= 0 else 0.0 for w, l in zip(inputs.topk_weights[token], local)])
    hidden = all_inputs[0].x.size(1)
    num_topk = all_inputs[0].topk_idx.size(1)
    recv_x = torch.stack(rows) if rows else torch.empty((0, hidden), dtype=torch.bfloat16)
    recv_ids = torch.tensor(ids, dtype=torch.int64).reshape(-1, num_topk)
    recv_weights = torch.tensor(weights, dtype=torch.float32).reshape(-1, num_topk)
    per_expert = [int((recv_ids == e).sum()) for e in range(experts_per_rank)]
    aligned = [(c + expert_alignment - 1) // expert_alignment * expert_alignment for c in per_expert]
    return ReferenceDispatch(src_rank, src_token, recv_x, recv_ids, recv_weights, aligned)


def reference_combine(
    all_inputs: list[RankInputs],
    rank: int,
    num_experts: int,
    rows_of_rank,
    biases: tuple[torch.Tensor, ...] = (),
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Combine for `rank`: `rows_of_rank(dst)` gives the `[M_dst, C]` tensor rank `dst` sends
    back (in its received order; rows past the received count are ignored). Sum per token in
    fp32, ranks ascending, then biases, then one cast to `out_dtype`."""
    num_ranks = len(all_inputs)
    num_tokens = all_inputs[rank].x.size(0)
    out = None
    for dst in range(num_ranks):
        received = reference_dispatch(all_inputs, dst, num_experts)
        rows = rows_of_rank(dst)
        if out is None:
            out = torch.zeros((num_tokens, rows.size(1)), dtype=torch.float32)
        for row, (src, token) in enumerate(zip(received.src_rank, received.src_token)):
            if src == rank:
                out[token] += rows[row].float()
    for bias in biases:
        out += bias.float()
    return out.to(out_dtype)


def reference_combine_by_node(
    all_inputs: list[RankInputs],
    rank: int,
    num_experts: int,
    rows_of_rank,
    num_ranks_per_node: int,
    biases: tuple[torch.Tensor, ...] = (),
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Combine for `rank` as the internode kernels sum: per node, an fp32 partial over that node's
    ranks in ascending order (starting from +0); then the partials, nodes ascending (starting from
    +0); then the biases; one cast to `out_dtype`. With one node this is `reference_combine`."""
    num_ranks = len(all_inputs)
    num_tokens = all_inputs[rank].x.size(0)
    out = None
    for first in range(0, num_ranks, num_ranks_per_node):
        partial = None
        for dst in range(first, first + num_ranks_per_node):
            received = reference_dispatch(all_inputs, dst, num_experts)
            rows = rows_of_rank(dst)
            if partial is None:
                partial = torch.zeros((num_tokens, rows.size(1)), dtype=torch.float32)
            for row, (src, token) in enumerate(zip(received.src_rank, received.src_token)):
                if src == rank:
                    partial[token] += rows[row].float()
        out = (torch.zeros_like(partial) if out is None else out) + partial
    for bias in biases:
        out += bias.float()
    return out.to(out_dtype)


@dataclass
class ReferenceLayout:
    """`get_dispatch_layout` for one rank, counted token by token."""

    num_tokens_per_rank: torch.Tensor  # [R] int32
    num_tokens_per_rdma_rank: torch.Tensor | None  # [R / ranks_per_node] int32, None within a node
    num_tokens_per_expert: torch.Tensor  # [E] int32
    is_token_in_rank: torch.Tensor  # [N, R] bool


def reference_layout(
    topk_idx: torch.Tensor, num_experts: int, num_ranks: int, num_ranks_per_node: int | None = None
):
    experts_per_rank = num_experts // num_ranks
    num_ranks_per_node = num_ranks_per_node or num_ranks
    num_tokens = topk_idx.size(0)
    per_rank = [0] * num_ranks
    per_node = [0] * (num_ranks // num_ranks_per_node)
    per_expert = [0] * num_experts
    in_rank = [[False] * num_ranks for _ in range(num_tokens)]
    for token in range(num_tokens):
        ranks, nodes = set(), set()
        for e in (int(v) for v in topk_idx[token]):
            if e < 0:
                continue
            per_expert[e] += 1
            ranks.add(e // experts_per_rank)
            nodes.add(e // experts_per_rank // num_ranks_per_node)
        for r in ranks:
            per_rank[r] += 1
            in_rank[token][r] = True
        for n in nodes:
            per_node[n] += 1
    rdma = torch.tensor(per_node, dtype=torch.int32) if num_ranks_per_node < num_ranks else None
    return ReferenceLayout(
        torch.tensor(per_rank, dtype=torch.int32),
        rdma,
        torch.tensor(per_expert, dtype=torch.int32),
        torch.tensor(in_rank, dtype=torch.bool).reshape(num_tokens, num_ranks),
    )


def make_rows(seed: int, rank: int, num_rows: int, hidden: int) -> torch.Tensor:
    """Deterministic `[num_rows, hidden]` bf16 rows (e.g. the expert output rank `rank` feeds
    to combine), so every rank can rebuild what any other rank sends.

    About half of the values are N(0, 1); the others are +-1 or +-2**24. With these, an fp32 sum
    of three or more values shows the order of addition even after rounding to bf16:
    `(2**24 + 1) - 2**24 == 0` but `(2**24 - 2**24) + 1 == 1`. So a reduction that adds in
    another order than the documented one does not match the reference bit for bit."""
    generator = torch.Generator().manual_seed(seed * 1000 + 500 + rank)
    shape = (num_rows, hidden)
    normal = torch.randn(shape, generator=generator)
    magnitude = torch.where(torch.rand(shape, generator=generator) < 0.5, 1.0, 2.0**24)
    sign = torch.where(torch.rand(shape, generator=generator) < 0.5, -1.0, 1.0)
    special = torch.rand(shape, generator=generator) < 0.5
    return torch.where(special, sign * magnitude, normal).to(torch.bfloat16)


@dataclass
class ReferenceLowLatencyDispatch:
    """What one rank's local experts receive in low-latency mode. For local expert `j`, slot `i`
    holds token `src_token[j][i]` of rank `src_rank[j][i]`: ordered by source rank, then token."""

    src_rank: list[list[int]]
    src_token: list[list[int]]
    recv_count: list[int]
    layout_range: list[list[tuple[int, int]]]  # [j][src] = (begin, count)


def reference_low_latency_dispatch(all_inputs: list[RankInputs], rank: int, num_experts: int):
    num_ranks = len(all_inputs)
    experts_per_rank = num_experts // num_ranks
    src_rank, src_token, layout_range = [], [], []
    for local in range(experts_per_rank):
        expert = rank * experts_per_rank + local
        ranks, tokens, ranges = [], [], []
        for src, inputs in enumerate(all_inputs):
            begin = len(tokens)
            for token in range(inputs.topk_idx.size(0)):
                if expert in [int(e) for e in inputs.topk_idx[token]]:
                    ranks.append(src)
                    tokens.append(token)
            ranges.append((begin, len(tokens) - begin))
        src_rank.append(ranks)
        src_token.append(tokens)
        layout_range.append(ranges)
    return ReferenceLowLatencyDispatch(src_rank, src_token, [len(t) for t in src_token], layout_range)


def reference_low_latency_combine(
    all_inputs: list[RankInputs], rank: int, num_experts: int, expert_rows_of_rank
) -> torch.Tensor:
    """Low-latency combine for `rank`: `expert_rows_of_rank(dst)` is the `[E_local, R * max, H]`
    tensor rank `dst` sends back. For each token, fp32 sum over its top-k slots in order of
    `weight * row` (slots with id -1 skipped), then one cast to bf16."""
    num_ranks = len(all_inputs)
    experts_per_rank = num_experts // num_ranks
    inputs = all_inputs[rank]
    received = [reference_low_latency_dispatch(all_inputs, dst, num_experts) for dst in range(num_ranks)]
    rows = [expert_rows_of_rank(dst) for dst in range(num_ranks)]
    num_tokens = inputs.topk_idx.size(0)
    hidden = rows[0].size(-1)
    out = torch.zeros((num_tokens, hidden), dtype=torch.float32)
    for token in range(num_tokens):
        acc = torch.zeros(hidden, dtype=torch.float32)
        for k in range(inputs.topk_idx.size(1)):
            expert = int(inputs.topk_idx[token, k])
            if expert < 0:
                continue
            dst, local = expert // experts_per_rank, expert % experts_per_rank
            pairs = list(zip(received[dst].src_rank[local], received[dst].src_token[local]))
            slot = pairs.index((rank, token))
            acc = acc + inputs.topk_weights[token, k] * rows[dst][local, slot].float()
        out[token] = acc
    return out.to(torch.bfloat16)
