"""How many tokens per rank the expert-parallel group's Buffer must hold, decided by the whole group.

Building a ``Buffer`` is collective (every rank of the group registers its region and maps its
peers'), and so is every dispatch that uses it. If each rank sized the Buffer from its own token
count, a rank with few tokens (or none) would keep a Buffer that a rank with many tokens has
outgrown: one rank rebuilds while the others do not, and the group hangs in the build, or a
receiver overflows the region its sender sized. So the count is agreed first: the MAX over the
group of every rank's count, one small all-reduce per dispatch, and every rank then makes the same
build / rebuild decision from the same number.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _collective_device(group: dist.ProcessGroup) -> torch.device:
    """Where a tensor for a collective on ``group`` must live: the current GPU for NCCL, else the
    CPU (gloo, also when ranks share one GPU)."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def agreed_tokens_per_rank(group: dist.ProcessGroup, num_tokens: int) -> int:
    """The largest ``num_tokens`` of any rank in ``group``; the same value on every rank.

    Collective: every rank of ``group`` must call it (once per dispatch). On NCCL groups it costs
    one small all-reduce and a host read of its result."""
    if num_tokens < 0:
        raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
    count = torch.tensor([num_tokens], dtype=torch.int64, device=_collective_device(group))
    dist.all_reduce(count, op=dist.ReduceOp.MAX, group=group)
    return int(count.item())
