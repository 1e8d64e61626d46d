"""scripts/moe_layer_trace.py: the overlap analysis on hand-written trace events, and a 2-rank
CPU run of the script end to end.

Times in the synthetic traces are µs. Stream 7 plays the Buffer's communication stream, stream 13
the shared expert's side stream, stream 3 the compute stream.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

from deepep_megatron.testing.processes import run_in_own_session

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "moe_layer_trace.py"

DISPATCH = (
    "void deepep_megatron::intranode::(anonymous namespace)::dispatch_kernel"
    "(deepep_megatron::intranode::DispatchParams)"
)
COMBINE = (
    "void deepep_megatron::intranode::(anonymous namespace)::combine_kernel"
    "(deepep_megatron::intranode::CombineParams)"
)
NOTIFY = (
    "void deepep_megatron::intranode::(anonymous namespace)::notify_kernel"
    "(deepep_megatron::intranode::NotifyParams)"
)
GEMM = "nvjet_tst_128x256_64x4_2x1_v_bz_coopA_NNT"
COMM_STREAM, SIDE_STREAM, MAIN_STREAM = 7, 13, 3


@pytest.fixture(scope="module")
def trace():
    spec = importlib.util.spec_from_file_location("moe_layer_trace", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["moe_layer_trace"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def kernel(name: str, stream: int, start: float, end: float, correlation: int | None = None) -> dict:
    """A GPU kernel as torch.profiler's chrome trace writes it."""
    args = {"device": 0, "stream": stream}
    if correlation is not None:
        args["correlation"] = correlation
    return {
        "ph": "X",
        "cat": "kernel",
        "name": name,
        "pid": 0,
        "tid": stream,
        "ts": start,
        "dur": end - start,
        "args": args,
    }


def launch(correlation: int, host_ts: float) -> dict:
    """The CUDA runtime call that launched the kernel with the same correlation id."""
    return {
        "ph": "X",
        "cat": "cuda_runtime",
        "name": "cudaLaunchKernel",
        "pid": 1,
        "tid": 1,
        "ts": host_ts,
        "dur": 1.0,
        "args": {"correlation": correlation},
    }


def annotation(name: str, start: float, end: float) -> dict:
    """A record_function range on the host."""
    return {
        "ph": "X",
        "cat": "user_annotation",
        "name": name,
        "pid": 1,
        "tid": 1,
        "ts": start,
        "dur": end - start,
    }


def overall(trace, events: list[dict]) -> dict:
    return trace.analyse_trace(events)["overall"]


# ------------------------------------------------------------------------------ interval helpers
def test_merge_joins_overlapping_and_touching_intervals_and_drops_empty_ones(trace):
    assert trace.merge([(5, 7), (0, 2), (1, 3), (3, 4), (6, 6.5), (9, 9)]) == [(0, 4), (5, 7)]
    assert trace.merge([]) == []


def test_intersect_of_two_unions(trace):
    a = [(0, 4), (6, 10)]
    b = [(2, 7), (9, 12)]
    assert trace.intersect(a, b) == [(2, 4), (6, 7), (9, 10)]
    assert trace.length(trace.intersect(a, b)) == 4
    assert trace.intersect(a, []) == []


def test_kernel_names_classified(trace):
    assert trace.communication_kind(DISPATCH) == "dispatch"
    assert trace.communication_kind(NOTIFY) == "dispatch"  # part of a fresh dispatch
    assert trace.communication_kind(COMBINE) == "combine"
    assert trace.communication_kind("void deepep_megatron::intranode::layout_kernel<8>(int)") == "dispatch"
    assert trace.communication_kind(GEMM) is None
    # Only the kernel's own name counts, not a deepep_megatron parameter type.
    assert trace.communication_kind("void at::native::fill_kernel(deepep_megatron::DispatchParams)") is None
    assert trace.communication_kind("ncclDevKernel_AllGather_RING_LL(ncclDevKernelArgsStorage<4096>)") is None


# ------------------------------------------------------------------------------------ overlap
def test_no_overlap(trace):
    events = [kernel(DISPATCH, COMM_STREAM, 0, 10), kernel(GEMM, SIDE_STREAM, 10, 20)]
    result = overall(trace, events)
    assert result["communication_us"] == 10
    assert result["hidden_us"] == 0
    assert result["exposed_us"] == 10
    assert result["hidden_fraction"] == 0


def test_full_overlap(trace):
    events = [kernel(DISPATCH, COMM_STREAM, 10, 20), kernel(GEMM, SIDE_STREAM, 5, 25)]
    result = overall(trace, events)
    assert (result["communication_us"], result["hidden_us"], result["hidden_fraction"]) == (10, 10, 1)


