"""Benchmark of `Buffer` dispatch and combine, with DeepEP's measuring conventions (DESIGN.md §4).

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
DeepEP's byte count per valid top-k selection (FP8 dispatch H + H/128*4 + 16, combine 2H).

Timing: CUDA events around each call (GPU) or `time.perf_counter` after a barrier (CPU); at least
10 warm-up and 30 timed calls by convention; the median per rank.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from functools import partial

FP8_BYTES_FACTOR = (1 + 4 / 128) / 2
"""FP8 bytes per BF16 byte: one byte per channel plus one float32 scale per 128 channels."""

MIN_WARMUP, MIN_ITERS = 10, 30
"""DESIGN.md §4: at least this many warm-up and timed calls."""

GROUP_LIMITED = {"num_groups": 8, "topk_groups": 4}

# DESIGN.md §5: DeepEP V1.2.1 on the one-GPU harness (4096 tokens, hidden 7168, top-8 of 256), GB/s
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
OP_LABELS = {
    "dispatch_bf16": "dispatch BF16",
    "dispatch_fp8": "dispatch FP8",
    "combine_bf16": "combine BF16",
    "nccl_all_to_all_bf16": "NCCL all_to_all BF16",
    "low_latency_dispatch_fp8": "LL dispatch FP8",
    "low_latency_combine_bf16": "LL combine BF16",
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


def gbps(num_bytes: float, seconds: float) -> float:
    """GB/s with GB = 1e9 bytes (DeepEP's convention)."""
    if seconds <= 0:
        raise ValueError(f"time must be positive, got {seconds}")
    return num_bytes / seconds / 1e9


def min_mean(values: list[float]) -> tuple[float, float]:
    """The minimum and the mean over ranks."""
    return min(values), sum(values) / len(values)


# ---------------------------------------------------------------------------------- rank side
# Everything below down to the driver runs inside the rank processes of a RankPool.
_RANK_STATE: dict = {}


def _dist():
    import torch.distributed as dist

    return dist


def _device():
    import torch

    return (
        torch.device("cuda", torch.cuda.current_device())
        if _RANK_STATE["device"] == "cuda"
        else torch.device("cpu")
    )


def _barrier() -> None:
    import torch

    dist = _dist()
    if _RANK_STATE["device"] == "cuda":
        torch.cuda.synchronize()
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def _all_gather_ints(values: list[int]) -> list[list[int]]:
    """Gather a short int list from every rank (on the host, whatever the backend)."""
    import torch

    dist = _dist()
    tensor = torch.tensor(values, dtype=torch.int64)
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor)
    return [t.cpu().tolist() for t in gathered]


