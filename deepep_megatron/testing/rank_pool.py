"""A pool of long-lived rank processes with a process group already set up.

Starting a process that imports torch costs seconds, so tests keep one pool per world size and
send it functions to run on every rank. `RankPool.run(fn, *args)` calls `fn(*args)` on each rank
and returns the per-rank results; an exception on any rank is raised in the caller with every
failing rank's traceback. A call that does not finish within its timeout kills the pool (a rank
stuck in a collective cannot be recovered) and raises `TimeoutError`.

`fn` must be importable by name (a module-level function). On GPU pools each rank also sets its
CUDA device (one GPU per rank, or all ranks on GPU 0 when `share_gpu`).
"""

from __future__ import annotations

import faulthandler
import multiprocessing as mp
import os
import signal
import traceback
from collections.abc import Callable
from typing import Any

from deepep_megatron.launch.rank import free_port


def _worker(rank: int, world_size: int, port: int, conn, backend: str, device: str, env: dict) -> None:
    faulthandler.enable()  # a crash in native code prints the Python stack of every thread
    os.environ.update(env)
    os.environ.update(
        {
            "RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
    )
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    if device == "cuda":
        torch.cuda.set_device(
            0 if env.get("DEEPEP_MEGATRON_SHARE_GPU") == "1" else rank % torch.cuda.device_count()
        )
    dist.init_process_group(backend, rank=rank, world_size=world_size, init_method=f"tcp://127.0.0.1:{port}")
    conn.send(("ready", None))
    while True:
        message = conn.recv()
        if message is None:
            break
        fn, args, kwargs = message
        try:
            conn.send(("ok", fn(*args, **kwargs)))
        except BaseException:  # report everything, including assertion errors
            conn.send(("error", traceback.format_exc()))
    dist.destroy_process_group()


class RankPool:
    """`world_size` processes, each in one process group (gloo by default)."""

    def __init__(
        self,
        world_size: int,
        backend: str = "gloo",
        device: str = "cpu",
        env: dict | None = None,
        start_timeout: float = 120.0,
    ):
        self.world_size = world_size
        self.device = device
        ctx = mp.get_context("spawn")
        port = free_port()
        self._conns, self._procs = [], []
        for rank in range(world_size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=_worker,
                args=(rank, world_size, port, child, backend, device, dict(env or {})),
                daemon=True,
            )
            proc.start()
            self._conns.append(parent)
            self._procs.append(proc)
        self._collect(start_timeout)

    def run(self, fn: Callable[..., Any], *args, timeout: float = 300.0, **kwargs) -> list[Any]:
        """Run `fn(*args, **kwargs)` on every rank; return the results ordered by rank."""
        for conn in self._conns:
            conn.send((fn, args, kwargs))
        return self._collect(timeout)

    def _collect(self, timeout: float) -> list[Any]:
        results, errors = [], []
        for rank, conn in enumerate(self._conns):
            if not conn.poll(timeout):
                self.close(force=True)
                raise TimeoutError(f"rank {rank} did not answer within {timeout:.0f} s; the pool was stopped")
            try:
                status, value = conn.recv()
            except EOFError:
                status, value = "error", self._death_of(rank)
            if status == "error":
                errors.append(f"--- rank {rank} ---\n{value}")
            results.append(value)
        if errors:
            # Other ranks may now wait in a collective the failing rank never joined.
            self.close(force=True)
            raise AssertionError("failure on some ranks:\n" + "\n".join(errors))
        return results

    def _death_of(self, rank: int) -> str:
        """Why rank `rank`'s pipe closed: its exit code or the signal that killed it."""
        proc = self._procs[rank]
        proc.join(timeout=10)
        code = proc.exitcode
        if code is not None and code < 0:
            return f"the rank process was killed by {signal.Signals(-code).name} (see its stderr)"
        return f"the rank process ended (exit code {code}) without answering"

    @property
    def alive(self) -> bool:
        return bool(self._procs) and all(proc.is_alive() for proc in self._procs)

    def close(self, force: bool = False) -> None:
        for conn in self._conns:
            try:
                if not force:
                    conn.send(None)
            except (BrokenPipeError, OSError):
                pass
        for proc in self._procs:
            proc.join(timeout=0 if force else 10)
            if proc.is_alive():
                proc.kill()
                proc.join()
        self._conns, self._procs = [], []


class GpuPools:
    """Live pools of ranks on CUDA tensors by world size, bootstrapped over gloo (NCCL refuses
    two ranks on one GPU). With fewer GPUs than ranks they share GPU 0 under MPS, started on
    first need: the compiled kernels need every rank's blocks to run at the same time.

    `GpuPools(env)(world_size)` returns a live pool; `close()` stops the pools and the daemon.
    """

    def __init__(self, env: dict[str, str] | None = None):
        self.env = dict(env or {})
        self._pools: dict[int, RankPool] = {}
        self._daemon = None

    def __call__(self, world_size: int) -> RankPool:
        pool = self._pools.get(world_size)
        if pool is None or not pool.alive:
            pool = self._pools[world_size] = RankPool(
                world_size, device="cuda", env=self._rank_env(world_size)
            )
        return pool

    def _rank_env(self, world_size: int) -> dict[str, str]:
        import torch

        from deepep_megatron.launch import start_mps_daemon

        share_gpu = torch.cuda.device_count() < world_size
        # A rank that dies in native code prints the faulting address and native stack.
        env = {
            "DEEPEP_MEGATRON_SHARE_GPU": "1" if share_gpu else "0",
            "DEEPEP_MEGATRON_CRASH_REPORT": "1",
            **self.env,
        }
        if share_gpu:
            if self._daemon is None:
                self._daemon = start_mps_daemon()
            env.update(self._daemon.env)
        return env

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()
        if self._daemon is not None:
            self._daemon.stop()
            self._daemon = None
