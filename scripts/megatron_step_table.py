"""Step-time table of the DeepSeek-V3 proxy: deepep against alltoall, compiled against portable,
SequentialMLP against grouped-GEMM experts, with and without megatron's EP-communication overlap.

    python scripts/megatron_step_table.py run  --out DIR [--runs NAME,...] [--iters 30] [--repeats 2]
    python scripts/megatron_step_table.py table --out DIR [--warmup 5] > table.md
    python scripts/megatron_step_table.py plan                  # the runs and their commands

`run` starts each named run `--repeats` times, alternating the runs so that drift of the machine
falls on all of them alike, and leaves one metrics file per run and repeat in DIR
(`NAME.rREPEAT.jsonl`, written by examples/pretrain_deepseek_v3/pretrain.py). Runs can be split
over several calls (the GPU machine allows 10 minutes per command); `table` reads whatever DIR
holds. Per run it reports the median step time over the iterations after `--warmup`, the
tokens/s at that median, the loss after the last iteration, and the noise: the spread of the
per-repeat medians around their median (a difference below the noise is no difference).

Same seed, data and preset (`--config proxy`: 14 layers, 64 experts top-8, MLA) in every run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PRETRAIN = REPO / "examples" / "pretrain_deepseek_v3" / "pretrain.py"


@dataclass(frozen=True)
class Run:
    """One configuration of the table: ranks and the flags that differ from the preset."""

    name: str
    num_ranks: int
    flags: tuple[str, ...]
    what: str


# (name, ranks, flags, what) of each configuration; each runs with both kinds of experts.
_CONFIGURATIONS = [
    ("ep1-alltoall", 1, ("--moe-token-dispatcher-type", "alltoall"), "EP=1 alltoall"),
    ("ep1-deepep", 1, (), "EP=1 deepep (FP8 dispatch)"),
    ("ep4-portable", 4, ("--deepep-backend", "portable"), "EP=4 deepep, portable backend"),
    ("ep4-compiled", 4, ("--deepep-backend", "cuda"), "EP=4 deepep, compiled kernels"),
    (
        "ep4-compiled-overlap",
        4,
        ("--deepep-backend", "cuda", "--overlap-moe-expert-parallel-comm"),
        "EP=4 deepep, compiled, EP-comm overlap",
    ),
]


def _runs() -> dict[str, Run]:
    return {
        f"{name}-{experts}": Run(
            f"{name}-{experts}", ranks, (*flags, "--experts", experts), f"{what}, {experts} experts"
        )
        for experts in ("sequential", "grouped")
        for name, ranks, flags, what in _CONFIGURATIONS
    }


RUNS = _runs()


def command(run: Run, metrics: Path, iters: int, config: str = "proxy") -> list[str]:
    """The launcher command of one repeat of `run`."""
    ep = ("--expert-model-parallel-size", str(run.num_ranks))
    backend = ("--distributed-backend", "gloo") if run.num_ranks > 1 else ()
    return [
        sys.executable,
        "-m",
        "deepep_megatron.launch",
        "--nproc",
        str(run.num_ranks),
        str(PRETRAIN),
        "--config",
        config,
        "--train-iters",
        str(iters),
        "--wandb-project",
        "",
        "--metrics-jsonl",
        str(metrics),
        *ep,
        *backend,
        *run.flags,
    ]


def run_all(names: list[str], out: Path, iters: int, repeats: int, config: str) -> int:
    out.mkdir(parents=True, exist_ok=True)
    failed = 0
    for repeat in range(repeats):
        for name in names:
            metrics = out / f"{name}.r{repeat}.jsonl"
            print(f"[step-table] {name} repeat {repeat}", flush=True)
            with open(out / f"{name}.r{repeat}.log", "w") as log:
                status = subprocess.run(
                    command(RUNS[name], metrics, iters, config), cwd=REPO, stdout=log, stderr=log
                )
            if status.returncode != 0:
                failed += 1
                print(f"[step-table] {name} repeat {repeat} failed (exit {status.returncode})", flush=True)
    return 1 if failed else 0


@dataclass
class RunSummary:
    """A run's figures over its repeats."""

    median_step_s: float
    tokens_per_s: float
    final_loss: float
    noise: float  # largest relative distance of a repeat's median from the median of medians
    repeats: int


