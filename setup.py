"""Build script: the Python package, plus the CUDA extension `deepep_megatron._C` where it can be
built (torch with CUDA and nvcc present). Elsewhere the package installs without it and the
portable backend serves.

Environment:
    DEEPEP_MEGATRON_BUILD_EXT=0|1   force skipping / building the extension (default: auto)
    TORCH_CUDA_ARCH_LIST            default "9.0" (Hopper)
    NVSHMEM_DIR                     NVSHMEM install; otherwise the pip package nvidia-nvshmem-cu13
                                    is used if present. Without NVSHMEM only intranode kernels build.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def log(message: str) -> None:
    print(f"deepep_megatron setup: {message}", file=sys.stderr)


def find_nvshmem() -> str | None:
    """The NVSHMEM root (with include/ and lib/), from NVSHMEM_DIR or the pip package."""
    if os.environ.get("NVSHMEM_DIR"):
        return os.environ["NVSHMEM_DIR"]
    try:
        import nvidia.nvshmem as nvshmem_package
    except ImportError:
        return None
    root = list(nvshmem_package.__path__)[0]
    return root if os.path.isdir(os.path.join(root, "include")) else None


def pip_cuda_include_dirs() -> list[str]:
    """Headers that CUDA 13 torch wheels ship under nvidia/cu13/include (cusparse.h, ...), which a
    local toolkit may lack."""
    dirs = []
    for entry in sys.path:
        dirs += glob.glob(os.path.join(entry, "nvidia", "cu1*", "include"))
    return sorted(set(dirs))


def extension_modules():
    choice = os.environ.get("DEEPEP_MEGATRON_BUILD_EXT", "auto")
    if choice == "0":
        log("DEEPEP_MEGATRON_BUILD_EXT=0: skipping the CUDA extension (portable backend only)")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        log("torch is not importable at build time: skipping the CUDA extension (portable backend only)")
        return [], {}
    if (
        torch.version.cuda is None
        or CUDA_HOME is None
        or shutil.which("nvcc", path=os.path.join(CUDA_HOME, "bin")) is None
    ):
        message = (
            "torch has no CUDA or nvcc was not found: skipping the CUDA extension (portable backend only)"
        )
        if choice == "1":
            raise RuntimeError(message)
        log(message)
        return [], {}

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    sources = ["csrc/bindings.cpp", "csrc/runtime.cpp", "csrc/arena.cpp"] + sorted(
        glob.glob("csrc/kernels/*.cu")
    )
    include_dirs = [os.path.join(ROOT, "csrc"), *pip_cuda_include_dirs()]
    cxx_flags = ["-O3", "-std=c++17", "-Wno-unused-function"]
    nvcc_flags = [
        "-O3",
        "-std=c++17",
        "-Xptxas=-v" if os.environ.get("DEEPEP_MEGATRON_PTXAS_VERBOSE") else "-lineinfo",
    ]
    define_macros = []
    nvshmem = find_nvshmem()
    if nvshmem is not None:
        # Detected and recorded; the kernels that use NVSHMEM (internode, low-latency) are not in
        # this build yet, so nothing is linked against it.
        define_macros.append(("DEEPEP_MEGATRON_HAS_NVSHMEM", None))
        include_dirs.append(os.path.join(nvshmem, "include"))
        # CUDA 13: host code that includes NVSHMEM headers needs CCCL on the include path.
        include_dirs.append(os.path.join(CUDA_HOME, "include", "cccl"))
        log(f"NVSHMEM found at {nvshmem}")
    else:
        log("NVSHMEM not found: intranode kernels only")
    log(f"building the CUDA extension for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
    extension = CUDAExtension(
        name="deepep_megatron._C",
        sources=sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
    )
    return [extension], {
        "build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)
    }


ext_modules, cmdclass = extension_modules()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
