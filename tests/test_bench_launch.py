"""CPU tests of the launcher (`python -m deepep_megatron.launch`) and the benchmark
(`python -m deepep_megatron.bench`): real processes, tiny sizes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from deepep_megatron.bench import (
    FP8_BYTES_FACTOR,
    gbps,
    low_latency_bytes,
    min_mean,
    normal_bytes,
    summarize_low_latency,
    summarize_normal,
)
from deepep_megatron.launch import MpsUnavailableError, plan_placement, start_mps_daemon

REPO = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    """The test's environment, with the repository importable and no GPU placement inherited."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    for name in ("DEEPEP_MEGATRON_SHARE_GPU", "DEEPEP_MEGATRON_BACKEND", "MASTER_PORT", "RANK", "WORLD_SIZE"):
        env.pop(name, None)
    env["CUDA_VISIBLE_DEVICES"] = ""  # CPU placement even where a GPU exists
    return env


def _run(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout
    )


# ------------------------------------------------------------------------------- GB/s arithmetic
def test_normal_bytes_and_gbps_match_hand_computed_values():
    # 1000 rows x 7168 x 2 bytes = 14,336,000 bytes; in 1 ms that is 14.336 GB/s.
    assert normal_bytes(1000, 7168) == 14_336_000
    assert gbps(normal_bytes(1000, 7168), 1e-3) == pytest.approx(14.336)
    # FP8: (1 + 4/128) / 2 = 0.515625 of the BF16 bytes: 7168 + 7168/128*4 = 7392 bytes per row.
    assert FP8_BYTES_FACTOR == 0.515625
    assert normal_bytes(1000, 7168, fp8=True) == pytest.approx(7_392_000)
    assert gbps(normal_bytes(1000, 7168, fp8=True), 1e-3) == pytest.approx(7.392)
    # 8 x 4096 received rows of hidden 7168 in 500 µs: 469,762,048 bytes / 5e-4 s.
    assert gbps(normal_bytes(8 * 4096, 7168), 5e-4) == pytest.approx(939.524096)


def test_low_latency_bytes_match_hand_computed_values():
    # Per selection: FP8 dispatch 7168 + 7168/128*4 + 16 = 7408 bytes; BF16 combine 14336 bytes.
    assert low_latency_bytes(1, 7168, "dispatch") == 7408
    assert low_latency_bytes(1, 7168, "combine") == 14336
    # 128 tokens x top-8 = 1024 selections in 40 µs: 7,585,792 bytes -> 189.6448 GB/s.
    assert low_latency_bytes(1024, 7168, "dispatch") == 7_585_792
    assert gbps(low_latency_bytes(1024, 7168, "dispatch"), 40e-6) == pytest.approx(189.6448)
    with pytest.raises(ValueError):
        low_latency_bytes(1, 7168, "gather")
    with pytest.raises(ValueError):
        gbps(1.0, 0.0)


def test_summaries_report_min_and_mean_over_ranks():
    assert min_mean([3.0, 1.0, 2.0]) == (1.0, 2.0)
    ops = ("dispatch_bf16", "dispatch_fp8", "combine_bf16")
    # Rank 0 receives 100 rows, rank 1 200; medians are 1 ms whatever the outliers.
    ranks = [{"recv_rows": rows, "times_s": {op: [1e-3, 1e-3, 5.0] for op in ops}} for rows in (100, 200)]
    summary = {row["op"]: row for row in summarize_normal(ranks, hidden=128)}
    assert set(summary) == set(ops)
    # 100 * 128 * 2 = 25,600 bytes in 1 ms = 0.0256 GB/s; rank 1 twice that.
    assert summary["dispatch_bf16"]["gbps"] == pytest.approx([0.0256, 0.0512])
    assert summary["dispatch_bf16"]["gbps_min"] == pytest.approx(0.0256)
    assert summary["dispatch_bf16"]["gbps_mean"] == pytest.approx(0.0384)
    assert summary["combine_bf16"]["gbps_mean"] == pytest.approx(0.0384)  # same bytes as dispatch
    assert summary["dispatch_fp8"]["gbps_mean"] == pytest.approx(0.0384 * 0.515625)

    # Groups spanning nodes: the bytes that cross nodes over the same median times.
    network = {"dispatch_bf16": 5000, "dispatch_fp8": 2600, "combine_bf16": 10000}
    spanning = [dict(rank, network_bytes=network) for rank in ranks]
    rdma = {row["op"]: row for row in summarize_normal(spanning, hidden=128)}
    assert rdma["dispatch_bf16"]["rdma_gbps"] == pytest.approx([5e-3, 5e-3])
    assert rdma["combine_bf16"]["rdma_gbps_mean"] == pytest.approx(1e-2)
    assert "rdma_gbps" not in summary["dispatch_bf16"]  # within one node: not reported

    ll_ops = ("low_latency_dispatch_fp8", "low_latency_combine_bf16")
    ll_ranks = [{"num_selections": 10, "times_s": {op: [t, t, t] for op in ll_ops}} for t in (1e-5, 3e-5)]
    ll = {row["op"]: row for row in summarize_low_latency(ll_ranks, hidden=128)}
    assert ll["low_latency_dispatch_fp8"]["us_min"] == pytest.approx(10.0)
    assert ll["low_latency_dispatch_fp8"]["us_mean"] == pytest.approx(20.0)
    assert ll["low_latency_dispatch_fp8"]["us_max"] == pytest.approx(30.0)
    # 10 selections x (128 + 4 + 16) = 1480 bytes in 10 µs = 0.148 GB/s.
    assert ll["low_latency_dispatch_fp8"]["gbps_min"] == pytest.approx(1480 / 3e-5 / 1e9)
    assert ll["low_latency_combine_bf16"]["gbps"][0] == pytest.approx(2560 / 1e-5 / 1e9)


