"""How much of one MoE layer's dispatch/combine communication the shared expert's compute hides.

    python -m deepep_megatron.launch --nproc 4 scripts/moe_layer_trace.py --out DIR \\
        [--tokens N] [--iters K] [--backend cuda|portable]

Every rank builds the same megatron-core MoELayer (EP = world size, the deepep dispatcher, one
shared expert with ``moe_shared_expert_overlap``, BF16, a small DeepSeek-V3-like shape: 64 experts
top-8 in 8 groups with 4 kept, grouped-GEMM experts on a GPU) with the helpers of
:mod:`deepep_megatron.testing.megatron`, warms up, and runs K forward+backward iterations under
``torch.profiler`` (CPU and CUDA activities). All ranks are profiled, so they carry the same
profiler overhead and stay in step; rank 0 writes into DIR:

- ``trace_rank0.json``: the chrome trace (open it in Perfetto or chrome://tracing);
- ``summary.json``: per phase (forward dispatch, forward combine, backward dispatch, backward
  combine) and overall, per iteration: the communication time, the part of it hidden behind
  compute on another stream, and the hidden fraction;
- ``timeline.png``: the last profiled iteration, one row per CUDA stream, communication and
  compute kernels in two colours, and a row with the hidden communication;

and prints the table. The analysis (:func:`analyse_trace`) is plain Python on the trace's events:

- communication: our kernels, ``deepep_megatron::...{layout,notify,dispatch,combine}...`` (csrc);
  layout and notify count as dispatch. The Buffer's staging copies and memsets on its stream are
  drawn but not counted;
- compute: every other kernel. Communication is hidden where a compute kernel on *another* stream
  runs at the same time (a kernel on the same stream cannot run alongside it); overlapping
  compute kernels count once (union of intervals);
- phase: the kernel's launch (its ``correlation`` with the CUDA runtime call) falls inside the
  ``moe_layer_trace.forward.I`` or ``moe_layer_trace.backward.I`` range this script records around
  ``layer(x)`` and ``out.backward(dy)``; a dispatch kernel launched in backward is the gradient of
  combine (a cached dispatch), a combine kernel there the gradient of dispatch.

Where the ranks share one GPU (under MPS), the profiler sees rank 0's kernels only, so "hidden"
means hidden behind rank 0's own compute; a communication kernel's time includes its wait for the
peers' kernels. Without CUDA the script runs on CPU tensors
(``--backend portable``, a tiny shape by default, for CI): the trace has no CUDA kernels and the
summary says so.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repository, if not pip-installed

# ------------------------------------------------------------------------------- trace analysis

COMMUNICATION, COMPUTE, COPY = "communication", "compute", "copy"
PHASES = ("forward dispatch", "forward combine", "backward dispatch", "backward combine")
RANGE_PREFIX = "moe_layer_trace"

# Our kernels' function names (csrc/*/*.cu): layout_kernel, notify_kernel, dispatch_kernel,
# combine_kernel, and the internode / low-latency families' dispatch_*_kernel, combine_*_kernel.
# Demangled: "void deepep_megatron::intranode::(anonymous namespace)::dispatch_kernel(...)".
_COMM_FUNCTION = re.compile(r"layout|notify|dispatch|combine")
_RANGE = re.compile(rf"^{RANGE_PREFIX}\.(forward|backward)\.(\d+)$")
_LAUNCH_CATEGORIES = ("cuda_runtime", "cuda_driver")
_COPY_CATEGORIES = ("gpu_memcpy", "gpu_memset")


@dataclass(frozen=True)
class GpuOp:
    """One GPU activity of the trace (times in µs, the trace's clock).

    ``category``: communication, compute or copy; ``comm_kind``: "dispatch" / "combine" for
    communication, else None; ``direction``: "forward" / "backward" from the range its launch
    fell in, or None; ``iteration``: that range's index, or None."""

    name: str
    stream: int
    start: float
    end: float
    category: str
    comm_kind: str | None = None
    direction: str | None = None
    iteration: int | None = None

    @property
    def phase(self) -> str | None:
        """E.g. "forward dispatch" for a communication kernel whose launch was attributed."""
        if self.comm_kind is None or self.direction is None:
            return None
        return f"{self.direction} {self.comm_kind}"


def merge(intervals) -> list[tuple[float, float]]:
    """The union of ``(start, end)`` intervals: sorted, disjoint, touching ones joined."""
    merged: list[list[float]] = []
    for start, end in sorted(intervals):
        if end <= start:
            continue
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(s, e) for s, e in merged]


