"""Shared fixtures: pools of rank processes (one per world size, reused across tests)."""

from __future__ import annotations

import pytest

from deepep_megatron.testing.rank_pool import RankPool


@pytest.fixture(scope="session")
def cpu_pools():
    """`cpu_pools(world_size)` returns a live gloo pool of that size, starting it if needed."""
    pools: dict[int, RankPool] = {}

    def get(world_size: int) -> RankPool:
        pool = pools.get(world_size)
        if pool is None or not pool.alive:
            pool = pools[world_size] = RankPool(world_size)
        return pool

    yield get
    for pool in pools.values():
        pool.close()
