"""scripts/megatron_step_table.py: the runs it plans and the figures it derives from metrics files."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def step_table():
    spec = importlib.util.spec_from_file_location("step_table", ROOT / "scripts" / "megatron_step_table.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["step_table"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _write(out: Path, name: str, repeat: int, steps: list[float], loss: float, tokens: int = 1000) -> None:
    rows = [
        {
            "iteration": i + 1,
            "train/iteration_time_s": t,
            "train/tokens_per_s": tokens / t,
            "train/loss": loss,
        }
        for i, t in enumerate(steps)
    ]
    (out / f"{name}.r{repeat}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_every_run_has_both_experts_and_its_flags(step_table):
    names = set(step_table.RUNS)
    for config in ("ep1-alltoall", "ep1-deepep", "ep4-portable", "ep4-compiled", "ep4-compiled-overlap"):
        assert {f"{config}-sequential", f"{config}-grouped"} <= names
    run = step_table.RUNS["ep4-compiled-overlap-grouped"]
    cmd = step_table.command(run, Path("m.jsonl"), 7)
    assert cmd[cmd.index("--nproc") + 1] == "4" and cmd[cmd.index("--train-iters") + 1] == "7"
    assert "--overlap-moe-expert-parallel-comm" in cmd and cmd[cmd.index("--experts") + 1] == "grouped"
    assert cmd[cmd.index("--deepep-backend") + 1] == "cuda"


def test_medians_leave_out_warmup_and_noise_is_the_spread_of_repeats(step_table, tmp_path):
    # Repeat 0: warm-up 9 s, then 1.0 s steps; repeat 1: 1.1 s steps. Median of medians 1.05.
    _write(tmp_path, "ep1-deepep-sequential", 0, [9.0, 9.0, 1.0, 1.0, 1.0], loss=2.0)
    _write(tmp_path, "ep1-deepep-sequential", 1, [9.0, 9.0, 1.1, 1.1, 1.1], loss=2.2)
    summary = step_table.summarize(step_table.load(tmp_path)["ep1-deepep-sequential"], warmup=2)
    assert summary.median_step_s == pytest.approx(1.05)
    assert summary.noise == pytest.approx(0.05 / 1.05)
    assert summary.final_loss == pytest.approx(2.1) and summary.repeats == 2


def test_table_states_the_target_ratios(step_table, tmp_path):
    _write(tmp_path, "ep1-alltoall-sequential", 0, [1.0] * 4, loss=3.0)
    _write(tmp_path, "ep1-deepep-sequential", 0, [1.2] * 4, loss=3.0)
    _write(tmp_path, "ep1-deepep-grouped", 0, [0.3] * 4, loss=3.0)
    _write(tmp_path, "ep4-portable-sequential", 0, [3.0] * 4, loss=3.0)
    _write(tmp_path, "ep4-compiled-sequential", 0, [1.5] * 4, loss=3.0)
    text = step_table.table(tmp_path, warmup=1)
    assert "| ep1-deepep-sequential | EP=1 deepep (FP8 dispatch), sequential experts | 1 | 1.200 |" in text
    assert "EP=1 deepep / alltoall step time (target <= 1 + noise), sequential experts: 1.20" in text
    assert "EP=4 portable / compiled step time (target >= 2), sequential experts: 2.00" in text
    assert "grouped / sequential experts (target >= 3): 4.00" in text
    assert "EP=4 portable / compiled step time (target >= 2), grouped" not in text  # no grouped EP=4 runs
