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
            local = [e - rank * experts_per_rank if e >= 0 and e // experts_per_rank == rank else -1 for e in experts]
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
) -> torch.Tensor:
    """Combine for `rank`: `rows_of_rank(dst)` gives the `[M_dst, H]` tensor rank `dst` sends
    back (in its received order). Sum per token in fp32, ranks ascending, then biases."""
    num_ranks = len(all_inputs)
    inputs = all_inputs[rank]
    num_tokens, hidden = inputs.x.shape
    out = torch.zeros((num_tokens, hidden), dtype=torch.float32)
    for dst in range(num_ranks):
        received = reference_dispatch(all_inputs, dst, num_experts)
        rows = rows_of_rank(dst)
        for row, (src, token) in enumerate(zip(received.src_rank, received.src_token)):
            if src == rank:
                out[token] += rows[row].float()
    for bias in biases:
        out += bias.float()
    return out.to(torch.bfloat16)