def rank_info(device: str) -> dict:
    """Facts about a rank's process: device name, SM count, torch version, process-group backend."""
    import torch

    _RANK_STATE["device"] = device
    info = {
        "torch": torch.__version__,
        "dist_backend": _dist().get_backend(),
        "python": platform.python_version(),
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        info.update(
            device_name=props.name,
            num_device_sms=props.multi_processor_count,
            cuda=torch.version.cuda,
            device_index=torch.cuda.current_device(),
        )
    else:
        info.update(device_name=f"CPU ({platform.machine() or 'unknown'})", num_device_sms=None)
    return info


def _buffer(
    backend: str, num_nvl_bytes: int, num_rdma_bytes: int = 0, low_latency: bool = False, num_qps: int = 1
):
    """One Buffer per rank process and configuration (they are reused across cases)."""
    from deepep_megatron import Buffer

    key = (backend, num_nvl_bytes, num_rdma_bytes, low_latency)
    buffers = _RANK_STATE.setdefault("buffers", {})
    if key not in buffers:
        buffers[key] = Buffer(
            None,
            num_nvl_bytes,
            num_rdma_bytes,
            low_latency_mode=low_latency,
            num_qps_per_rank=num_qps,
            backend=backend,
        )
    return buffers[key]


def _routing(spec: dict, num_tokens: int, generator, device):
    from deepep_megatron.routing import random_routing

    groups = GROUP_LIMITED if spec["routing"] == "group-limited" else {}
    return random_routing(
        num_tokens,
        spec["num_experts"],
        spec["num_topk"],
        generator=generator,
        device=device,
        num_groups=groups.get("num_groups"),
        topk_groups=groups.get("topk_groups"),
    )


def _inputs(spec: dict, num_tokens: int):
    import torch

    rank = _dist().get_rank()
    device = _device()
    generator = torch.Generator(device=device).manual_seed(spec["seed"] * 1009 + rank)
    x = torch.randn((num_tokens, spec["hidden"]), generator=generator, device=device).to(torch.bfloat16)
    topk_idx, topk_weights = _routing(spec, num_tokens, generator, device)
    return x, topk_idx, topk_weights


def _time_calls(fn, warmup: int, iters: int) -> list[float]:
    """Seconds per call of `fn` (which should do nothing but the measured call)."""
    import torch

    for _ in range(warmup):
        fn()
    if _RANK_STATE["device"] == "cuda":
        flush = torch.empty(int(256e6 // 4), dtype=torch.int32, device=_device())  # L2, as DeepEP does
        flush.zero_()
        del flush
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        _barrier()
        for start, end in zip(starts, ends):
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return [start.elapsed_time(end) / 1e3 for start, end in zip(starts, ends)]
    times = []
    for _ in range(iters):
        _barrier()
        begin = time.perf_counter()
        fn()
        times.append(time.perf_counter() - begin)
    return times


def _check_close(name: str, actual, expected) -> None:
    import torch

    if actual.shape != expected.shape or not torch.allclose(
        actual.float(), expected.float(), rtol=1e-2, atol=1e-2
    ):
        worst = (
            (actual.float() - expected.float()).abs().max().item() if actual.shape == expected.shape else None
        )
        raise AssertionError(
            f"rank {_dist().get_rank()}: {name} check failed (shape {tuple(actual.shape)} vs "
            f"{tuple(expected.shape)}, max abs error {worst})"
        )


def run_normal_case(spec: dict) -> dict:
    """Check, then time dispatch (BF16, FP8) and combine for one (routing, SMs) case on this rank."""
    import torch

    from deepep_megatron import Config
    from deepep_megatron.fp8 import per_token_cast_back, per_token_cast_to_fp8

    dist = _dist()
    num_ranks, rank = dist.get_world_size(), dist.get_rank()
    num_tokens, hidden, num_experts = spec["num_tokens"], spec["hidden"], spec["num_experts"]
    config = Config(spec["num_sms"], num_max_tokens_per_rank=num_tokens)
    buffer = _buffer(spec["backend"], config.get_nvl_buffer_size_hint(hidden * 2, num_ranks))
    x, topk_idx, topk_weights = _inputs(spec, num_tokens)
    x_fp8 = per_token_cast_to_fp8(x)

    # One fresh dispatch, checked through combine.
    num_tokens_per_rank, _, num_tokens_per_expert, is_token_in_rank, _ = buffer.get_dispatch_layout(
        topk_idx, num_experts
    )
    layout = {
        "num_tokens_per_rank": num_tokens_per_rank,
        "is_token_in_rank": is_token_in_rank,
        "num_tokens_per_expert": num_tokens_per_expert,
    }
    recv_x, _, _, _, handle, _ = buffer.dispatch(
        x, topk_idx=topk_idx, topk_weights=topk_weights, config=config, **layout
    )
    expected_rows = sum(row[rank] for row in _all_gather_ints(num_tokens_per_rank.cpu().tolist()))
    if recv_x.size(0) != expected_rows:
        raise AssertionError(f"rank {rank}: received {recv_x.size(0)} rows, the layouts say {expected_rows}")
    reached = is_token_in_rank.sum(1, dtype=torch.float32).unsqueeze(1)
    combined, _, _ = buffer.combine(recv_x, handle, config=config)
    _check_close(
        "combine(dispatch(x)) == x * ranks reached", combined, (x.float() * reached).to(torch.bfloat16)
    )
    recv_fp8, _, _, _, _, _ = buffer.dispatch(x_fp8, handle=handle, config=config)
    dequantized = per_token_cast_back(*recv_fp8)
    combined_fp8, _, _ = buffer.combine(dequantized, handle, config=config)
    expected_fp8 = (per_token_cast_back(*x_fp8).float() * reached).to(torch.bfloat16)
    _check_close("combine(dequantized FP8 dispatch(x))", combined_fp8, expected_fp8)
    del dequantized, combined, combined_fp8, recv_fp8

    if spec["fresh"]:
        calls = {
            "dispatch_bf16": partial(
                buffer.dispatch, x, topk_idx=topk_idx, topk_weights=topk_weights, config=config, **layout
            ),
            "dispatch_fp8": partial(
                buffer.dispatch, x_fp8, topk_idx=topk_idx, topk_weights=topk_weights, config=config, **layout
            ),
        }
    else:
        calls = {
            "dispatch_bf16": partial(buffer.dispatch, x, handle=handle, config=config),
            "dispatch_fp8": partial(buffer.dispatch, x_fp8, handle=handle, config=config),
        }
    calls["combine_bf16"] = partial(buffer.combine, recv_x, handle, config=config)
    times = {op: _time_calls(fn, spec["warmup"], spec["iters"]) for op, fn in calls.items()}

    recv_rows = int(recv_x.size(0))
    result = {"rank": rank, "backend": handle.backend.name, "recv_rows": recv_rows, "times_s": times}
    if spec["nccl_baseline"]:
        result["nccl_baseline"] = _nccl_baseline(spec, is_token_in_rank, recv_x.size(0))
    return result


def _nccl_baseline(spec: dict, is_token_in_rank, num_recv_rows: int):
    """`all_to_all_single` of the same BF16 bytes as dispatch (only on an NCCL process group)."""
    import torch

    dist = _dist()
    if dist.get_backend() != "nccl":
        return None
    row_bytes = spec["hidden"] * 2
    send_rows = is_token_in_rank.sum(0).cpu().tolist()
    recv_rows = [row[dist.get_rank()] for row in _all_gather_ints(send_rows)]
    send = torch.empty(sum(send_rows) * row_bytes, dtype=torch.uint8, device=_device())
    recv = torch.empty(num_recv_rows * row_bytes, dtype=torch.uint8, device=_device())
    fn = partial(
        dist.all_to_all_single,
        recv,
        send,
        [r * row_bytes for r in recv_rows],
        [r * row_bytes for r in send_rows],
    )
    return _time_calls(fn, spec["warmup"], spec["iters"])


def run_low_latency_case(spec: dict) -> dict:
    """Check, then time low_latency_dispatch (FP8) and low_latency_combine on this rank."""
    import torch

    from deepep_megatron import Buffer

    dist = _dist()
    num_ranks, rank = dist.get_world_size(), dist.get_rank()
    num_tokens, hidden, num_experts = spec["num_tokens"], spec["hidden"], spec["num_experts"]
    num_rdma_bytes = Buffer.get_low_latency_rdma_size_hint(num_tokens, hidden, num_ranks, num_experts)
    buffer = _buffer(
        spec["backend"], 0, num_rdma_bytes, low_latency=True, num_qps=max(1, num_experts // num_ranks)
    )
    x, topk_idx, topk_weights = _inputs(spec, num_tokens)
    hook_mode = spec["hook"]

    # Check with BF16: sending each received row back gives x times the sum of its weights.
    recv_x, _, handle, _, hook = buffer.low_latency_dispatch(
        x, topk_idx, num_tokens, num_experts, use_fp8=False, return_recv_hook=hook_mode
    )
    if hook is not None:
        hook()
    combined, _, hook = buffer.low_latency_combine(
        recv_x, topk_idx, topk_weights, handle, return_recv_hook=hook_mode
    )
    if hook is not None:
        hook()
    weight_sum = torch.where(topk_idx >= 0, topk_weights, torch.zeros_like(topk_weights)).sum(1, keepdim=True)
    expected = (x.float() * weight_sum).to(torch.bfloat16)
    _check_close("low_latency_combine(low_latency_dispatch(x))", combined, expected)

    # Timed: FP8 dispatch, then BF16 combine of stand-in expert outputs with that dispatch's handle.
    # In hook mode the hook is called at once and counts in the call's time.
    expert_out = torch.randn(recv_x.shape, device=recv_x.device).to(torch.bfloat16)
    dispatch = partial(
        buffer.low_latency_dispatch, x, topk_idx, num_tokens, num_experts, use_fp8=True,
        return_recv_hook=hook_mode,
    )  # fmt: skip
    combine = partial(
        buffer.low_latency_combine, expert_out, topk_idx, topk_weights, return_recv_hook=hook_mode
    )
    for _ in range(spec["warmup"]):
        out = dispatch()
        if hook_mode:
            out[4]()
        out = combine(out[2])
        if hook_mode:
            out[2]()
    dispatch_times, combine_times = [], []
    if _RANK_STATE["device"] == "cuda":
        events = [[torch.cuda.Event(enable_timing=True) for _ in range(3)] for _ in range(spec["iters"])]
        _barrier()
        for begin, middle, end in events:
            begin.record()
            out = dispatch()
            if hook_mode:
                out[4]()
            middle.record()
            out = combine(out[2])
            if hook_mode:
                out[2]()
            end.record()
        torch.cuda.synchronize()
        dispatch_times = [b.elapsed_time(m) / 1e3 for b, m, _ in events]
        combine_times = [m.elapsed_time(e) / 1e3 for _, m, e in events]
    else:
        for _ in range(spec["iters"]):
            _barrier()
            begin = time.perf_counter()
            out = dispatch()
            if hook_mode:
                out[4]()
            middle = time.perf_counter()
            _barrier()
            resume = time.perf_counter()
            out = combine(out[2])
            if hook_mode:
                out[2]()
            dispatch_times.append(middle - begin)
            combine_times.append(time.perf_counter() - resume)
    return {
        "rank": rank,
        "backend": handle.backend.name,
        "num_selections": int((topk_idx >= 0).sum()),
        "times_s": {"low_latency_dispatch_fp8": dispatch_times, "low_latency_combine_bf16": combine_times},
    }


# -------------------------------------------------------------------------------------- driver
@dataclass
class Console:
    """rich when it is installed, plain prints otherwise."""

    rich: object | None

    @classmethod
    def create(cls) -> Console:
        try:
            import rich.console

            # Logs (not a terminal) get wide tables instead of rich's 80-column default.
            return cls(rich.console.Console(width=None if sys.stdout.isatty() else 160))
        except ImportError:
            return cls(None)

    def print(self, message: str) -> None:
        if self.rich is not None:
            self.rich.print(message, highlight=False)
        else:
            print(_strip_markup(message), flush=True)

    def table(self, title: str, columns: list[str], rows: list[list[str]]) -> None:
        if self.rich is not None:
            from rich.table import Table

            table = Table(title=title)
            for index, column in enumerate(columns):
                table.add_column(column, justify="left" if index < 2 else "right", no_wrap=True)
            for row in rows:
                table.add_row(*row)
            self.rich.print(table)
            return
        widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
        print(title)
        print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
        for row in rows:
            print(
                "  ".join(v.rjust(w) if i >= 2 else v.ljust(w) for i, (v, w) in enumerate(zip(row, widths)))
            )

    def progress(self, total: int):
        return _Progress(self, total)


def _strip_markup(message: str) -> str:
    import re

    return re.sub(r"\[/?[a-z ]+\]", "", message)


class _Progress:
    def __init__(self, console: Console, total: int):
        self.console, self.total, self.done = console, total, 0
        self._progress = None
        if console.rich is not None:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=console.rich,
                transient=False,
            )

    def __enter__(self):
        if self._progress is not None:
            self._progress.__enter__()
            self._task = self._progress.add_task("starting", total=self.total)
        return self

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.__exit__(*exc)

    def describe(self, text: str) -> None:
        if self._progress is not None:
            self._progress.update(self._task, description=text)
        else:
            print(f"[{self.done + 1}/{self.total}] {text}", flush=True)

    def advance(self) -> None:
        self.done += 1
        if self._progress is not None:
            self._progress.advance(self._task)


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
        rows.append(
            {
                "op": op,
                "median_s": medians,
                "gbps": per_rank,
                "gbps_min": low,
                "gbps_mean": mean,
                "times_s": [r["times_s"][op] for r in rank_results],
            }
        )
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
    rows = []
    for op in LOW_LATENCY_OPS:
        kind = "dispatch" if "dispatch" in op else "combine"
        medians = [_median(r["times_s"][op]) for r in rank_results]
        per_rank = [
            gbps(low_latency_bytes(r["num_selections"], hidden, kind), t)
            for r, t in zip(rank_results, medians)
        ]
        us_min, us_mean = min_mean([t * 1e6 for t in medians])
        low, mean = min_mean(per_rank)
        rows.append(
            {
                "op": op,
                "median_s": medians,
                "us_min": us_min,
                "us_mean": us_mean,
                "us_max": max(medians) * 1e6,
                "gbps": per_rank,
                "gbps_min": low,
                "gbps_mean": mean,
                "times_s": [r["times_s"][op] for r in rank_results],
            }
        )
    return rows


def _reference(result: dict, op: str, shapes_match: bool) -> str:
    ref = DEEPEP_V1_REFERENCE.get((result["world_size"], result["num_sms"]))
    if ref is None or not shapes_match or result["routing"] != "random" or op not in NORMAL_OPS:
        return "-"
    value = ref[NORMAL_OPS.index(op)]
    return f"{value} ({result['gbps_mean'] / value:.2f}x)"


def plot(report: dict, path: str) -> None:
    """GB/s (mean over ranks, with the minimum marked) vs SMs per rank, one panel per routing;
    µs per call for low-latency mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    title = (
        f"deepep_megatron {report['mode']} | backend {report['backend']} | {report['device']} | "
        f"R={report['world_size']}\n"
        "mean over ranks (solid line / bar), minimum over ranks (dashed line / tick)"
    )
    if report["mode"] == "low_latency":
        rows = report["results"]
        fig, ax = plt.subplots(figsize=(max(6, 2 * len(rows)), 4))
        names = [f"{OP_LABELS[r['op']]}\n{r['routing']}" for r in rows]
        colors = [f"C{LOW_LATENCY_OPS.index(r['op'])}" for r in rows]
        ax.bar(names, [r["us_mean"] for r in rows], color=colors)
        ax.scatter(names, [r["us_min"] for r in rows], color="black", marker="_", s=400, zorder=3)
        ax.set_ylabel("µs per call")
        ax.set_title("hook mode" if report["config"]["hook"] else "no hook")
    else:
        routings = list(dict.fromkeys(r["routing"] for r in report["results"]))
        fig, axes = plt.subplots(1, len(routings), figsize=(6 * len(routings), 4), squeeze=False)
        for ax, routing in zip(axes[0], routings):
            rows = [r for r in report["results"] if r["routing"] == routing]
            sms = sorted({r["num_sms"] for r in rows})
            ops = list(dict.fromkeys(r["op"] for r in rows))
            for index, op in enumerate(ops):
                by_sms = {r["num_sms"]: r for r in rows if r["op"] == op}
                xs = [s for s in sms if s in by_sms]
                means = [by_sms[s]["gbps_mean"] for s in xs]
                mins = [by_sms[s]["gbps_min"] for s in xs]
                color = f"C{index}"
                if len(sms) > 1:  # lines: mean solid, minimum dashed
                    ax.plot(xs, means, marker="o", color=color, label=f"{op} (mean)")
                    ax.plot(xs, mins, marker=".", linestyle="--", color=color, label=f"{op} (min)")
                else:  # one SM count: bars, with the minimum as a tick
                    ax.bar([index], means, 0.7, color=color, label=op)
                    ax.scatter([index], mins, color="black", marker="_", s=300, zorder=3)
            if len(sms) > 1:
                ax.set_xticks(sms, [str(s) for s in sms])
                ax.set_ylim(bottom=0)
            else:
                ax.set_xticks(range(len(ops)), [op.replace("_", " ") for op in ops])
                ax.set_xlabel(f"{sms[0]} SMs per rank")
            ax.set_ylabel("GB/s per rank")
            ax.set_title(f"routing: {routing}")
            ax.legend(fontsize="small")
            if len(sms) > 1:
                ax.set_xlabel("SMs per rank")
    fig.suptitle(title, fontsize="small")
    fig.tight_layout()
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m deepep_megatron.bench",
        description="Time Buffer dispatch/combine (DESIGN.md §4 conventions) over ranks this command starts.",
    )
    parser.add_argument("--nproc", type=int, default=4, help="ranks to start (default 4)")
    parser.add_argument(
        "--backend",
        choices=("auto", "portable", "cuda"),
        default=None,
        help="Buffer backend (default: $DEEPEP_MEGATRON_BACKEND, else auto)",
    )
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="where ranks run (default: cuda if available)",
    )
    parser.add_argument(
        "--share-gpu",
        choices=("auto", "yes", "no"),
        default="auto",
        help="placement on GPUs, as for deepep_megatron.launch",
    )
    parser.add_argument(
        "--num-sms",
        type=int,
        nargs="+",
        default=None,
        help="SMs per rank to try, one case each (default: 8 16 24 on GPU, 20 on CPU)",
    )
    parser.add_argument(
        "--num-tokens",
        type=int,
        default=None,
        help="tokens per rank (default: 4096 on GPU, 256 on CPU; low-latency 128 / 64)",
    )
    parser.add_argument(
        "--hidden", type=int, default=None, help="hidden size (default: 7168 on GPU, 1024 on CPU)"
    )
    parser.add_argument("--num-experts", type=int, default=None, help="experts (default 256)")
    parser.add_argument("--num-topk", type=int, default=None, help="experts per token (default 8)")
    parser.add_argument(
        "--routing",
        nargs="+",
        choices=("random", "group-limited"),
        default=["random", "group-limited"],
        help="routings to measure (group-limited: 8 groups, top-4 groups; default both)",
    )
    parser.add_argument(
        "--warmup", type=int, default=MIN_WARMUP, help=f"warm-up calls (default {MIN_WARMUP})"
    )
    parser.add_argument("--iters", type=int, default=MIN_ITERS, help=f"timed calls (default {MIN_ITERS})")
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="time fresh dispatches (layout and top-k given) instead of cached ones (handle given)",
    )
    parser.add_argument(
        "--low-latency", action="store_true", help="measure low_latency_dispatch/combine instead"
    )
    parser.add_argument(
        "--hook", action="store_true", help="low-latency: use return_recv_hook=True (hook called at once)"
    )
    parser.add_argument(
        "--nccl-baseline",
        action="store_true",
        help="also time all_to_all_single moving the same bytes (NCCL process groups only)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per case before giving up")
    parser.add_argument("--json", metavar="PATH", help="write every number (and the configuration) here")
    parser.add_argument("--plot", metavar="PATH.png", help="write a plot of GB/s vs SMs per rank here")
    args = parser.parse_args(argv)
    for name in ("nproc", "warmup", "iters"):
        if getattr(args, name) < (0 if name == "warmup" else 1):
            parser.error(f"--{name} is too small")
    return args


def _fill_defaults(args: argparse.Namespace, device: str) -> None:
    mode = "low_latency" if args.low_latency else "normal"
    tokens, hidden, experts, topk = SHAPE_DEFAULTS[(mode, device)]
    args.num_tokens = args.num_tokens or tokens
    args.hidden = args.hidden or hidden
    args.num_experts = args.num_experts or experts
    args.num_topk = args.num_topk or topk
    if args.num_sms is None:
        args.num_sms = [8, 16, 24] if device == "cuda" and not args.low_latency else [20]
    if args.backend is None:
        args.backend = os.environ.get("DEEPEP_MEGATRON_BACKEND", "auto").lower()
    if args.num_experts % args.nproc:
        raise SystemExit(
            f"bench: --num-experts {args.num_experts} must be a multiple of --nproc {args.nproc}"
        )
    if args.hidden % 128:
        raise SystemExit(
            f"bench: --hidden {args.hidden} must be a multiple of 128 (FP8 scales per 128 channels)"
        )
    if "group-limited" in args.routing:
        groups, keep = GROUP_LIMITED["num_groups"], GROUP_LIMITED["topk_groups"]
        if args.num_experts % groups or not keep <= args.num_topk <= keep * args.num_experts // groups:
            raise SystemExit(
                f"bench: group-limited routing needs --num-experts divisible by {groups} and "
                f"{keep} <= --num-topk <= {keep} * experts per group"
            )


def _start_pool(args: argparse.Namespace, console: Console):
    """The RankPool, placed like the launcher places ranks; and the MPS daemon it started (or None)."""
    from deepep_megatron.launch import SHARE_GPU_ENV, MpsUnavailableError, plan_placement, start_mps_daemon
    from deepep_megatron.testing.rank_pool import RankPool

    num_gpus = None if args.device != "cpu" else 0
    placement = plan_placement(args.nproc, args.share_gpu, num_gpus)
    if args.device == "cuda" and placement.device != "cuda":
        raise SystemExit("bench: --device cuda but no CUDA GPU is visible")
    env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    daemon = None
    if placement.share_gpu:
        env[SHARE_GPU_ENV] = "1"
        try:
            daemon = start_mps_daemon()
            daemon.export()
            env.update(daemon.env)
            console.print(("started" if daemon.started else "reusing") + f" MPS daemon ({daemon.pipe_dir})")
        except MpsUnavailableError as error:
            console.print(f"[yellow]no MPS ({error}); ranks will time-slice GPU 0[/yellow]")
    if args.backend in ("portable", "cuda"):
        env["DEEPEP_MEGATRON_BACKEND"] = args.backend
    try:
        pool = RankPool(args.nproc, backend=placement.dist_backend, device=placement.device, env=env)
    except BaseException:
        if daemon is not None:
            daemon.stop()
        raise
    return pool, placement, daemon


def run(args: argparse.Namespace) -> dict:
    import importlib

    import torch

    # Functions sent to the ranks must be importable by name, also when this file runs as __main__.
    ranks = importlib.import_module("deepep_megatron.bench")
    console = Console.create()
    device = (
        "cpu" if args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available()) else "cuda"
    )
    _fill_defaults(args, device)
    mode = "low_latency" if args.low_latency else "normal"
    follows = args.warmup >= MIN_WARMUP and args.iters >= MIN_ITERS
    if not follows:
        console.print(
            f"[yellow]note: {args.warmup} warm-up / {args.iters} timed calls is below the "
            f"{MIN_WARMUP} / {MIN_ITERS} convention[/yellow]"
        )

    pool, placement, daemon = _start_pool(args, console)
    try:
        info = pool.run(ranks.rank_info, placement.device, timeout=args.timeout)[0]
        if (
            info["num_device_sms"]
            and args.nproc * max(args.num_sms) > info["num_device_sms"]
            and placement.share_gpu
        ):
            console.print(
                f"[yellow]note: {args.nproc} ranks x {max(args.num_sms)} SMs exceeds the GPU's "
                f"{info['num_device_sms']} SMs[/yellow]"
            )
        if args.nccl_baseline and info["dist_backend"] != "nccl":
            console.print(
                f"[yellow]--nccl-baseline skipped: the process group is {info['dist_backend']}, "
                "not NCCL[/yellow]"
            )
        base = {
            "num_tokens": args.num_tokens,
            "hidden": args.hidden,
            "num_experts": args.num_experts,
            "num_topk": args.num_topk,
            "warmup": args.warmup,
            "iters": args.iters,
            "seed": args.seed,
            "backend": args.backend,
            "fresh": args.fresh,
            "hook": args.hook,
            "nccl_baseline": args.nccl_baseline and info["dist_backend"] == "nccl",
        }
        if args.low_latency:
            cases = [dict(base, routing=routing, num_sms=None) for routing in args.routing]
        else:
            cases = [
                dict(base, routing=routing, num_sms=sms) for routing in args.routing for sms in args.num_sms
            ]
        results, backends = [], set()
        with console.progress(len(cases)) as progress:
            for case in cases:
                label = (
                    "low-latency" if args.low_latency else f"{case['routing']} routing, {case['num_sms']} SMs"
                )
                progress.describe(label)
                fn = ranks.run_low_latency_case if args.low_latency else ranks.run_normal_case
                rank_results = pool.run(fn, case, timeout=args.timeout)
                backends.update(r["backend"] for r in rank_results)
                summary = (summarize_low_latency if args.low_latency else summarize_normal)(
                    rank_results, args.hidden
                )
                for row in summary:
                    results.append(
                        {
                            "routing": case["routing"],
                            "num_sms": case["num_sms"],
                            "world_size": args.nproc,
                            "recv_rows": [r.get("recv_rows") for r in rank_results],
                            "num_selections": [r.get("num_selections") for r in rank_results],
                            **row,
                        }
                    )
                progress.advance()
    finally:
        pool.close()
        if daemon is not None:
            daemon.stop()

    report = {
        "mode": mode,
        "backend": ",".join(sorted(backends)),
        "backend_requested": args.backend,
        "device": info["device_name"],
        "device_type": placement.device,
        "num_device_sms": info["num_device_sms"],
        "torch": info["torch"],
        "cuda": info.get("cuda"),
        "python": info["python"],
        "world_size": args.nproc,
        "placement": {
            "share_gpu": placement.share_gpu,
            "dist_backend": info["dist_backend"],
            "mps": daemon is not None,
        },
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "follows_conventions": follows,
        "config": {
            "num_tokens": args.num_tokens,
            "hidden": args.hidden,
            "num_experts": args.num_experts,
            "num_topk": args.num_topk,
            "routing": args.routing,
            "num_sms": args.num_sms if not args.low_latency else None,
            "warmup": args.warmup,
            "iters": args.iters,
            "seed": args.seed,
            "dispatch": "fresh" if args.fresh else "cached",
            "hook": args.hook,
            "nccl_baseline": base["nccl_baseline"],
        },
        "units": {"times_s": "seconds per call", "gbps": "1e9 bytes per second per rank"},
        "results": results,
    }
    _print_report(console, report)
    if args.json:
        directory = os.path.dirname(os.path.abspath(args.json))
        os.makedirs(directory, exist_ok=True)
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=1)
        console.print(f"wrote {args.json}")
    if args.plot:
        plot(report, args.plot)
        console.print(f"wrote {args.plot}")
    return report


def _print_report(console: Console, report: dict) -> None:
    config = report["config"]
    title = (
        f"{report['mode']} | backend {report['backend']} | {report['device']} | R={report['world_size']} | "
        f"{config['num_tokens']} tokens x {config['hidden']} hidden, top-{config['num_topk']} of "
        f"{config['num_experts']} | torch {report['torch']}"
    )
    if report["mode"] == "low_latency":
        columns = ["routing", "op", "hook", "µs min", "µs mean", "µs max", "GB/s min", "GB/s mean"]
        rows = [
            [
                r["routing"],
                OP_LABELS[r["op"]],
                str(config["hook"]),
                f"{r['us_min']:.1f}",
                f"{r['us_mean']:.1f}",
                f"{r['us_max']:.1f}",
                f"{r['gbps_min']:.2f}",
                f"{r['gbps_mean']:.2f}",
            ]
            for r in report["results"]
        ]
    else:
        shapes_match = (
            report["device_type"] == "cuda"
            and (config["num_tokens"], config["hidden"], config["num_experts"], config["num_topk"])
            == SHAPE_DEFAULTS[("normal", "cuda")]
        )
        columns = [
            "routing",
            "op",
            "SMs",
            "recv rows",
            "µs (mean)",
            "GB/s min",
            "GB/s mean",
            "DeepEP V1 (§5)",
        ]
        rows = []
        for r in report["results"]:
            recv = r["recv_rows"]
            rows.append(
                [
                    r["routing"],
                    OP_LABELS.get(r["op"], r["op"]),
                    str(r["num_sms"]),
                    f"{sum(recv) / len(recv):.0f}",
                    f"{sum(r['median_s']) / len(r['median_s']) * 1e6:.1f}",
                    f"{r['gbps_min']:.2f}",
                    f"{r['gbps_mean']:.2f}",
                    _reference(r, r["op"], shapes_match),
                ]
            )
        if all(row[-1] == "-" for row in rows):
            columns, rows = columns[:-1], [row[:-1] for row in rows]
    console.table(title, columns, rows)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
