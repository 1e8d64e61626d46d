"""Every limit of the library, declared once.

The compiled kernels declare the same numbers in `csrc/common/limits.h` and export them;
`backends.extension` refuses an extension whose numbers differ, so the two cannot drift apart.
Every backend, the portable one included, enforces them, so a program that runs on one runs on
all.
"""

import os

FP8_BLOCK_SIZE = 128
"""Channels per FP8 scale: one float32 scale per 128 e4m3 values of a row."""

MAX_TOPK = 16
"""Largest top-k a dispatch takes."""

MAX_RANKS_PER_NODE = 8
"""Largest NVLink domain of the intranode kernels (ranks that map each other's memory)."""

MAX_NODES = 16
"""Largest number of nodes (groups of `num_ranks_per_node` ranks) the internode kernels serve; with
MAX_RANKS_PER_NODE it bounds their group at 128 ranks (per-node signal words, row tables)."""

MAX_LOCAL_EXPERTS = 1024
"""Largest number of experts per rank (the kernels exchange per-expert counts in fixed slots)."""

REGION_ALIGNMENT = 256
"""Alignment in bytes of every sub-array of a registered region (16-byte vector stores, TMA)."""

WAIT_TIMEOUT_ENV = "DEEPEP_MEGATRON_TIMEOUT_S"
DEFAULT_WAIT_TIMEOUT_S = 100.0
"""Bound in seconds on the device-side waits of one compiled-kernel operation (every family),
unless `DEEPEP_MEGATRON_TIMEOUT_S` says otherwise."""


def wait_timeout_seconds() -> float:
    """The bound on every device-side wait of an operation, read when a runtime is created."""
    return float(os.environ.get(WAIT_TIMEOUT_ENV, DEFAULT_WAIT_TIMEOUT_S))
