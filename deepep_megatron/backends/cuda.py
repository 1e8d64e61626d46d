"""Compiled intranode backend (placeholder until the kernels land)."""

from __future__ import annotations


def unavailable_reason(num_ranks: int, num_ranks_per_node: int, num_nvl_bytes: int) -> str | None:
    return "the compiled extension is not built"


class CudaBackend:  # pragma: no cover - replaced by the kernel work
    name = "cuda"
