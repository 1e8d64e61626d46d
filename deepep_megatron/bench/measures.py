"""What the benchmark counts: bytes per call, GB/s, per-op summaries over ranks, and DeepEP V1's
reference figures on the same harness (docs/benchmarking.md)."""

from __future__ import annotations

import statistics

FP8_BYTES_FACTOR = (1 + 4 / 128) / 2
"""FP8 bytes per BF16 byte: one byte per channel plus one float32 scale per 128 channels."""

MIN_WARMUP, MIN_ITERS = 10, 30
"""docs/benchmarking.md: at least this many warm-up and timed calls."""

GROUP_LIMITED = {"num_groups": 8, "topk_groups": 4}

# docs/benchmarking.md: DeepEP V1.2.1 on the one-GPU harness (4096 tokens, hidden 7168, top-8 of 256), GB/s
# per rank, keyed by (ranks, SMs per rank) -> (dispatch BF16, dispatch FP8, combine BF16).
DEEPEP_V1_REFERENCE = {
    (2, 16): (204, 137, 179),
    (2, 24): (275, 190, 245),
    (2, 64): (459, 355, 418),
    (4, 8): (87, 85, 126),
    (4, 16): (170, 162, 209),
    (4, 32): (227, 222, 270),
    (8, 8): (113, 104, 119),
    (8, 16): (123, 117, 140),
}
NORMAL_OPS = ("dispatch_bf16", "dispatch_fp8", "combine_bf16")
LOW_LATENCY_OPS = ("low_latency_dispatch_fp8", "low_latency_combine_bf16")
LOW_LATENCY_GPU_OPS = (
    "ll_graph_dispatch_fp8",
    "ll_graph_combine_bf16",
    "ll_hook_dispatch_send",
    "ll_hook_dispatch_recv",
    "ll_hook_combine_send",
    "ll_hook_combine_recv",
    "gemm_alone",
    "gemm_between_send_and_hook",
)
"""Measured on the GPU besides LOW_LATENCY_OPS: CUDA-graph replays of each call and of each
hook phase, and a GEMM alone vs between a hook-mode send and its hook."""
ONE_GPU_COPY_GBPS = 2116.0
"""docs/benchmarking.md: aggregate one-copy payload ceiling of one H200 (a device-to-device copy
moves 4232 GB/s counting reads and writes); ranks sharing the GPU share it."""
OP_LABELS = {
    "dispatch_bf16": "dispatch BF16",
    "dispatch_fp8": "dispatch FP8",
    "combine_bf16": "combine BF16",
    "nccl_all_to_all_bf16": "NCCL all_to_all BF16",
    "low_latency_dispatch_fp8": "LL dispatch FP8",
    "low_latency_combine_bf16": "LL combine BF16",
    "ll_graph_dispatch_fp8": "LL dispatch FP8 (graph)",
    "ll_graph_combine_bf16": "LL combine BF16 (graph)",
    "ll_hook_dispatch_send": "LL dispatch send (hook, graph)",
    "ll_hook_dispatch_recv": "LL dispatch hook recv (graph)",
    "ll_hook_combine_send": "LL combine send (hook, graph)",
    "ll_hook_combine_recv": "LL combine hook recv (graph)",
    "gemm_alone": "GEMM alone",
    "gemm_between_send_and_hook": "GEMM between send and hook",
}

SHAPE_DEFAULTS = {
    # (mode, device): (num_tokens, hidden, num_experts, num_topk)
    ("normal", "cuda"): (4096, 7168, 256, 8),
    ("normal", "cpu"): (256, 1024, 256, 8),
    ("low_latency", "cuda"): (128, 7168, 256, 8),
    ("low_latency", "cpu"): (64, 1024, 256, 8),
}


# ------------------------------------------------------------------------ arithmetic (pure functions)
def normal_bytes(num_recv_rows: int, hidden: int, fp8: bool = False) -> float:
    """Bytes a normal dispatch (or its combine) moves to/from one rank: received rows x hidden x
    2 bytes, times (1 + 4/128) / 2 for FP8."""
    num_bytes = float(num_recv_rows) * hidden * 2
    return num_bytes * FP8_BYTES_FACTOR if fp8 else num_bytes


def low_latency_bytes(num_selections: int, hidden: int, op: str) -> float:
    """Bytes one rank's low-latency call moves: per valid top-k selection, H + H/128*4 + 16 for
    the FP8 dispatch ("dispatch"), 2H for the BF16 combine ("combine")."""
    if op == "dispatch":
        return float(num_selections) * (hidden + hidden / 128 * 4 + 16)
    if op == "combine":
        return float(num_selections) * hidden * 2
    raise ValueError(f"op must be 'dispatch' or 'combine', got {op!r}")


