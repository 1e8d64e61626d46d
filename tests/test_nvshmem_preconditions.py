"""The NVSHMEM families are refused, with the reason, where NVSHMEM would end the process: several
ranks on one GPU with no MPS daemon (NVSHMEM's init then calls exit). Seen on the GPU machine with
a CPU test's two ranks, which share GPU 0 without MPS."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from deepep_megatron import mps
from deepep_megatron.backends import nvshmem


def test_ranks_sharing_a_gpu_need_a_running_mps_daemon(monkeypatch, tmp_path):
    monkeypatch.setattr(nvshmem, "module", SimpleNamespace())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(mps, "DEFAULT_MPS_PIPE_DIRECTORY", str(tmp_path / "no-default-daemon"))
    monkeypatch.setenv(mps.MPS_PIPE_DIRECTORY_ENV, str(tmp_path))

    assert nvshmem.unavailable_reason(ranks_per_gpu=1) is None  # one rank per GPU: no MPS needed
    reason = nvshmem.unavailable_reason(ranks_per_gpu=4)
    assert reason is not None and "4 ranks share this GPU without MPS" in reason

    (tmp_path / "control").touch()  # a daemon's control pipe
    assert mps.control_pipe_directory() == str(tmp_path)
    assert nvshmem.unavailable_reason(ranks_per_gpu=4) is None
