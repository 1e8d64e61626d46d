"""Where this process would find the MPS control daemon that lets several ranks share one GPU.

The library only asks whether one listens (the NVSHMEM families need MPS when ranks share a
GPU); starting a daemon is the launcher's job (`deepep_megatron.launch.mps`).
"""

from __future__ import annotations

import os

DEFAULT_MPS_PIPE_DIRECTORY = "/tmp/nvidia-mps"
MPS_PIPE_DIRECTORY_ENV = "CUDA_MPS_PIPE_DIRECTORY"


def candidate_pipe_directories() -> list[str]:
    """Where CUDA looks for the daemon, in order: `$CUDA_MPS_PIPE_DIRECTORY`, then the default."""
    return [d for d in (os.environ.get(MPS_PIPE_DIRECTORY_ENV), DEFAULT_MPS_PIPE_DIRECTORY) if d]


def control_pipe_directory() -> str | None:
    """The first candidate directory that holds a daemon's control pipe, or None (no daemon;
    a stale pipe of a stopped daemon also counts, which only the daemon itself can rule out)."""
    for pipe_dir in candidate_pipe_directories():
        if os.path.exists(os.path.join(pipe_dir, "control")):
            return pipe_dir
    return None