def low_latency_kind(op: str) -> str | None:
    """Which byte count an op's time is measured against: "dispatch", "combine" or None (GEMM)."""
    if op.startswith("gemm"):
        return None
    return "dispatch" if "dispatch" in op else "combine"


def floor_us(num_bytes: float, ranks_sharing_gpu: int) -> float:
    """µs to move `num_bytes` once through this rank's share of the one-GPU copy ceiling."""
    return num_bytes / (ONE_GPU_COPY_GBPS * 1e9 / max(1, ranks_sharing_gpu)) * 1e6


def gbps(num_bytes: float, seconds: float) -> float:
    """GB/s with GB = 1e9 bytes (DeepEP's convention)."""
    if seconds <= 0:
        raise ValueError(f"time must be positive, got {seconds}")
    return num_bytes / seconds / 1e9


def min_mean(values: list[float]) -> tuple[float, float]:
    """The minimum and the mean over ranks."""
    return min(values), sum(values) / len(values)


def mean_of(values: list[float]) -> float:
    return sum(values) / len(values)


def _median(values: list[float]) -> float:
    return statistics.median(values)


def summarize_normal(rank_results: list[dict], hidden: int) -> list[dict]:
    """Per-op numbers of one case from every rank's result."""
    rows = []
    for op in NORMAL_OPS:
        medians = [_median(r["times_s"][op]) for r in rank_results]
        per_rank = [
            gbps(normal_bytes(r["recv_rows"], hidden, fp8=op == "dispatch_fp8"), t)
            for r, t in zip(rank_results, medians)
        ]
        low, mean = min_mean(per_rank)
        row = {
            "op": op,
            "median_s": medians,
            "gbps": per_rank,
            "gbps_min": low,
            "gbps_mean": mean,
            "times_s": [r["times_s"][op] for r in rank_results],
        }
        if rank_results[0].get("network_bytes"):
            # Groups spanning nodes: the bytes that cross nodes per rank, and their rate.
            network = [r["network_bytes"][op] for r in rank_results]
            rdma = [gbps(b, t) for b, t in zip(network, medians)]
            row.update(
                network_bytes=network, rdma_gbps=rdma, rdma_gbps_min=min(rdma), rdma_gbps_mean=mean_of(rdma)
            )
        rows.append(row)
    if rank_results[0].get("nccl_baseline") is not None:
        medians = [_median(r["nccl_baseline"]) for r in rank_results]
        per_rank = [gbps(normal_bytes(r["recv_rows"], hidden), t) for r, t in zip(rank_results, medians)]
        low, mean = min_mean(per_rank)
        rows.append(
            {
                "op": "nccl_all_to_all_bf16",
                "median_s": medians,
                "gbps": per_rank,
                "gbps_min": low,
                "gbps_mean": mean,
                "times_s": [r["nccl_baseline"] for r in rank_results],
            }
        )
    return rows


def summarize_low_latency(rank_results: list[dict], hidden: int) -> list[dict]:
    """Per-op numbers of one case; against its bytes where the op moves data, and, where ranks
    share a GPU, against the floor: one copy of those bytes through this rank's share of the GPU's
    copy ceiling (the rest of the time is synchronisation, launches and extra passes)."""
    rows = []
    sharing = rank_results[0].get("ranks_sharing_gpu", 1)
    for op in rank_results[0]["times_s"]:
        kind = low_latency_kind(op)
        medians = [_median(r["times_s"][op]) for r in rank_results]
        us_min, us_mean = min_mean([t * 1e6 for t in medians])
        row = {
            "op": op,
            "median_s": medians,
            "us_min": us_min,
            "us_mean": us_mean,
            "us_max": max(medians) * 1e6,
            "times_s": [r["times_s"][op] for r in rank_results],
        }
        if kind is not None:
            num_bytes = [low_latency_bytes(r["num_selections"], hidden, kind) for r in rank_results]
            per_rank = [gbps(b, t) for b, t in zip(num_bytes, medians)]
            row["gbps"] = per_rank
            row["gbps_min"], row["gbps_mean"] = min_mean(per_rank)
            if sharing > 1:
                row["floor_us"] = floor_us(sum(num_bytes) / len(num_bytes), sharing)
                row["data_share"] = row["floor_us"] / us_mean
        rows.append(row)
    return rows