def test_partial_overlap(trace):
    # Communication 0-10 and 30-40; compute 6-16 and 35-50: hidden 4 + 5 of 20.
    events = [
        kernel(DISPATCH, COMM_STREAM, 0, 10),
        kernel(COMBINE, COMM_STREAM, 30, 40),
        kernel(GEMM, SIDE_STREAM, 6, 16),
        kernel(GEMM, SIDE_STREAM, 35, 50),
    ]
    result = overall(trace, events)
    assert (result["communication_us"], result["hidden_us"]) == (20, 9)
    assert result["hidden_fraction"] == pytest.approx(0.45)


def test_overlapping_compute_kernels_count_once(trace):
    # Three compute kernels on two streams, overlapping one another: their union is 2-8.
    events = [
        kernel(DISPATCH, COMM_STREAM, 0, 10),
        kernel(GEMM, SIDE_STREAM, 2, 6),
        kernel(GEMM, SIDE_STREAM, 3, 5),
        kernel(GEMM, MAIN_STREAM, 4, 8),
    ]
    result = overall(trace, events)
    assert (result["communication_us"], result["hidden_us"]) == (10, 6)
    covered = trace.analyse_trace(events)["hidden_by_stream_us"]
    assert covered == {str(MAIN_STREAM): 4, str(SIDE_STREAM): 4}  # each stream's own share


def test_overlapping_communication_kernels_count_once(trace):
    # Two communication kernels on two streams over 0-15, compute over all of it.
    events = [
        kernel(DISPATCH, COMM_STREAM, 0, 10),
        kernel(DISPATCH, COMM_STREAM + 1, 5, 15),
        kernel(GEMM, SIDE_STREAM, 0, 20),
    ]
    result = overall(trace, events)
    assert (result["communication_us"], result["hidden_us"]) == (15, 15)


def test_compute_on_the_communication_stream_hides_nothing(trace):
    # A kernel on the same stream cannot run alongside the communication; only the other
    # stream's 8-12 counts.
    events = [
        kernel(DISPATCH, COMM_STREAM, 0, 10),
        kernel(GEMM, COMM_STREAM, 0, 10),
        kernel(GEMM, SIDE_STREAM, 8, 12),
    ]
    result = overall(trace, events)
    assert (result["communication_us"], result["hidden_us"]) == (10, 2)
    assert trace.analyse_trace(events)["hidden_by_stream_us"] == {str(COMM_STREAM): 0, str(SIDE_STREAM): 2}


def test_copies_are_neither_communication_nor_compute(trace):
    copy = {
        "ph": "X",
        "cat": "gpu_memcpy",
        "name": "Memcpy DtoD (Device -> Device)",
        "ts": 0,
        "dur": 10,
        "args": {"stream": SIDE_STREAM},
    }
    events = [kernel(DISPATCH, COMM_STREAM, 0, 10), copy]
    result = overall(trace, events)
    assert (result["communication_us"], result["hidden_us"]) == (10, 0)
    assert [op.category for op in trace.gpu_ops(events)] == ["communication", "copy"]


def test_stream_from_args_or_row(trace):
    assert trace._stream({"tid": 9, "args": {"stream": 7}}) == 7
    assert trace._stream({"tid": "stream 9", "args": {}}) == 9


def _one_iteration(iteration: int, offset: float) -> list[dict]:
    """A forward (host 0-100) and backward (host 200-300) range with a dispatch and a combine
    each; the side stream's compute covers all of the forward dispatch (GPU 10-20), half of the
    forward combine (40-50), none of the backward dispatch (220-230) and a quarter of the backward
    combine (260-280)."""
    o, c = offset, 1000 * iteration  # host/GPU offset; correlation ids unique per iteration
    return [
        annotation(f"moe_layer_trace.forward.{iteration}", o + 0, o + 100),
        annotation(f"moe_layer_trace.backward.{iteration}", o + 200, o + 300),
        launch(c + 1, o + 5),
        kernel(DISPATCH, COMM_STREAM, o + 10, o + 20, c + 1),
        launch(c + 2, o + 30),
        kernel(COMBINE, COMM_STREAM, o + 40, o + 50, c + 2),
        launch(c + 3, o + 210),
        kernel(DISPATCH, COMM_STREAM, o + 220, o + 230, c + 3),
        launch(c + 4, o + 250),
        kernel(COMBINE, COMM_STREAM, o + 260, o + 280, c + 4),
        launch(c + 5, o + 4),
        kernel(GEMM, SIDE_STREAM, o + 8, o + 22, c + 5),
        launch(c + 6, o + 31),
        kernel(GEMM, SIDE_STREAM, o + 45, o + 60, c + 6),
        launch(c + 7, o + 240),
        kernel(GEMM, SIDE_STREAM, o + 275, o + 290, c + 7),
    ]


