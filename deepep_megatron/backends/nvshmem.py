"""The process's NVSHMEM job, shared by the kernel families that use NVSHMEM (low-latency now,
internode next), and the symmetric blocks their buffers live in.

- **Module.** `deepep_megatron._nvshmem` is built only where NVSHMEM was found (setup.py); without
  it, `unavailable_reason()` says why and the portable backend serves.
- **Bootstrap.** NVSHMEM is initialised once per process, from a unique id that rank 0 of the
  Buffer's group creates and sends over that torch.distributed group. So it works the same under
  torchrun, SLURM or this package's launcher, across nodes, and with several PEs on one GPU under
  MPS (where the group is gloo). A process joins one NVSHMEM job: a Buffer of another group is
  refused with the reason.
- **Environment.** Before the first init, variables the user has not set are given defaults that
  fit the group (`NVSHMEM_DEFAULTS` documents each); the user's settings always win.
- **Blocks.** A Buffer takes one symmetric block (`nvshmem_malloc`, collective). A dropped Buffer
  returns its block to a per-process pool without any collective call (garbage collection cannot
  wait for peers); a later Buffer reuses a block that every rank has returned, so allocations stay
  symmetric. `Buffer.destroy()` (collective) releases the pool and, when no block is in use on
  any rank, finalizes NVSHMEM; a later Buffer initialises it again.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from deepep_megatron.mps import control_pipe_directory


def _load():
    try:
        import deepep_megatron._nvshmem as _nvshmem
    except ImportError as error:
        return None, (
            f"the NVSHMEM kernels are not built ({error}); "
            "build with NVSHMEM (pip nvidia-nvshmem-cu13, or NVSHMEM_DIR)"
        )
    return _nvshmem, None


module, _import_error = _load()

MIB = 1 << 20

NVSHMEM_DEFAULTS = {
    # NVSHMEM's own collectives are not used (and NCCL refuses several ranks on one GPU).
    "NVSHMEM_DISABLE_NCCL": "1",
    # No multicast objects: nothing here uses them, and on shared hosts they are unsafe.
    "NVSHMEM_DISABLE_NVLS": "1",
}


def unavailable_reason(ranks_per_gpu: int = 1) -> str | None:
    """Why the NVSHMEM families cannot run in this process, or None. `ranks_per_gpu`: ranks of
    the group on this rank's GPU (NVSHMEM exits the process when several run there without MPS)."""
    if module is None:
        return _import_error
    if not torch.cuda.is_available():
        return "CUDA is not available"
    if ranks_per_gpu > 1 and control_pipe_directory() is None:
        return (
            f"{ranks_per_gpu} ranks share this GPU without MPS, which NVSHMEM needs for that (start "
            "nvidia-cuda-mps-control -d before CUDA is used, or run under python -m deepep_megatron.launch)"
        )
    return None


@dataclass
class SymmetricBlock:
    """One symmetric allocation: the same `num_bytes` at the same offset on every rank."""

    block_id: int
    address: int
    num_bytes: int
    in_use: bool = True

    def peer_address(self, pe: int) -> int:
        """This block of PE `pe` mapped into this process, or 0 when only puts reach it."""
        return module.peer_address(self.address, pe)


class _Job:
    """This process's membership of an NVSHMEM job (one per process)."""

    def __init__(self):
        self.members: tuple[int, ...] | None = None
        self.blocks: dict[int, SymmetricBlock] = {}
        self.next_block_id = 0
        self.probed = False


_job = _Job()


def _group_ranks(group: dist.ProcessGroup) -> tuple[int, ...]:
    return tuple(dist.get_process_group_ranks(group))


