"""The compiled extension `deepep_megatron._C`, if it was built, and why not otherwise.

The extension declares its limits in `csrc/common/limits.h`; an extension whose numbers differ
from `deepep_megatron.limits` (a stale build) is treated as not built, with the reason.
"""

from __future__ import annotations

import deepep_megatron.limits as limits

_SHARED_LIMITS = ("FP8_BLOCK_SIZE", "MAX_TOPK", "MAX_RANKS_PER_NODE", "MAX_LOCAL_EXPERTS", "REGION_ALIGNMENT")


def _load():
    try:
        import deepep_megatron._C as _C
    except ImportError as error:  # not built on this machine
        return None, (
            f"the compiled extension is not built ({error}); "
            "build it with `pip install --no-build-isolation -e .`"
        )
    disagree = [
        f"{name}: extension {getattr(_C, name, 'missing')}, Python {getattr(limits, name)}"
        for name in _SHARED_LIMITS
        if getattr(_C, name, None) != getattr(limits, name)
    ]
    if disagree:
        return None, "the compiled extension is stale (limits differ: " + "; ".join(
            disagree
        ) + "); rebuild it"
    return _C, None


module, unavailable_reason = _load()


def extension_available() -> bool:
    return module is not None


def has_nvshmem() -> bool:
    """Whether the extension was built with NVSHMEM (the low-latency and internode families)."""
    return module is not None and bool(getattr(module, "HAS_NVSHMEM", False))


def fill_args(cls, **fields):
    """An argument struct of a compiled module (`_C.FreshDispatchArgs`, ...) with its fields set by
    name (the structs are plain pybind11 classes with a default constructor)."""
    args = cls()
    for name, value in fields.items():
        setattr(args, name, value)
    return args
