"""The compiled extension builds wherever the toolchain allows, even on machines without a GPU, so
CI catches breakage in csrc/ although it cannot run the kernels."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from deepep_megatron.backends import cuda as cuda_backend


def _toolchain_present() -> bool:
    if os.environ.get("DEEPEP_MEGATRON_BUILD_EXT") == "0" or torch.version.cuda is None:
        return False
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    return shutil.which("nvcc") is not None or os.path.exists(os.path.join(cuda_home, "bin", "nvcc"))


@pytest.mark.skipif(not _toolchain_present(), reason="no CUDA toolchain: the extension is not built here")
def test_extension_is_built_and_importable():
    assert cuda_backend.extension_available(), "nvcc and a CUDA torch are present, so setup.py must build _C"
    from deepep_megatron import _C

    assert _C.MAX_RANKS == 8
    assert issubclass(_C.DeviceTimeout, TimeoutError)
    for method in ("layout", "dispatch", "combine", "check_health", "ipc_handle", "open_peers"):
        assert hasattr(_C.IntranodeRuntime, method)


def test_buffer_falls_back_to_portable_without_cuda_tensors():
    reason = cuda_backend.unavailable_reason(4, 4, 1 << 20)
    if not torch.cuda.is_available():
        assert reason is not None
    assert cuda_backend.unavailable_reason(16, 8, 1 << 20) is not None  # internode: no NVSHMEM kernels
    assert cuda_backend.unavailable_reason(4, 4, 0) is not None