def _set_environment(group: dist.ProcessGroup, num_rdma_bytes: int, ranks_per_gpu: int) -> None:
    """Defaults for what the user left unset, decided identically on every rank."""
    hosts: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(hosts, socket.gethostname(), group=group)
    defaults = dict(NVSHMEM_DEFAULTS)
    # Heap: enough for two buffers of this size (a Buffer rebuilt while the old one is alive).
    defaults["NVSHMEM_SYMMETRIC_SIZE"] = str(max(2 * num_rdma_bytes + 512 * MIB, 1024 * MIB))
    if len(set(hosts)) == 1:
        # One host: every peer is reached through CUDA P2P (emulated nodes included), no NIC is
        # needed, and the bootstrap stays on the loopback interface.
        defaults["NVSHMEM_REMOTE_TRANSPORT"] = "none"
        defaults["NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME"] = "lo"
    if ranks_per_gpu > 1:
        # Several PEs on one GPU under MPS: NVSHMEM's barriers (used by malloc/free) need its
        # "full" mode; our kernels size their grids so that every rank's blocks fit together.
        defaults["NVSHMEM_IGNORE_CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = "1"
    for name, value in defaults.items():
        os.environ.setdefault(name, value)


def join(group: dist.ProcessGroup, num_rdma_bytes: int, ranks_per_gpu: int) -> None:
    """Collective over `group`: make this process a PE of the group's NVSHMEM job (PE = rank in
    the group). A no-op when it already is; RuntimeError when it belongs to another group's job."""
    ranks = _group_ranks(group)
    if _job.members is not None:
        if _job.members != ranks:
            raise RuntimeError(
                f"this process already belongs to the NVSHMEM job of ranks {list(_job.members)}; one "
                f"process joins one job, so a Buffer over ranks {list(ranks)} cannot use the NVSHMEM kernels "
                "(destroy() the other Buffers first, or use backend='portable')"
            )
        return
    _set_environment(group, num_rdma_bytes, ranks_per_gpu)
    unique_id = [module.create_unique_id() if dist.get_rank(group) == 0 else None]
    dist.broadcast_object_list(unique_id, src=ranks[0], group=group)
    module.init(unique_id[0], dist.get_rank(group), len(ranks))
    _job.members = ranks


def acquire(group: dist.ProcessGroup, num_bytes: int) -> SymmetricBlock:
    """Collective: a symmetric block of at least `num_bytes`, reused from the pool when every
    rank has returned one that large, else newly allocated."""
    free = sorted(b.block_id for b in _job.blocks.values() if not b.in_use and b.num_bytes >= num_bytes)
    everyone: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, free, group=group)
    common = set(everyone[0]).intersection(*map(set, everyone[1:]))
    if common:
        block = _job.blocks[min(common)]
        block.in_use = True
    else:
        block = SymmetricBlock(_job.next_block_id, module.allocate(num_bytes), num_bytes)
        _job.blocks[block.block_id] = block
        _job.next_block_id += 1
    if not _job.probed:
        problem = module.probe(block.address)
        if problem:
            raise RuntimeError(f"deepep_megatron: NVSHMEM is not usable from the kernels: {problem}")
        _job.probed = True
    return block


def release(block: SymmetricBlock) -> None:
    """Local: give a block back to the pool (no collective call; safe from garbage collection)."""
    block.in_use = False


def shutdown(group: dist.ProcessGroup) -> bool:
    """Collective: free the pooled blocks and finalize NVSHMEM if no rank still uses a block.
    Returns whether NVSHMEM was finalized."""
    if _job.members is None:
        return False
    in_use = sum(b.in_use for b in _job.blocks.values())
    everyone: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, in_use, group=group)
    if any(everyone):
        return False
    torch.cuda.synchronize()
    for block_id in sorted(_job.blocks):  # the same blocks, in the same order, on every rank
        module.release(_job.blocks[block_id].address)
    _job.blocks.clear()
    module.finalize()
    _job.members = None
    _job.probed = False
    return True


def release_runtime(runtime, block: SymmetricBlock, group: dist.ProcessGroup, collective: bool) -> None:
    """End an NVSHMEM family's runtime and give its symmetric block back.

    `collective` (Buffer.destroy): wait for every rank first, and finalize NVSHMEM when no buffer
    of this process uses it any more. Otherwise (garbage collection) the block only goes back to
    this process's pool: freeing symmetric memory is collective."""
    if collective:
        torch.cuda.synchronize()
        dist.barrier(group=group)
    failed = _has_failed(runtime)
    runtime.destroy()
    if not failed:
        release(block)
    # else: a peer that gave up later may still put into or signal the block, and a new Buffer
    # that reused it would count those stray arrivals: it stays in use, so NVSHMEM (whose
    # shutdown every rank still joins) is not finalized under it either.
    if collective:
        shutdown(group)


def _has_failed(runtime) -> bool:
    """Whether a wait of this runtime timed out (its `check_health` raises TimeoutError)."""
    try:
        runtime.check_health()
    except TimeoutError:
        return True
    return False
