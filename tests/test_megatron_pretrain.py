"""End to end: examples/pretrain_deepseek_v3/pretrain.py on several ranks.

CPU: the tiny preset (EP=4 over 4 gloo ranks) trains with the deepep dispatcher to the same
losses as megatron-core's alltoall dispatcher, logs the DeepEP metrics and leaves a wandb offline
run. GPU: a few proxy steps give the same losses with the compiled backend and the portable one.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from deepep_megatron.testing.processes import run_in_own_session

pytest.importorskip("megatron.core")
pytest.importorskip("megatron.training")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "pretrain_deepseek_v3" / "pretrain.py"

pytestmark = pytest.mark.megatron


@pytest.fixture(autouse=True, scope="module")
def _free_the_cpu(cpu_pools):
    """These tests launch their own ranks: the other tests' idle pools go first."""
    cpu_pools.close_all()


def launch(
    nproc: int, args: list[str], metrics: Path, env: dict | None = None, timeout: int = 480
) -> list[dict]:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        str(SCRIPT),
        *args,
        "--metrics-jsonl",
        str(metrics),
    ]
    full_env = {
        **os.environ,
        "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        **(env or {}),
    }
    # Its own session, so that a timeout stops torchrun and every rank it started.
    run = run_in_own_session(cmd, cwd=ROOT, env=full_env, timeout=timeout, what="pretrain")
    assert run.returncode == 0, f"pretrain failed:\n{run.tail()}"
    return [json.loads(line) for line in metrics.read_text().splitlines()]


# Two 4-rank launches per test: about a minute on a 2-core machine, several where CI is slower.
TWO_LAUNCHES_TIMEOUT_S = 1200


@pytest.mark.timeout(TWO_LAUNCHES_TIMEOUT_S)
def test_tiny_pretrain_matches_alltoall(tmp_path):
    iters = ["--config", "tiny", "--train-iters", "5"]
    deepep = launch(
        4,
        [*iters, "--wandb-save-dir", str(tmp_path / "wandb")],
        tmp_path / "deepep.jsonl",
        env={"WANDB_MODE": "offline"},
    )
    alltoall = launch(
        4, [*iters, "--moe-token-dispatcher-type", "alltoall", "--wandb-project", ""], tmp_path / "a2a.jsonl"
    )
    assert len(deepep) == len(alltoall) == 5
    for ours, ref in zip(deepep, alltoall):
        # Same model, data and seed; the two dispatchers differ only in BF16 summation order.
        assert abs(ours["train/loss"] - ref["train/loss"]) < 5e-3, (ours["train/loss"], ref["train/loss"])
    assert deepep[-1]["train/loss"] < deepep[0]["train/loss"] - 0.5  # it learns
    for key in ("deepep/dispatch_GBps", "deepep/combine_GBps", "deepep/dispatch_ms", "deepep/combine_ms"):
        assert all(row[key] > 0 for row in deepep), key
    assert {
        "deepep/dispatch_GBps/layer_2",
        "deepep/combine_GBps/layer_3",
        "deepep/expert_imbalance/layer_2",
    } <= set(deepep[0])
    assert all(row["deepep/expert_imbalance"] >= 1.0 for row in deepep)
    runs = list((tmp_path / "wandb" / "wandb").glob("offline-run-*"))
    assert runs and any(run.glob("*.wandb") for run in runs)


@pytest.mark.timeout(TWO_LAUNCHES_TIMEOUT_S)
def test_tiny_pretrain_grouped_experts(tmp_path):
    """--experts grouped (TEGroupedMLP on torch's grouped_mm) trains the tiny preset, with the
    same losses under the deepep and the alltoall dispatchers (same initial weights: the same
    module builds them in the same RNG order; SequentialMLP draws its experts in another order,
    so its equivalence is tested on loaded weights in test_megatron_grouped_experts.py)."""
    common = ["--config", "tiny", "--train-iters", "4", "--wandb-project", "", "--experts", "grouped"]
    deepep = launch(4, common, tmp_path / "deepep.jsonl")
    alltoall = launch(4, [*common, "--moe-token-dispatcher-type", "alltoall"], tmp_path / "a2a.jsonl")
    assert len(deepep) == len(alltoall) == 4
    for ours, ref in zip(deepep, alltoall):
        assert abs(ours["train/loss"] - ref["train/loss"]) < 5e-3, (ours["train/loss"], ref["train/loss"])
    assert deepep[-1]["train/loss"] < deepep[0]["train/loss"] - 0.1  # it learns


# ---------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_proxy_loss_matches_portable_backend(tmp_path):
    """DeepSeek-V3 proxy, EP=4 ranks on one GPU: the compiled backend (when built; else both runs
    use the portable one) gives the portable backend's losses, FP8 dispatch on."""
    common = [
        "--config",
        "proxy",
        "--train-iters",
        "8",
        "--expert-model-parallel-size",
        "4",
        "--distributed-backend",
        "gloo",
        "--seq-length",
        "1024",
        "--micro-batch-size",
        "2",
        "--global-batch-size",
        "8",
        "--wandb-project",
        "",
    ]
    env = {"DEEPEP_MEGATRON_SHARE_GPU": "1"}
    portable = launch(
        4, common, tmp_path / "portable.jsonl", env={**env, "DEEPEP_MEGATRON_BACKEND": "portable"}
    )
    compiled = launch(4, common, tmp_path / "auto.jsonl", env={**env, "DEEPEP_MEGATRON_BACKEND": "auto"})
    for ours, ref in zip(compiled, portable):
        assert abs(ours["train/loss"] - ref["train/loss"]) < 2e-2 * max(1.0, abs(ref["train/loss"]))
    assert compiled[-1]["train/loss"] < compiled[0]["train/loss"]
