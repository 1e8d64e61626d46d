"""Benchmark of `Buffer` dispatch and combine, with DeepEP's measuring conventions (docs/benchmarking.md).

    python -m deepep_megatron.bench --nproc 8 --num-sms 8 16 24 --json out.json --plot out.png
    python -m deepep_megatron.bench --nproc 8 --low-latency

The benchmark starts its own ranks (a `RankPool`, placed like `deepep_megatron.launch` places
them: CPU ranks on gloo; with one GPU, every rank on GPU 0 under MPS, bootstrapped with gloo; with
several GPUs, one rank per GPU on NCCL) and runs on whichever backend `Buffer` serves.

Normal mode, for each routing and SM count: one fresh dispatch (checked: `combine(dispatch(x))`
must equal `x` times the number of ranks each token reached, in BF16 and in FP8), then timed
cached dispatch of BF16 and FP8 input (the handle is given, as in DeepEP's tuning loop; `--fresh`
times the full dispatch with the layout instead) and combine of the BF16 result.
GB/s per rank = received rows x hidden x 2 bytes / median time (FP8: x (1 + 4/128) / 2; combine
counts the same bytes as dispatch), reported as the minimum and the mean over ranks.

Low-latency mode: `low_latency_dispatch` (FP8) and `low_latency_combine` per call, in µs, with
DeepEP's byte count per valid top-k selection (FP8 dispatch H + H/128*4 + 16, combine 2H), for each
`--num-sms` (default 16). On the GPU also: the same calls replayed from CUDA graphs (GPU time
without Python), the send and receive phases of hook mode separately, a GEMM timed alone and
between a hook-mode send and its hook, and each time against its data-movement floor (the bytes a
rank moves over its share of the one-GPU copy ceiling when ranks share a GPU).

Timing: CUDA events around each call (GPU) or `time.perf_counter` after a barrier (CPU); at least
10 warm-up and 30 timed calls by convention; the median per rank.

Modules: `measures` (byte counts, GB/s, per-op summaries, reference figures), `cases` (what runs
inside each rank), `report` (console table, plot) and `cli` (arguments, placement, the driver).
"""

from __future__ import annotations

from deepep_megatron.bench.measures import (
    FP8_BYTES_FACTOR,
    gbps,
    low_latency_bytes,
    min_mean,
    normal_bytes,
    summarize_low_latency,
    summarize_normal,
)

__all__ = [
    "FP8_BYTES_FACTOR",
    "gbps",
    "low_latency_bytes",
    "min_mean",
    "normal_bytes",
    "summarize_low_latency",
    "summarize_normal",
]
