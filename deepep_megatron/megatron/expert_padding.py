"""Padding of the experts' inputs on the receiving rank: each local expert's rows are followed by
zero rows (probability 0) up to a size the expert GEMM wants.

Two of megatron-core's options ask for it:

- ``--moe-pad-expert-input-to-capacity`` (with ``--moe-expert-capacity-factor``): every local
  expert gets exactly ``capacity * senders`` rows, ``capacity`` being each sender's per-expert
  capacity (``get_capacity(tokens * topk, experts, factor)``, as the router computes it), so the
  expert GEMMs have static shapes, as with megatron-core's alltoall dispatcher.
- ``--moe-router-padding-for-quantization``: every local expert's row count is rounded up to a
  multiple of the FP8 / FP4 GEMM's alignment (``get_align_size_for_quantization``: 16, 32 for
  MXFP8, 256 with TE's op fuser), so the experts skip their own padding
  (``skip_routed_expert_padding``), as with megatron-core's flex dispatcher.

Padding rows are zeros with probability 0: they add nothing to any output or weight gradient. The
router selects padding routes in both options; the dispatcher sends only real routes (probability
> 0) and pads where the rows arrive, so no padding crosses the wire.

Row counts are host lists (the dispatch already read them), so nothing here synchronises.
"""

from __future__ import annotations

import math

import torch


def padded_counts(counts: list[int], *, rows_per_expert: int | None = None, multiple: int = 0) -> list[int]:
    """Rows per local expert after padding: ``rows_per_expert`` each (capacity), else each count
    rounded up to ``multiple`` (0 or 1: unchanged). A count above ``rows_per_expert`` is an error
    (a sender exceeded its capacity, or ranks disagree on the capacity)."""
    if rows_per_expert is not None:
        over = [c for c in counts if c > rows_per_expert]
        if over:
            raise ValueError(
                f"an expert received {max(over)} rows, more than its padded capacity {rows_per_expert} "
                "(every rank of the group must see the same number of tokens)"
            )
        return [rows_per_expert] * len(counts)
    if multiple > 1:
        return [math.ceil(c / multiple) * multiple for c in counts]
    return list(counts)


def padding_destinations(counts: list[int], padded: list[int], device) -> torch.Tensor:
    """``[sum(counts)]`` int64: where each real row of the expert-major layout lands in the padded
    layout (expert e's rows start at ``sum(padded[:e])``)."""
    real_starts = [0]
    padded_starts = [0]
    for c, p in zip(counts[:-1], padded[:-1]):
        real_starts.append(real_starts[-1] + c)
        padded_starts.append(padded_starts[-1] + p)
    shift = torch.tensor([p - r for p, r in zip(padded_starts, real_starts)], dtype=torch.long)
    shift = shift.repeat_interleave(torch.tensor(counts, dtype=torch.long), output_size=sum(counts))
    return (torch.arange(sum(counts)) + shift).to(device, non_blocking=True)


def pad_rows(x: torch.Tensor, destinations: torch.Tensor, num_padded: int) -> torch.Tensor:
    """``[R, ...]`` real rows -> ``[num_padded, ...]`` with zeros between expert groups
    (differentiable: the backward gathers the real rows' gradients)."""
    out = x.new_zeros((num_padded, *x.shape[1:]))
    return out.index_copy(0, destinations, x)


def unpad_rows(x: torch.Tensor, destinations: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pad_rows`: the real rows, in expert-major order."""
    return x.index_select(0, destinations)