EXPECTED_PHASES = {  # (communication, hidden) µs per iteration
    "forward dispatch": (10, 10),
    "forward combine": (10, 5),
    "backward dispatch": (10, 0),
    "backward combine": (20, 5),
}


def test_phases_from_the_launch_ranges(trace):
    summary = trace.analyse_trace(_one_iteration(0, 0))
    assert summary["iterations"] == 1
    assert set(summary["phases"]) == set(EXPECTED_PHASES)  # nothing unattributed
    for phase, (comm, hidden) in EXPECTED_PHASES.items():
        row = summary["phases"][phase]
        assert (row["communication_us"], row["hidden_us"]) == (comm, hidden), phase
    assert (summary["overall"]["communication_us"], summary["overall"]["hidden_us"]) == (50, 20)
    assert summary["overall"]["hidden_fraction"] == pytest.approx(0.4)
    assert summary["streams"] == {"communication": [COMM_STREAM], "compute": [SIDE_STREAM]}
    assert summary["communication_kernels"] == sorted([COMBINE, DISPATCH])


def test_values_are_per_iteration_and_the_timeline_takes_the_last(trace):
    events = _one_iteration(0, 0) + _one_iteration(1, 10_000)
    summary = trace.analyse_trace(events)
    assert summary["iterations"] == 2
    for phase, (comm, hidden) in EXPECTED_PHASES.items():
        row = summary["phases"][phase]
        assert (row["communication_us"], row["hidden_us"], row["kernels"]) == (comm, hidden, 1), phase
    last = trace.last_iteration_ops(trace.gpu_ops(events))
    assert len(last) == 7 and min(op.start for op in last) >= 10_000


def test_kernels_launched_outside_the_ranges_are_unattributed(trace):
    events = [launch(1, 500), kernel(DISPATCH, COMM_STREAM, 0, 10, 1), kernel(GEMM, SIDE_STREAM, 0, 4)]
    summary = trace.analyse_trace(events)
    assert summary["phases"]["unattributed"]["hidden_us"] == 4
    assert summary["phases"]["forward dispatch"]["communication_us"] == 0


def test_a_trace_without_kernels_says_so(trace):
    summary = trace.analyse_trace([annotation("moe_layer_trace.forward.0", 0, 10)])
    assert summary["has_cuda_kernels"] is False
    assert "no CUDA kernels" in summary["note"]
    assert "phases" not in summary


def test_timeline_is_drawn(trace, tmp_path):
    ops = trace.gpu_ops(_one_iteration(0, 0))
    trace.draw_timeline(ops, tmp_path / "timeline.png", "test")
    trace.draw_timeline([], tmp_path / "empty.png", "test")
    for name in ("timeline.png", "empty.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------ the script, CPU
@pytest.mark.megatron
@pytest.mark.timeout(300)
def test_script_runs_on_two_cpu_ranks(tmp_path, cpu_pools):
    pytest.importorskip("megatron.core")
    cpu_pools.close_all()  # these ranks need the cores more than the other tests' idle pools
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    for name in ("DEEPEP_MEGATRON_SHARE_GPU", "DEEPEP_MEGATRON_BACKEND", "MASTER_PORT", "RANK", "WORLD_SIZE"):
        env.pop(name, None)
    env["CUDA_VISIBLE_DEVICES"] = ""  # CPU ranks even where a GPU exists
    env["TORCHDYNAMO_DISABLE"] = "1"  # megatron's torch.compile'd router: a C++ build per rank on the CPU
    out = tmp_path / "out"
    command = [sys.executable, "-m", "deepep_megatron.launch", "--nproc", "2", str(SCRIPT), "--out", str(out)]
    command += ["--tokens", "16", "--iters", "1", "--warmup", "1", "--backend", "portable"]
    # Its own session, so that a timeout stops the launcher and both ranks.
    run = run_in_own_session(command, cwd=ROOT, env=env, timeout=240, what="the script")
    assert run.returncode == 0, f"the script failed:\n{run.tail()}"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["has_cuda_kernels"] is False and "no CUDA kernels" in summary["note"]
    assert (summary["world_size"], summary["backend"], summary["layer"]["tokens"]) == (2, "portable", 16)
    events = json.loads((out / "trace_rank0.json").read_text())["traceEvents"]
    ranges = {e["name"] for e in events if e.get("cat") == "user_annotation"}
    assert {"moe_layer_trace.forward.0", "moe_layer_trace.backward.0"} <= ranges
    assert (out / "timeline.png").stat().st_size > 0
    assert "no CUDA kernels" in run.stdout
