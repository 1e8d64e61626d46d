"""Shared fixtures: pools of rank processes (one per world size, reused across tests)."""

from __future__ import annotations

import pytest

from deepep_megatron.testing.rank_pool import RankPool

# Each idle rank process holds about 0.7 GB (torch and the library imported). Keeping every
# world size's pool alive for the whole session (2 + 3 + 4 + 8 ranks and more) pushed a 2-core,
# 24 GiB CI machine into swapping, and the later subprocess tests (the 4-rank pretraining) ran
# past their timeout. Pools beyond this many live ranks are closed, least recently used first.
MAX_LIVE_POOL_RANKS = 8


class PoolCache:
    """Live gloo pools by world size, at most `MAX_LIVE_POOL_RANKS` ranks in all."""

    def __init__(self) -> None:
        self._pools: dict[int, RankPool] = {}  # insertion order: least recently used first

    def __call__(self, world_size: int) -> RankPool:
        pool = self._pools.pop(world_size, None)
        if pool is None or not pool.alive:
            while self._pools and sum(self._pools) + world_size > MAX_LIVE_POOL_RANKS:
                self._pools.pop(next(iter(self._pools))).close()
            pool = RankPool(world_size)
        self._pools[world_size] = pool
        return pool

    def close_all(self) -> None:
        """Free the CPU and memory for tests that launch their own ranks."""
        while self._pools:
            self._pools.popitem()[1].close()


@pytest.fixture(scope="session")
def cpu_pools():
    """`cpu_pools(world_size)` returns a live gloo pool of that size, starting it if needed."""
    cache = PoolCache()
    yield cache
    cache.close_all()


@pytest.fixture(scope="session")
def gpu_pools():
    """`gpu_pools(world_size)`: a live pool of ranks on CUDA tensors (see `GpuPools`), with a
    60 s wait timeout. For GPU-marked tests only; a module may override it with its own settings."""
    from deepep_megatron.testing.rank_pool import GpuPools

    pools = GpuPools({"DEEPEP_MEGATRON_TIMEOUT_S": "60"})
    yield pools
    pools.close()
