"""Build script: the Python package, plus the CUDA extension `deepep_megatron._C` where it can be
built against the torch already installed. Elsewhere the pure-Python package installs, with one
line saying why and how to build, and the portable backend serves.

Building the extension needs torch importable at build time, so pip must not isolate the build:

    pip install --no-build-isolation -e .

With build isolation (plain `pip install .`), pip's build environment has no torch: the extension
is skipped, never pulled in against a torch you did not choose.

Environment:
    DEEPEP_MEGATRON_BUILD_EXT=0|1   skip the extension / make any failure to build it an error
                                    (default: auto, build where torch has CUDA and nvcc exists,
                                    and install without it, saying why, where that fails)
    TORCH_CUDA_ARCH_LIST            default "9.0" (Hopper)
    CUDA_HOME                       the toolkit with nvcc (torch's default lookup otherwise)
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
CHOICE = os.environ.get("DEEPEP_MEGATRON_BUILD_EXT", "auto")
HOW_TO_BUILD = (
    "to build it, run `pip install --no-build-isolation -e .` where torch with CUDA and nvcc are "
    "installed (DEEPEP_MEGATRON_BUILD_EXT=1 makes a failed build an error)"
)


# pip runs setup.py once per build step; the steps that only read metadata stay quiet, so the
# build says what it decided once.
METADATA_ONLY = {"egg_info", "dist_info", "sdist"}
BUILDS = {"build", "build_ext", "bdist_wheel", "editable_wheel", "develop", "install"}
QUIET = bool(METADATA_ONLY & set(sys.argv)) and not BUILDS & set(sys.argv)


def log(message: str) -> None:
    if not QUIET:
        print(f"deepep_megatron setup: {message}", file=sys.stderr, flush=True)


def skip_extension(reason: str) -> tuple[list, dict]:
    """The pure-Python package, with one line that says why and how to build (an error where the
    extension was required)."""
    if CHOICE == "1":
        raise RuntimeError(f"deepep_megatron setup: DEEPEP_MEGATRON_BUILD_EXT=1 but {reason}")
    log(f"CUDA extension not built ({reason}); installing the pure-Python package; {HOW_TO_BUILD}")
    return [], {}


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


def extension_sources() -> list[str]:
    """Every .cpp and .cu under csrc/, by folder: a new family's folder needs no edit here."""
    found = glob.glob("csrc/**/*.cpp", recursive=True) + glob.glob("csrc/**/*.cu", recursive=True)
    return sorted(found)


def optional_build_ext(base):
    """`base` (torch's BuildExtension) that, in auto mode, turns a failed compile into the
    pure-Python install with the one line, instead of a failed install."""

    class OptionalBuildExt(base):
        def run(self):
            try:
                super().run()
            except Exception as error:  # a compiler error, a missing header, ninja failing
                if CHOICE == "1":
                    raise
                first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
                skip_extension(f"the build failed: {first_line}")
                # Nothing to install or link: the package is pure Python from here on.
                self.extensions = []
                self.distribution.ext_modules = []

    return OptionalBuildExt


def extension_modules() -> tuple[list, dict]:
    if CHOICE == "0":
        log("DEEPEP_MEGATRON_BUILD_EXT=0: skipping the CUDA extension (portable backend only)")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return skip_extension("torch is not importable at build time, as in pip's isolated build environment")
    if torch.version.cuda is None:
        return skip_extension(f"torch {torch.__version__} has no CUDA")
    if CUDA_HOME is None or shutil.which("nvcc", path=os.path.join(CUDA_HOME, "bin")) is None:
        return skip_extension("nvcc was not found (set CUDA_HOME)")

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
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
        sources=extension_sources(),
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
    )
    build_ext = BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)
    return [extension], {"build_ext": optional_build_ext(build_ext)}


ext_modules, cmdclass = extension_modules()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
