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
    DEEPEP_MEGATRON_EXTENSIONS      which modules to build, comma-separated (default "_C,_nvshmem")
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
    """Every .cpp and .cu under csrc/, by folder: a new family's folder needs no edit here. The
    NVSHMEM families' sources (`nvshmem_sources`) build into their own module."""
    found = glob.glob("csrc/**/*.cpp", recursive=True) + glob.glob("csrc/**/*.cu", recursive=True)
    return sorted(set(found) - (set(nvshmem_sources()) - set(SHARED_SOURCES)))


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
        # Recorded for _C; the kernels that use NVSHMEM build into their own module (below), so
        # _C links nothing of it.
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
    wanted = os.environ.get("DEEPEP_MEGATRON_EXTENSIONS", "_C,_nvshmem").split(",")
    extensions = [extension] if "_C" in wanted else []
    if nvshmem is not None and "_nvshmem" in wanted:
        if shutil.which("ninja") is None:
            log("ninja not found: skipping the NVSHMEM kernels (their device link step needs it)")
        else:
            extensions.append(nvshmem_extension(CUDAExtension, nvshmem, CUDA_HOME, cxx_flags, nvcc_flags))
    build_ext = serial_build_ext(BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None))
    return extensions, {"build_ext": optional_build_ext(build_ext)}


# ---------------------------------------------------------------- NVSHMEM families (`_nvshmem`)
NVSHMEM_MODULE = "deepep_megatron._nvshmem"
TORCH_DISABLED_HALF_MACROS = (
    "__CUDA_NO_HALF_OPERATORS__",
    "__CUDA_NO_HALF_CONVERSIONS__",
    "__CUDA_NO_HALF2_OPERATORS__",
    "__CUDA_NO_BFLOAT16_CONVERSIONS__",
)


# Host sources both modules compile (each module keeps its own copy: the timeout messages and the
# registry of wait phases).
SHARED_SOURCES = ("csrc/common/diagnostics.cpp",)


def nvshmem_sources() -> list[str]:
    """The NVSHMEM families' sources: their module, the NVSHMEM transport, the family folders and
    the shared host sources."""
    found = ["csrc/nvshmem_module.cpp", *SHARED_SOURCES]
    for pattern in ("csrc/transport/nvshmem*", "csrc/low_latency/*", "csrc/internode/*"):
        found += glob.glob(f"{pattern}.cpp") + glob.glob(f"{pattern}.cu")
    return sorted(found)


def serial_build_ext(base):
    """`base` building the extensions one after the other (`build_ext -j` still compiles each
    one's files in parallel through ninja: torch writes each extension's build.ninja into the one
    shared build_temp, so two at once would mix their builds). In auto mode a failed NVSHMEM
    module is skipped with one line and `_C` still installs."""

    class SerialBuildExt(base):
        def build_extensions(self):
            self.parallel = None
            super().build_extensions()

        def build_extension(self, ext):
            if ext.name != NVSHMEM_MODULE or CHOICE == "1":
                return super().build_extension(ext)
            try:
                super().build_extension(ext)
            except Exception as error:
                first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
                log(f"NVSHMEM kernels not built ({first_line}); the portable backend serves low-latency mode")

    return SerialBuildExt


def nvshmem_extension(CUDAExtension, nvshmem: str, cuda_home: str, cxx_flags: list, nvcc_flags: list):
    """`deepep_megatron._nvshmem`: the kernel families that use NVSHMEM, in their own module so that
    `_C` never depends on NVSHMEM. Device code is relocatable (-rdc) and device-linked with
    libnvshmem_device.a; its symbols stay hidden in this module (--exclude-libs), so the device
    state the kernels read is this module's, not that of another NVSHMEM copy in the process (torch
    ships one). The host library is found through an rpath."""
    lib = os.path.join(nvshmem, "lib")
    arch_list = os.environ["TORCH_CUDA_ARCH_LIST"].replace(";", " ").split()
    arches = [arch.split("+")[0].replace(".", "") for arch in arch_list]
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in arches]
    return CUDAExtension(
        name=NVSHMEM_MODULE,
        sources=nvshmem_sources(),
        include_dirs=[
            os.path.join(ROOT, "csrc"),
            os.path.join(nvshmem, "include"),
            os.path.join(cuda_home, "include", "cccl"),
            *pip_cuda_include_dirs(),
        ],
        library_dirs=[lib],
        extra_compile_args={
            "cxx": cxx_flags,
            # NVSHMEM's device headers use the half/bf16 operators torch's flags switch off.
            "nvcc": [*nvcc_flags, "-rdc=true", *(f"-U{flag}" for flag in TORCH_DISABLED_HALF_MACROS)],
            "nvcc_dlink": ["-dlink", *gencode, f"-L{lib}", "-lnvshmem_device"],
        },
        extra_link_args=[
            "-l:libnvshmem_host.so.3",
            "-l:libnvshmem_device.a",
            "-Wl,--exclude-libs,libnvshmem_device.a",
            f"-Wl,-rpath,{lib}",
        ],
    )


ext_modules, cmdclass = extension_modules()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
