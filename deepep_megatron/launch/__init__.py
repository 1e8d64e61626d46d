"""A torchrun-like launcher for expert-parallel development on one workstation.

    python -m deepep_megatron.launch --nproc N [--share-gpu auto|yes|no] script.py args...
    python -m deepep_megatron.launch --nproc N -m package.module args...

Placement (`plan_placement`):

- no CUDA: N CPU ranks, gloo;
- CUDA with one visible GPU and N > 1 (or `--share-gpu yes`): all N ranks on GPU 0 under an MPS
  daemon (started in a temporary directory the launcher owns, or an existing one reused), with
  `DEEPEP_MEGATRON_SHARE_GPU=1` so that code bootstraps with gloo (NCCL refuses two ranks on one
  GPU);
- CUDA with at least N GPUs: one rank per GPU (`LOCAL_RANK`), NCCL allowed.

Every rank gets `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, `MASTER_ADDR=127.0.0.1` and
`MASTER_PORT` (a free port), and `OMP_NUM_THREADS=1` unless it is set. The launcher exits with the
first non-zero exit code of any rank (128 + signal for a rank killed by a signal), stops the other
ranks when one fails, says which rank failed, and forwards SIGINT / SIGTERM to all ranks.

It never changes GPU settings (compute mode, clocks, MIG): MPS runs as an ordinary user daemon.
Scripts call `init_distributed()` to join the process group.

Modules: `placement` (where ranks go), `mps` (the MPS daemon), `rank` (what a rank calls:
`init_distributed`), `supervisor` (starting, watching and stopping ranks) and `cli`.
"""

from deepep_megatron.launch.mps import MpsDaemon, MpsUnavailableError, start_mps_daemon
from deepep_megatron.launch.placement import SHARE_GPU_ENV, Placement, plan_placement
from deepep_megatron.launch.rank import free_port, init_distributed
from deepep_megatron.launch.supervisor import launch

__all__ = [
    "SHARE_GPU_ENV",
    "MpsDaemon",
    "MpsUnavailableError",
    "Placement",
    "free_port",
    "init_distributed",
    "launch",
    "plan_placement",
    "start_mps_daemon",
]
