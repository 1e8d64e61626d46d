"""Row-wise all-to-all on torch.distributed, the transport of the portable backends.

Every tensor travels as raw bytes (`[rows, row_bytes]` uint8), so any dtype goes the same way and
nothing is pickled. gloo cannot move CUDA tensors in `all_to_all_single`, so there they are staged
through the host.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.distributed as dist


def as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """`[rows, ...]` of any dtype -> `[rows, row_bytes]` uint8 (copies only if not contiguous)."""
    row_bytes = tensor.element_size() * math.prod(tensor.shape[1:])
    return tensor.contiguous().view(torch.uint8).reshape(tensor.size(0), row_bytes)


class RowExchange:
    """All-to-all of tensor rows over one process group."""

    def __init__(self, group: dist.ProcessGroup):
        self.group = group
        self.num_ranks = dist.get_world_size(group)
        self._stage_through_host = dist.get_backend(group) == "gloo"

    def start(
        self, send: torch.Tensor, send_counts: list[int], recv_counts: list[int]
    ) -> Callable[[], torch.Tensor]:
        """Start sending `send` (`[sum(send_counts), ...]`, grouped by destination rank). Returns
        a callable that waits and gives the received `[sum(recv_counts), ...]` tensor, grouped by
        source rank."""
        row_shape = send.shape[1:]
        send_bytes = as_bytes(send)
        device = send.device
        staged = self._stage_through_host and device.type == "cuda"
        if staged:
            send_bytes = send_bytes.cpu()
        recv_bytes = torch.empty(
            (sum(recv_counts), send_bytes.size(1)), dtype=torch.uint8, device=send_bytes.device
        )
        work = dist.all_to_all_single(
            recv_bytes, send_bytes, recv_counts, send_counts, group=self.group, async_op=True
        )

        def finish() -> torch.Tensor:
            work.wait()
            out = recv_bytes.to(device) if staged else recv_bytes
            return out.view(send.dtype).reshape(out.size(0), *row_shape)

        return finish

    def rows(self, send: torch.Tensor, send_counts: list[int], recv_counts: list[int]) -> torch.Tensor:
        """`start(...)()`: send and wait."""
        return self.start(send, send_counts, recv_counts)()

    def counts(self, counts: torch.Tensor) -> torch.Tensor:
        """`counts`: `[R, ...]` int, row r goes to rank r. Returns `[R, ...]`, row s from rank s."""
        ones = [1] * self.num_ranks
        return self.rows(counts, ones, ones)
