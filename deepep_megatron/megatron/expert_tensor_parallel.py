"""Expert tensor parallelism (ETP > 1) as a dispatch over the combined expert-TP x EP group.

With ``expert_tensor_parallel_size = T`` every expert's weights are split over the T ranks of an
expert-TP group (fc1 by output rows, fc2 by input columns), and each of those T ranks needs every
token routed to the expert; the T partial fc2 outputs sum to the expert's output. megatron-core's
alltoall dispatcher gets there with an all-to-all over EP, an all-gather over expert-TP, and a
reduce-scatter before the return all-to-all. Here one dispatch over the combined group does it,
as megatron-core's flex dispatcher does:

- the group is ``pg_collection.tp_ep`` (T x EP ranks, expert-TP rank fastest: group rank
  ``ep_rank * T + tp_rank``);
- each expert ``e`` (EP rank ``e // L``, local index ``e % L``, L local experts) becomes T
  "virtual" experts, ``((e // L) * T + t) * L + e % L`` for ``t < T``, one on each TP rank of its
  EP rank, so a token routed to ``e`` is sent to all T of them, with the same probability;
- on arrival, the local expert index of a virtual expert is again ``e % L``, so the experts see
  the same layout as without ETP;
- combine sums over all the ranks a token went to, which sums the T partial outputs: the
  row-parallel reduction comes free with the combine.

Backward: the probabilities' gradients of the T copies add up in :func:`expand_over_expert_tp`'s
backward (an index_select), the input gradients in the dispatch's backward combine.
"""

from __future__ import annotations

import torch


def expand_over_expert_tp(
    topk_idx: torch.Tensor, topk_probs: torch.Tensor, num_local_experts: int, tp_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k over real experts -> top-(k x T) over virtual experts (module docstring).

    Args:
        topk_idx: ``[N, K]`` int64 expert ids, -1 for empty slots.
        topk_probs: ``[N, K]`` fp32.
        num_local_experts: L, experts per EP rank.
        tp_size: T.

    Returns:
        ``(idx [N, K*T] int64, probs [N, K*T] fp32)``: slot ``k*T + t`` is slot k's copy for TP
        rank t (-1 and probability 0 where slot k is empty). Differentiable in ``topk_probs``.
    """
    if tp_size == 1:
        return topk_idx, topk_probs
    ep_rank, local = topk_idx.div(num_local_experts, rounding_mode="floor"), topk_idx % num_local_experts
    tp = torch.arange(tp_size, device=topk_idx.device)
    virtual = ((ep_rank.unsqueeze(-1) * tp_size + tp) * num_local_experts + local.unsqueeze(-1)).flatten(1)
    empty = (topk_idx < 0).repeat_interleave(tp_size, dim=1)
    idx = virtual.masked_fill(empty, -1)
    probs = topk_probs.repeat_interleave(tp_size, dim=1)
    return idx, probs


def real_expert_counts(counts: torch.Tensor, num_local_experts: int, tp_size: int) -> torch.Tensor:
    """Tokens per virtual expert ``[EP * T * L]`` -> tokens per expert ``[EP * L]`` (the T copies
    of an expert receive the same tokens; keep TP rank 0's)."""
    if tp_size == 1:
        return counts
    return counts.view(-1, tp_size, num_local_experts)[:, 0].flatten()


def check_group_order(tp_ep_group, ep_rank: int, tp_rank: int, tp_size: int) -> None:
    """The virtual-expert numbering needs group rank ``ep_rank * T + tp_rank`` (megatron-core's
    expert-TP-major order); raise if the group is ordered otherwise."""
    import torch.distributed as dist

    rank = dist.get_rank(tp_ep_group)
    if rank != ep_rank * tp_size + tp_rank:
        raise RuntimeError(
            f"the expert TP x EP group has rank {rank} where EP rank {ep_rank} and expert-TP rank "
            f"{tp_rank} of {tp_size} expect {ep_rank * tp_size + tp_rank}"
        )