# ------------------------------------------------------------------------------------ placement
def test_plan_placement():
    cpu = plan_placement(3, "auto", num_gpus=0)
    assert (cpu.device, cpu.share_gpu, cpu.dist_backend, cpu.gpu_of(2)) == ("cpu", False, "gloo", None)
    shared = plan_placement(8, "auto", num_gpus=1)
    assert (shared.device, shared.share_gpu, shared.dist_backend) == ("cuda", True, "gloo")
    assert [shared.gpu_of(r) for r in range(8)] == [0] * 8
    single = plan_placement(1, "auto", num_gpus=1)
    assert (single.share_gpu, single.dist_backend) == (False, "nccl")
    spread = plan_placement(4, "auto", num_gpus=8)
    assert (spread.share_gpu, spread.dist_backend, [spread.gpu_of(r) for r in range(4)]) == (
        False,
        "nccl",
        [0, 1, 2, 3],
    )
    forced = plan_placement(4, "yes", num_gpus=8)
    assert (forced.share_gpu, forced.dist_backend, forced.gpu_of(3)) == (True, "gloo", 0)
    with pytest.raises(ValueError, match="share-gpu yes"):
        plan_placement(4, "no", num_gpus=1)
    with pytest.raises(ValueError, match="--share-gpu yes"):
        plan_placement(9, "auto", num_gpus=8)
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        plan_placement(2, "yes", num_gpus=0)
    with pytest.raises(ValueError):
        plan_placement(0, "auto", num_gpus=0)


def test_start_mps_daemon_without_the_binary(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(MpsUnavailableError):
        start_mps_daemon()


# ------------------------------------------------------------------------------------- launcher
RANK_SCRIPT = textwrap.dedent(
    """
    import json, os, sys, time
    import torch, torch.distributed as dist
    from deepep_megatron.launch import init_distributed

    out_dir, fail_rank, fail_code = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    rank, world_size, device = init_distributed()
    if rank == fail_rank:
        sys.exit(fail_code)
    if fail_rank >= 0:
        time.sleep(300)  # the launcher must stop this rank when the failing one exits
    total = torch.tensor([rank + 1.0])
    dist.all_reduce(total)
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    record = {name: os.environ[name] for name in names}
    record.update(rank=rank, world_size=world_size, device=str(device), total=total.item(),
                  backend=dist.get_backend())
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as handle:
        json.dump(record, handle)
    dist.destroy_process_group()
    """
)


@pytest.fixture
def rank_script(tmp_path) -> Path:
    path = tmp_path / "rank_script.py"
    path.write_text(RANK_SCRIPT)
    return path


@pytest.mark.parametrize("nproc", [1, 2, 3])
def test_launcher_runs_every_rank(nproc, rank_script, tmp_path):
    result = _run(
        ["-m", "deepep_megatron.launch", "--nproc", str(nproc), str(rank_script), str(tmp_path), "-1", "0"]
    )
    assert result.returncode == 0, result.stderr
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(nproc)]
    assert [r["rank"] for r in records] == list(range(nproc))
    for rank, record in enumerate(records):
        assert record["RANK"] == record["LOCAL_RANK"] == str(rank)
        assert record["WORLD_SIZE"] == record["LOCAL_WORLD_SIZE"] == str(nproc)
        assert record["MASTER_ADDR"] == "127.0.0.1"
        assert record["world_size"] == nproc
        assert (record["device"], record["backend"]) == ("cpu", "gloo")
        assert record["total"] == nproc * (nproc + 1) / 2
    assert len({r["MASTER_PORT"] for r in records}) == 1


def test_launcher_propagates_the_failing_exit_code_and_stops_the_others(rank_script, tmp_path):
    begin = time.monotonic()
    result = _run(["-m", "deepep_megatron.launch", "--nproc", "3", str(rank_script), str(tmp_path), "1", "3"])
    assert result.returncode == 3, result.stderr
    assert "rank 1 failed with exit code 3" in result.stderr
    assert time.monotonic() - begin < 120  # the sleeping ranks were stopped, not waited for


