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


@pytest.fixture(scope="session")
def gpu_pools():
    """`gpu_pools(world_size)`: a live pool of ranks on CUDA tensors, bootstrapped over gloo; with
    fewer GPUs than ranks they share GPU 0 under MPS (the compiled kernels need the ranks' kernels
    to run concurrently). For GPU-marked tests only."""
    import torch

    from deepep_megatron.launch import start_mps_daemon

    pools: dict[int, RankPool] = {}
    daemons = []

    def get(world_size: int) -> RankPool:
        pool = pools.get(world_size)
        if pool is None or not pool.alive:
            share_gpu = torch.cuda.device_count() < world_size
            env = {"DEEPEP_MEGATRON_SHARE_GPU": "1" if share_gpu else "0", "DEEPEP_MEGATRON_TIMEOUT_S": "60"}
            if share_gpu:
                daemon = start_mps_daemon()
                daemons.append(daemon)
                env.update(daemon.env)
            pool = pools[world_size] = RankPool(world_size, backend="gloo", device="cuda", env=env)
        return pool

    yield get
    for pool in pools.values():
        pool.close()
    for daemon in daemons:
        daemon.stop()
