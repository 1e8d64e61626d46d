"""`Config`: SM count and buffer sizing for the normal (high-throughput) kernels.

DeepEP's `Config` describes ring-buffer chunk sizes. Our intranode kernels place tokens directly at
their final slot, so the chunk parameters have no meaning here: they are accepted, kept and
ignored. What matters is `num_sms` and how many tokens per rank a buffer must hold.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from deepep_megatron.alignment import align_up
from deepep_megatron.limits import FP8_BLOCK_SIZE, MAX_RANKS_PER_NODE, MAX_TOPK, REGION_ALIGNMENT

# The token capacity per rank that size hints assume unless told otherwise.
DEFAULT_MAX_TOKENS_PER_RANK = 4096


def dispatch_row_bytes(hidden_bytes: int, num_scales: int = 0, num_topk: int = MAX_TOPK) -> int:
    """Bytes one received row occupies in a receive region: payload, scales, top-k ids (int64),
    top-k weights (float32) and the source token index (int32)."""
    return hidden_bytes + num_scales * 4 + num_topk * (8 + 4) + 4


def normal_region_bytes(num_max_tokens_per_rank: int, hidden_bytes: int, num_ranks: int) -> int:
    """Staging bytes a rank needs so that every rank can send it `num_max_tokens_per_rank` tokens
    (the worst case: every token of every rank lands here) and stage one combine input of the
    same size. Combine rows are BF16, so `hidden_bytes` should be the BF16 row size."""
    rows = num_ranks * num_max_tokens_per_rank
    num_scales = max(1, hidden_bytes // 2 // FP8_BLOCK_SIZE)
    per_row = max(dispatch_row_bytes(hidden_bytes, num_scales), hidden_bytes + MAX_TOPK * 4)
    return align_up(rows * per_row + 8 * REGION_ALIGNMENT, REGION_ALIGNMENT)


def max_tokens_per_rank(num_nvl_bytes: int, hidden_bytes: int, num_scales: int, num_ranks: int) -> int:
    """Tokens per rank that a `Buffer(num_nvl_bytes=...)` can dispatch (and combine): the largest
    T with `normal_region_bytes(T, bf16_hidden_bytes, num_ranks) <= num_nvl_bytes`, where every row
    is also big enough for this dispatch's own row (`hidden_bytes` payload plus `num_scales`
    float32 scales).

    The inverse of `normal_region_bytes`, so a buffer sized with `Config.get_nvl_buffer_size_hint`
    for T tokens of hidden H (hidden_bytes = H * 2) takes T tokens of that hidden size both as BF16
    (`hidden_bytes=2H, num_scales=0`) and as FP8 (`hidden_bytes=H, num_scales=H/128`): the region
    is laid out for the BF16 rows of the combine that follows, whatever the dispatch payload.
    Every backend enforces this limit, so a program that runs on one runs on all.

    Args:
        num_nvl_bytes: the buffer's `num_nvl_bytes`.
        hidden_bytes: bytes of one payload row (BF16: 2 * hidden; FP8: hidden).
        num_scales: float32 scales per row (0 for BF16; hidden / FP8_BLOCK_SIZE for FP8, which also marks the
            payload as one byte per element).
        num_ranks: ranks in the group.

    Returns:
        The token limit per rank, >= 0.
    """
    if num_ranks <= 0 or hidden_bytes <= 0 or num_scales < 0:
        raise ValueError(
            f"max_tokens_per_rank needs positive num_ranks and hidden_bytes and num_scales >= 0, got "
            f"num_ranks={num_ranks}, hidden_bytes={hidden_bytes}, num_scales={num_scales}"
        )
    hidden = hidden_bytes if num_scales > 0 else hidden_bytes // 2  # elements per row
    bf16_hidden_bytes = hidden * 2
    provisioned_scales = max(1, bf16_hidden_bytes // 2 // FP8_BLOCK_SIZE)
    per_row = max(
        dispatch_row_bytes(bf16_hidden_bytes, provisioned_scales),  # as normal_region_bytes counts it
        bf16_hidden_bytes + MAX_TOPK * 4,
        dispatch_row_bytes(hidden_bytes, num_scales),  # this dispatch's own row
    )
    usable = num_nvl_bytes // REGION_ALIGNMENT * REGION_ALIGNMENT - 8 * REGION_ALIGNMENT
    return max(0, usable // (num_ranks * per_row))


@dataclass
class Config:
    """Kernel configuration for `Buffer.dispatch` / `Buffer.combine`.

    Args:
        num_sms: streaming multiprocessors the kernel uses (the grid size).
        num_max_nvl_chunked_send_tokens, num_max_nvl_chunked_recv_tokens,
        num_max_rdma_chunked_send_tokens, num_max_rdma_chunked_recv_tokens:
            DeepEP's ring-buffer chunk sizes. Accepted for compatibility; unused, because tokens
            are written straight to their final slot (no rings, no chunks).
        num_max_tokens_per_rank: tokens per rank that the size hints provision for. Not a DeepEP
            parameter (its hints do not depend on the token count; ours do, because the receive
            region holds whole batches).
    """

    num_sms: int = 20
    num_max_nvl_chunked_send_tokens: int = 6
    num_max_nvl_chunked_recv_tokens: int = 256
    num_max_rdma_chunked_send_tokens: int = 6
    num_max_rdma_chunked_recv_tokens: int = 256
    num_max_tokens_per_rank: int = field(default=DEFAULT_MAX_TOKENS_PER_RANK, kw_only=True)

    def __post_init__(self) -> None:
        if self.num_sms <= 0:
            raise ValueError(f"Config.num_sms must be positive, got {self.num_sms}")
        if self.num_max_tokens_per_rank <= 0:
            raise ValueError("Config.num_max_tokens_per_rank must be positive")

    def get_nvl_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """Bytes for `Buffer(num_nvl_bytes=...)` so that `num_max_tokens_per_rank` tokens with
        rows of `hidden_bytes` (BF16: hidden * 2) can be dispatched and combined."""
        return normal_region_bytes(self.num_max_tokens_per_rank, hidden_bytes, num_ranks)

    def get_rdma_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """Bytes for `Buffer(num_rdma_bytes=...)` in normal mode. Groups of up to
        `MAX_RANKS_PER_NODE` ranks (one node, DeepEP's rule) need none; larger groups, in nodes of
        `MAX_RANKS_PER_NODE`, get the internode kernels' hint for `num_max_tokens_per_rank` tokens
        of BF16 rows of `hidden_bytes` with up to `MAX_TOPK` experts (0 where those kernels are not
        built). With another `num_ranks_per_node`, use `backends.internode.rdma_size_hint`."""
        if num_ranks <= MAX_RANKS_PER_NODE or num_ranks % MAX_RANKS_PER_NODE != 0:
            return 0
        from deepep_megatron.backends.internode import rdma_size_hint

        return rdma_size_hint(
            self.num_max_tokens_per_rank, hidden_bytes // 2, num_ranks, MAX_RANKS_PER_NODE, MAX_TOPK
        )
