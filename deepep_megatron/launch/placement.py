"""Where N ranks run: CPU ranks, all ranks on GPU 0 (under MPS), or one rank per GPU."""

from __future__ import annotations

from dataclasses import dataclass

SHARE_GPU_ENV = "DEEPEP_MEGATRON_SHARE_GPU"  # "1": ranks share GPU 0, so bootstrap with gloo


@dataclass(frozen=True)
class Placement:
    """Where N ranks run and how they talk.

    Attributes:
        device: "cpu" or "cuda".
        share_gpu: all ranks on GPU 0 (under MPS when available); bootstrap with gloo.
        dist_backend: "gloo" or "nccl", the process-group backend ranks should use.
        num_gpus: visible GPUs.
    """

    device: str
    share_gpu: bool
    dist_backend: str
    num_gpus: int

    def gpu_of(self, local_rank: int) -> int | None:
        if self.device != "cuda":
            return None
        return 0 if self.share_gpu else local_rank % self.num_gpus


def _visible_gpus() -> int:
    """Visible CUDA devices, without creating a CUDA context in this process."""
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def plan_placement(nproc: int, share_gpu: str = "auto", num_gpus: int | None = None) -> Placement:
    """Decide the placement of `nproc` ranks.

    Args:
        nproc: number of ranks (>= 1).
        share_gpu: "auto" (share GPU 0 when there is one GPU and several ranks), "yes" (always put
            every rank on GPU 0) or "no" (one rank per GPU; an error if there are too few).
        num_gpus: visible GPUs; default: ask torch (0 without CUDA).

    Raises:
        ValueError: for an impossible request (more ranks than GPUs with "no", "yes" without CUDA).
    """
    if nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}")
    if share_gpu not in ("auto", "yes", "no"):
        raise ValueError(f"--share-gpu must be auto, yes or no, got {share_gpu!r}")
    if num_gpus is None:
        num_gpus = _visible_gpus()
    if num_gpus == 0:
        if share_gpu == "yes":
            raise ValueError("--share-gpu yes needs a CUDA GPU, and none is visible")
        return Placement("cpu", False, "gloo", 0)
    if share_gpu == "yes" or (share_gpu == "auto" and num_gpus == 1 and nproc > 1):
        return Placement("cuda", True, "gloo", num_gpus)
    if nproc > num_gpus:
        raise ValueError(
            f"{nproc} ranks need {nproc} GPUs for one rank per GPU, but {num_gpus} are visible; "
            "use --share-gpu yes to put all ranks on GPU 0"
        )
    return Placement("cuda", False, "nccl", num_gpus)