def summarize(rows_per_repeat: list[list[dict]], warmup: int) -> RunSummary:
    """`rows_per_repeat`: each repeat's metrics rows (one per iteration, in order)."""
    medians, tokens, losses = [], [], []
    for rows in rows_per_repeat:
        steady = rows[warmup:] or rows
        step = statistics.median(row["train/iteration_time_s"] for row in steady)
        medians.append(step)
        tokens.append(statistics.median(row["train/tokens_per_s"] for row in steady))
        losses.append(rows[-1]["train/loss"])
    center = statistics.median(medians)
    noise = max(abs(m - center) for m in medians) / center if center > 0 else 0.0
    return RunSummary(center, statistics.median(tokens), statistics.median(losses), noise, len(medians))


def load(out: Path) -> dict[str, list[list[dict]]]:
    found: dict[str, list[list[dict]]] = {}
    for path in sorted(out.glob("*.r*.jsonl")):
        name = path.name.split(".r")[0]
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if rows:
            found.setdefault(name, []).append(rows)
    return found


def table(out: Path, warmup: int) -> str:
    found = load(out)
    lines = [
        "| run | what | ranks | median step (s) | tokens/s | loss at end | noise | repeats |",
        "|---|---|---|---|---|---|---|---|",
    ]
    summaries = {}
    for name, run in RUNS.items():
        if name not in found:
            continue
        s = summaries[name] = summarize(found[name], warmup)
        lines.append(
            f"| {name} | {run.what} | {run.num_ranks} | {s.median_step_s:.3f} | {s.tokens_per_s:,.0f} | "
            f"{s.final_loss:.4f} | {100 * s.noise:.1f}% | {s.repeats} |"
        )
    lines += ["", *ratios(summaries)]
    return "\n".join(lines) + "\n"


# The comparisons the targets are stated in (issue #11): (label, numerator run, denominator run).
RATIOS = [
    ("EP=1 deepep / alltoall step time (target <= 1 + noise)", "ep1-deepep-{e}", "ep1-alltoall-{e}"),
    ("EP=4 portable / compiled step time (target >= 2)", "ep4-portable-{e}", "ep4-compiled-{e}"),
    ("EP=4 compiled / compiled with overlap step time", "ep4-compiled-{e}", "ep4-compiled-overlap-{e}"),
]


def ratios(summaries: dict[str, RunSummary]) -> list[str]:
    lines = []
    for experts in ("sequential", "grouped"):
        for label, top, bottom in RATIOS:
            a, b = summaries.get(top.format(e=experts)), summaries.get(bottom.format(e=experts))
            if a and b:
                lines.append(f"- {label}, {experts} experts: {a.median_step_s / b.median_step_s:.2f}")
    seq, grouped = summaries.get("ep1-deepep-sequential"), summaries.get("ep1-deepep-grouped")
    if seq and grouped:
        lines.append(
            f"- EP=1 deepep tokens/s, grouped / sequential experts (target >= 3): "
            f"{grouped.tokens_per_s / seq.tokens_per_s:.2f}"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("run", "table", "plan"))
    parser.add_argument("--out", type=Path, default=Path("step_table"))
    parser.add_argument("--runs", default=",".join(RUNS), help="comma-separated run names (see `plan`)")
    parser.add_argument("--config", default="proxy", help="pretrain.py preset (default proxy)")
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=5, help="iterations left out of the medians")
    args = parser.parse_args(argv)
    names = [name for name in args.runs.split(",") if name]
    unknown = [name for name in names if name not in RUNS]
    if unknown:
        parser.error(f"unknown runs {unknown}; known: {', '.join(RUNS)}")
    if args.action == "plan":
        for name in names:
            cmd = command(RUNS[name], args.out / f"{name}.r0.jsonl", args.iters, args.config)
            print(f"{name}: {' '.join(cmd)}")
        return 0
    if args.action == "run":
        return run_all(names, args.out, args.iters, args.repeats, args.config)
    print(table(args.out, args.warmup), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
