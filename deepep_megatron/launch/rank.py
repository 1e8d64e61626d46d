"""Inside a rank: join the process group the launcher's environment describes."""

from __future__ import annotations

import os
import socket

from deepep_megatron.launch.placement import SHARE_GPU_ENV


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed(backend: str | None = None, timeout_s: float | None = None):
    """Join the process group described by the launcher's environment variables.

    Reads `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT` and
    `DEEPEP_MEGATRON_SHARE_GPU` (defaults: a single rank on a free local port). With CUDA, sets the
    current device (GPU 0 when ranks share a GPU, else `LOCAL_RANK`). The backend is gloo when
    ranks share a GPU or there is no CUDA, else NCCL, unless `backend` says otherwise.

    Returns:
        `(rank, world_size, device)`.
    """
    import datetime

    import torch
    import torch.distributed as dist

    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    if "MASTER_PORT" not in os.environ:
        if world_size != 1:
            raise RuntimeError(
                "MASTER_PORT is not set: start the ranks with python -m deepep_megatron.launch"
            )
        os.environ["MASTER_PORT"] = str(free_port())
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")

    if torch.cuda.is_available():
        num_gpus = torch.cuda.device_count()
        share = os.environ.get(SHARE_GPU_ENV) == "1" or local_world_size > num_gpus
        device = torch.device("cuda", 0 if share else local_rank % num_gpus)
        torch.cuda.set_device(device)
        default_backend = "gloo" if share else "nccl"
    else:
        device = torch.device("cpu")
        default_backend = "gloo"
    if not dist.is_initialized():
        kwargs = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=timeout_s)}
        dist.init_process_group(
            backend or default_backend, rank=rank, world_size=world_size, init_method="env://", **kwargs
        )
    return rank, world_size, device