def intersect(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The intersection of two unions from :func:`merge` (a two-pointer walk)."""
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        start, end = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if start < end:
            out.append((start, end))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def length(intervals: list[tuple[float, float]]) -> float:
    """Total length of disjoint intervals."""
    return sum(end - start for start, end in intervals)


def kernel_function(kernel_name: str) -> str:
    """The qualified function of a demangled kernel name, without return type, anonymous
    namespaces, template arguments and parameters: ``deepep_megatron::intranode::dispatch_kernel``."""
    name = kernel_name.replace("(anonymous namespace)::", "")
    name = re.split(r"[(<]", name, maxsplit=1)[0].strip()
    return name.split(" ")[-1]


def communication_kind(kernel_name: str) -> str | None:
    """The kind of one of our communication kernels: "dispatch" or "combine"; else None."""
    function = kernel_function(kernel_name)
    if not function.startswith("deepep_megatron::"):
        return None
    basename = function.rsplit("::", 1)[-1]
    if not _COMM_FUNCTION.search(basename):
        return None
    return "combine" if "combine" in basename else "dispatch"


def _launch_times(events: list[dict]) -> dict[int, float]:
    """CUDA runtime/driver call time (host clock, µs) by correlation id."""
    return {
        e["args"]["correlation"]: e["ts"]
        for e in events
        if e.get("cat") in _LAUNCH_CATEGORIES and "correlation" in e.get("args", {})
    }


def _iteration_ranges(events: list[dict]) -> list[tuple[float, float, str, int]]:
    """``(start, end, direction, iteration)`` of this script's forward/backward ranges."""
    ranges = []
    for e in events:
        match = _RANGE.match(e.get("name", "")) if e.get("cat") == "user_annotation" else None
        if match:
            ranges.append((e["ts"], e["ts"] + e.get("dur", 0.0), match.group(1), int(match.group(2))))
    return ranges


def _attribute(launch_ts: float | None, ranges) -> tuple[str | None, int | None]:
    """The (direction, iteration) of the range a launch happened in. By time, not thread: the
    backward's kernels are launched by autograd's thread while the main thread sits in
    ``backward()`` inside its range."""
    if launch_ts is not None:
        for start, end, direction, iteration in ranges:
            if start <= launch_ts <= end:
                return direction, iteration
    return None, None


def _stream(event: dict) -> int:
    """A GPU event's stream: ``args.stream``, else its row (``tid``, "stream 7" in some exports)."""
    stream = event.get("args", {}).get("stream", event.get("tid", -1))
    return stream if isinstance(stream, int) else int(re.sub(r"\D", "", str(stream)) or -1)


def gpu_ops(events: list[dict]) -> list[GpuOp]:
    """The kernels, copies and memsets of chrome-trace ``events`` (torch.profiler's export),
    classified and attributed to a phase and iteration where their launch can be found."""
    launches, ranges = _launch_times(events), _iteration_ranges(events)
    ops = []
    for e in events:
        category = e.get("cat")
        if e.get("ph") != "X" or (category != "kernel" and category not in _COPY_CATEGORIES):
            continue
        if category == "kernel":
            kind = communication_kind(e["name"])
            category = COMMUNICATION if kind else COMPUTE
        else:
            kind, category = None, COPY
        direction, iteration = _attribute(launches.get(e.get("args", {}).get("correlation")), ranges)
        start = float(e["ts"])
        ops.append(
            GpuOp(
                name=e["name"],
                stream=_stream(e),
                start=start,
                end=start + float(e.get("dur", 0.0)),
                category=category,
                comm_kind=kind,
                direction=direction,
                iteration=iteration,
            )
        )
    return ops


@dataclass(frozen=True)
class Overlap:
    """Communication time (union of its kernels' intervals) and the part of it hidden behind
    compute on other streams, in µs."""

    communication_us: float
    hidden_us: float
    num_kernels: int

    @property
    def hidden_fraction(self) -> float | None:
        return self.hidden_us / self.communication_us if self.communication_us > 0 else None

    def per_iteration(self, iterations: int) -> dict:
        return {
            "communication_us": self.communication_us / iterations,
            "hidden_us": self.hidden_us / iterations,
            "exposed_us": (self.communication_us - self.hidden_us) / iterations,
            "hidden_fraction": self.hidden_fraction,
            "kernels": self.num_kernels / iterations,
        }


def _compute_by_stream(compute: list[GpuOp]) -> dict[int, list[tuple[float, float]]]:
    by_stream = defaultdict(list)
    for op in compute:
        by_stream[op.stream].append((op.start, op.end))
    return {stream: merge(intervals) for stream, intervals in by_stream.items()}


def hidden_intervals(communication: list[GpuOp], compute: list[GpuOp]) -> list[tuple[float, float]]:
    """The times at which some ``communication`` kernel runs alongside a ``compute`` kernel on
    another stream (a union: sorted, disjoint).

    Each communication kernel is intersected with the union of the compute on every stream but
    its own; the pieces are united again, so neither overlapping compute kernels nor overlapping
    communication kernels count twice."""
    by_stream = _compute_by_stream(compute)
    elsewhere = {
        stream: merge(iv for other, ivs in by_stream.items() if other != stream for iv in ivs)
        for stream in {op.stream for op in communication}
    }
    pieces = []
    for op in communication:
        pieces += intersect([(op.start, op.end)], elsewhere[op.stream])
    return merge(pieces)


def overlap(communication: list[GpuOp], compute: list[GpuOp]) -> Overlap:
    """How much of ``communication``'s time some ``compute`` kernel on another stream covers."""
    total = length(merge((op.start, op.end) for op in communication))
    return Overlap(total, length(hidden_intervals(communication, compute)), len(communication))


def hidden_by_stream(communication: list[GpuOp], compute: list[GpuOp]) -> dict[int, float]:
    """Per compute stream, the communication time (on other streams) it covers, in µs. Streams
    that compute at the same time each get the shared part, so these may sum to more than the
    hidden time."""
    covered = {}
    for stream, intervals in _compute_by_stream(compute).items():
        others = merge((op.start, op.end) for op in communication if op.stream != stream)
        covered[stream] = length(intersect(others, intervals))
    return covered


def analyse_trace(events: list[dict]) -> dict:
    """Summary of a chrome trace's ``traceEvents``: per phase and overall, per iteration (the
    ``moe_layer_trace.*.I`` ranges found; 1 without them), the communication time, the hidden
    time and fraction; the streams; the communication kernels' names."""
    ops = gpu_ops(events)
    iterations = max(1, len({r[3] for r in _iteration_ranges(events)}))
    communication = [op for op in ops if op.category == COMMUNICATION]
    compute = [op for op in ops if op.category == COMPUTE]
    summary = {"iterations": iterations, "has_cuda_kernels": bool(communication or compute)}
    if not summary["has_cuda_kernels"]:
        summary["note"] = "no CUDA kernels in the trace (CPU tensors): nothing to overlap"
        return summary
    if not communication:
        summary["note"] = (
            "no deepep_megatron communication kernels in the trace (the portable backend "
            "communicates through torch.distributed, not kernels of its own)"
        )
    phases = {phase: [op for op in communication if op.phase == phase] for phase in PHASES}
    unattributed = [op for op in communication if op.phase is None]
    if unattributed:
        phases["unattributed"] = unattributed
    summary["phases"] = {
        phase: overlap(comm, compute).per_iteration(iterations) for phase, comm in phases.items()
    }
    summary["overall"] = overlap(communication, compute).per_iteration(iterations)
    covered = hidden_by_stream(communication, compute)
    summary["hidden_by_stream_us"] = {str(stream): us / iterations for stream, us in sorted(covered.items())}
    summary["streams"] = {
        COMMUNICATION: sorted({op.stream for op in communication}),
        COMPUTE: sorted({op.stream for op in compute}),
    }
    summary["communication_kernels"] = sorted({op.name for op in communication})
    return summary


def last_iteration_ops(ops: list[GpuOp]) -> list[GpuOp]:
    """The ops launched in the last attributed iteration (all ops if none is attributed)."""
    iterations = [op.iteration for op in ops if op.iteration is not None]
    if not iterations:
        return ops
    return [op for op in ops if op.iteration == max(iterations)]


# ------------------------------------------------------------------------------------- outputs

_COLOURS = {COMMUNICATION: "tab:red", COMPUTE: "tab:blue", COPY: "tab:gray"}
_HIDDEN = "tab:green"


def draw_timeline(ops: list[GpuOp], path: Path, title: str) -> None:
    """One row per CUDA stream, one box per op, coloured by category, and a top row with the
    hidden communication (a note instead if ``ops`` is empty)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    streams = sorted({op.stream for op in ops})
    fig, ax = plt.subplots(figsize=(14, 1.5 + 0.6 * (len(streams) + 1)))
    ax.set_title(title)
    if not ops:
        ax.text(0.5, 0.5, "no CUDA kernels in the trace", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    else:
        t0 = min(op.start for op in ops)
        for row, stream in enumerate(streams):
            for category, colour in _COLOURS.items():
                boxes = [
                    (op.start - t0, op.end - op.start)
                    for op in ops
                    if op.stream == stream and op.category == category
                ]
                ax.broken_barh(boxes, (row - 0.4, 0.8), facecolors=colour, edgecolor="black", linewidth=0.2)
        by_category = {c: [op for op in ops if op.category == c] for c in (COMMUNICATION, COMPUTE)}
        hidden = hidden_intervals(by_category[COMMUNICATION], by_category[COMPUTE])
        ax.broken_barh([(s - t0, e - s) for s, e in hidden], (len(streams) - 0.4, 0.8), facecolors=_HIDDEN)
        comm_streams = {op.stream for op in by_category[COMMUNICATION]}
        labels = [f"stream {s}" + (" (communication)" if s in comm_streams else "") for s in streams]
        ax.set_yticks(range(len(streams) + 1), [*labels, "hidden communication"])
        ax.set_xlabel("µs from the iteration's first GPU op")
        legend = {**_COLOURS, "hidden communication": _HIDDEN}
        ax.legend(
            handles=[Patch(color=c, label=k) for k, c in legend.items()],
            loc="upper left",
            bbox_to_anchor=(1.0, 1.0),
        )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _percent(fraction: float | None) -> str:
    return "-" if fraction is None else f"{100 * fraction:.1f} %"


def print_table(summary: dict) -> None:
    """The hidden fraction per phase, with rich."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if "phases" not in summary:
        console.print(f"[bold]moe_layer_trace[/bold]: {summary.get('note', 'nothing to report')}")
        return
    iterations = summary["iterations"]
    table = Table(title=f"communication hidden behind compute (µs per iteration, mean of {iterations})")
    for column in ("phase", "communication", "hidden", "exposed", "hidden fraction"):
        table.add_column(column, justify="left" if column == "phase" else "right")
    rows = [*summary["phases"].items(), ("overall", summary["overall"])]
    for phase, row in rows:
        table.add_row(
            phase,
            f"{row['communication_us']:.1f}",
            f"{row['hidden_us']:.1f}",
            f"{row['exposed_us']:.1f}",
            _percent(row["hidden_fraction"]),
        )
    console.print(table)
    if "note" in summary:
        console.print(summary["note"])


# ------------------------------------------------------------------------------ the MoE layer

# DeepSeek-V3-like, small: 64 experts top-8 (8 groups, 4 kept); on a GPU hidden 2048, expert FFN
# 512 and a shared expert as wide as two routed ones; on the CPU a tiny hidden for CI.
NUM_EXPERTS, TOPK, NUM_GROUPS, GROUP_TOPK = 64, 8, 8, 4
SHAPES = {
    "cuda": {"hidden": 2048, "moe_ffn": 512, "shared_ffn": 1024, "tokens": 4096},
    "cpu": {"hidden": 128, "moe_ffn": 32, "shared_ffn": 64, "tokens": 32},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for the trace, summary and plot")
    parser.add_argument("--tokens", type=int, help="tokens per rank (default 4096 on a GPU, 32 on the CPU)")
    parser.add_argument("--iters", type=int, default=3, help="profiled iterations (default 3)")
    parser.add_argument("--warmup", type=int, default=3, help="iterations before profiling (default 3)")
    parser.add_argument(
        "--backend",
        choices=["cuda", "portable"],
        help="Buffer backend (default: cuda on a GPU, else portable)",
    )
    parser.add_argument("--hidden", type=int, help="hidden size (default 2048 on a GPU, 128 on the CPU)")
    parser.add_argument("--moe-ffn", type=int, help="routed expert FFN width (default 512 / 32)")
    parser.add_argument("--shared-ffn", type=int, help="shared expert FFN width (default 1024 / 64)")
    parser.add_argument(
        "--experts",
        choices=["auto", "grouped", "sequential"],
        default="auto",
        help="routed experts: grouped GEMM or SequentialMLP (auto: grouped on a GPU)",
    )
    parser.add_argument("--bf16-dispatch", action="store_true", help="dispatch BF16 (default FP8 on a GPU)")
    return parser.parse_args(argv)


def _shape(args, device) -> dict:
    """The layer shape: the device's defaults, with what the flags set."""
    shape = dict(SHAPES[device.type])
    for key in shape:
        if getattr(args, key) is not None:
            shape[key] = getattr(args, key)
    return shape


def _experts_kind(args, device) -> str:
    if args.experts != "auto":
        return args.experts
    import torch

    if device.type != "cuda":  # the CPU path is a smoke test: the cheaper experts
        return "sequential"
    grouped_ok = hasattr(torch.nn.functional, "grouped_mm") and torch.cuda.get_device_capability()[0] >= 8
    return "grouped" if grouped_ok else "sequential"


def build_layer(args, device, world_size: int):
    """The MoELayer at EP = world size (parallel state set up here). Returns it and what it is:
    the shape, the kind of experts and whether tokens are dispatched in FP8."""
    from deepep_megatron.megatron import configure
    from deepep_megatron.megatron.options import fp8_dispatch_enabled, resolve_options
    from deepep_megatron.testing import megatron as T

    shape = _shape(args, device)
    T.setup(ep=world_size)
    configure(backend=args.backend, timing=False)  # timing: no METRICS records to pile up
    if args.bf16_dispatch:
        configure(fp8_dispatch=False)
    config = T.moe_config(
        "deepep",
        hidden_size=shape["hidden"],
        ffn_hidden_size=4 * shape["hidden"],
        num_moe_experts=NUM_EXPERTS,
        moe_ffn_hidden_size=shape["moe_ffn"],
        moe_shared_expert_intermediate_size=shape["shared_ffn"],
        moe_shared_expert_overlap=True,
        moe_router_topk=TOPK,
        moe_router_num_groups=NUM_GROUPS,
        moe_router_group_topk=GROUP_TOPK,
    )
    experts = _experts_kind(args, device)
    layer = T.build_moe_layer(config, experts)
    weights = T.global_weights(config)
    T.load_weights(layer, weights)
    if layer.token_dispatcher.shared_experts is None:  # what this script is about
        raise RuntimeError("the shared expert is not overlapped with the dispatcher")
    fp8 = fp8_dispatch_enabled(resolve_options(config), shape["hidden"], device)
    return layer, {**shape, "experts": experts, "fp8_dispatch": fp8}


def _synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def step(layer, x, dy, iteration: int) -> None:
    """One forward + backward inside this script's named ranges, then drop the gradients."""
    from torch.profiler import record_function

    with record_function(f"{RANGE_PREFIX}.forward.{iteration}"):
        out, _ = layer(x)
    with record_function(f"{RANGE_PREFIX}.backward.{iteration}"):
        out.backward(dy)
    _synchronize()  # iterations apart, so that one iteration's timeline stands alone
    x.grad = None
    for param in layer.parameters():
        param.grad = None


def profile_layer(args, device, rank: int, world_size: int) -> tuple[Path | None, dict]:
    """Warm up, profile ``--iters`` iterations on every rank, export rank 0's trace. Returns the
    trace's path (None on other ranks) and what the layer is (:func:`build_layer`)."""
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile

    from deepep_megatron.testing import megatron as T

    layer, layer_info = build_layer(args, device, world_size)
    tokens, hidden = layer_info["tokens"], layer_info["hidden"]
    x = T.global_inputs(1, (tokens, 1, hidden))[rank].to(device).requires_grad_(True)  # [S, B=1, H]
    dy = T.global_inputs(2, (tokens, 1, hidden))[rank].to(device)
    for i in range(args.warmup):  # the first iterations compile megatron's router, size the Buffer
        step(layer, x, dy, -1 - i)
    dist.barrier()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for i in range(args.iters):
            step(layer, x, dy, i)
    dist.barrier()
    if rank != 0:
        return None, layer_info
    path = args.out / "trace_rank0.json"
    prof.export_chrome_trace(str(path))
    return path, layer_info


METHOD = (
    "communication: deepep_megatron layout/notify/dispatch/combine kernels (union of their intervals); "
    "hidden: the part of it during which a compute kernel ran on another CUDA stream; "
    "µs per profiled iteration, rank 0's kernels only"
)


def report(trace: Path, args, context: dict) -> dict:
    """Analyse rank 0's trace; write summary.json (the analysis plus ``context``) and
    timeline.png; print the table."""
    events = json.loads(trace.read_text())["traceEvents"]
    summary = {**analyse_trace(events), **context, "method": METHOD}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    hidden = _percent(summary.get("overall", {}).get("hidden_fraction"))
    title = f"one iteration, rank 0 of {context['world_size']}: {hidden} of the communication hidden"
    draw_timeline(last_iteration_ops(gpu_ops(events)), args.out / "timeline.png", title)
    print_table(summary)
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch
    import torch.distributed as dist

    from deepep_megatron.launch import init_distributed
    from deepep_megatron.testing import megatron as T

    rank, world_size, device = init_distributed()
    if device.type == "cpu":  # the ranks share the cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    args.out.mkdir(parents=True, exist_ok=True)
    args.backend = args.backend or ("cuda" if device.type == "cuda" else "portable")
    try:
        trace, layer_info = profile_layer(args, device, rank, world_size)
    finally:
        T.teardown()
    dist.barrier()
    dist.destroy_process_group()
    if trace is not None:
        context = {
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "world_size": world_size,
            "backend": args.backend,
            "layer": {**layer_info, "num_experts": NUM_EXPERTS, "topk": TOPK},
        }
        report(trace, args, context)
    return 0


if __name__ == "__main__":
    sys.exit(main())