def test_launcher_repeats_the_failing_ranks_error_last(tmp_path):
    script = tmp_path / "bad_input.py"
    script.write_text(
        "import sys, time\n"
        "from deepep_megatron.launch import init_distributed\n"
        "rank, _, _ = init_distributed()\n"
        "if rank == 1:\n"
        "    raise ValueError('topk_idx has expert ids in [0, 99]; valid ids are -1 (none) and 0..15')\n"
        "time.sleep(300)\n"
    )
    result = _run(["-m", "deepep_megatron.launch", "--nproc", "3", str(script)])
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("[launch] rank 1 failed with exit code 1: ValueError: topk_idx has expert ids"), (
        last
    )


# ---------------------------------------------------------------------------------------- bench
TINY = ["--device", "cpu", "--backend", "portable", "--nproc", "2", "--num-tokens", "32", "--hidden", "256",
        "--num-experts", "16", "--num-topk", "4", "--warmup", "1", "--iters", "3"]  # fmt: skip
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_bench_end_to_end_writes_json_and_plot(tmp_path):
    json_path, png_path = tmp_path / "out" / "bench.json", tmp_path / "out" / "bench.png"
    args = ["--num-sms", "8", "16", "--nccl-baseline", "--json", str(json_path), "--plot", str(png_path)]
    result = _run(["-m", "deepep_megatron.bench", *TINY, *args])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "--nccl-baseline skipped" in result.stdout
    report = json.loads(json_path.read_text())
    assert (report["mode"], report["backend"], report["world_size"]) == ("normal", "portable", 2)
    assert report["device_type"] == "cpu" and report["torch"] and report["device"]
    assert report["follows_conventions"] is False
    assert report["config"]["num_sms"] == [8, 16]
    assert report["config"]["routing"] == ["random", "group-limited"]
    results = report["results"]
    assert len(results) == 2 * 2 * 3  # routings x SM counts x (dispatch BF16, dispatch FP8, combine)
    for row in results:
        assert len(row["times_s"]) == 2 and all(len(times) == 3 for times in row["times_s"])
        # The reported GB/s follow from the reported rows and median times.
        fp8 = row["op"] == "dispatch_fp8"
        expected = [
            gbps(normal_bytes(rows, 256, fp8), t) for rows, t in zip(row["recv_rows"], row["median_s"])
        ]
        assert row["gbps"] == pytest.approx(expected)
        assert row["gbps_min"] == pytest.approx(min(expected))
        assert row["gbps_mean"] == pytest.approx(sum(expected) / 2)
        assert all(0 < rows <= 2 * 32 for rows in row["recv_rows"])
    assert png_path.read_bytes()[:8] == PNG_MAGIC


def test_bench_reports_network_bytes_when_the_group_spans_nodes(tmp_path):
    json_path = tmp_path / "bench.json"
    args = ["--num-sms", "8", "--routing", "random", "--num-ranks-per-node", "1", "--json", str(json_path)]
    result = _run(["-m", "deepep_megatron.bench", *TINY, *args])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "network GB/s" in result.stdout
    report = json.loads(json_path.read_text())
    assert report["config"]["num_ranks_per_node"] == 1
    rows = {row["op"]: row for row in report["results"]}
    for op, row in rows.items():
        if op == "nccl_all_to_all_bf16":
            continue
        assert all(b > 0 for b in row["network_bytes"]), op
        assert row["rdma_gbps"] == pytest.approx(
            [gbps(b, t) for b, t in zip(row["network_bytes"], row["median_s"])]
        )
    # Cached dispatches carry the payload only: FP8 rows are (1 + 4/128) / 2 of BF16 rows.
    ratio = [
        f / b for f, b in zip(rows["dispatch_fp8"]["network_bytes"], rows["dispatch_bf16"]["network_bytes"])
    ]
    assert ratio == pytest.approx([(256 + 8) / 512] * 2)
    # Combine returns one fp32 partial per (token, node): twice the BF16 dispatch bytes.
    assert rows["combine_bf16"]["network_bytes"] == [2 * b for b in rows["dispatch_bf16"]["network_bytes"]]


def test_bench_low_latency_end_to_end(tmp_path):
    json_path, png_path = tmp_path / "ll.json", tmp_path / "ll.png"
    args = [
        "--low-latency",
        "--hook",
        "--routing",
        "random",
        "--json",
        str(json_path),
        "--plot",
        str(png_path),
    ]
    result = _run(["-m", "deepep_megatron.bench", *TINY, *args])
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(json_path.read_text())
    assert report["mode"] == "low_latency" and report["config"]["hook"] is True
    ops = [row["op"] for row in report["results"]]
    assert ops == ["low_latency_dispatch_fp8", "low_latency_combine_bf16"]
    for row in report["results"]:
        assert row["num_selections"] == [32 * 4, 32 * 4]
        assert 0 < row["us_min"] <= row["us_mean"] <= row["us_max"]
    assert png_path.read_bytes()[:8] == PNG_MAGIC


def test_bench_rejects_bad_shapes():
    result = _run(["-m", "deepep_megatron.bench", *TINY, "--num-experts", "15"])
    assert result.returncode != 0
    assert "multiple of --nproc" in result.stderr
