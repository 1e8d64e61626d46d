"""The benchmark's output: a console (rich when installed), the results table and the plot."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from deepep_megatron.bench.measures import (
    DEEPEP_V1_REFERENCE,
    LOW_LATENCY_OPS,
    NORMAL_OPS,
    OP_LABELS,
    SHAPE_DEFAULTS,
)


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
        names = [f"{OP_LABELS.get(r['op'], r['op'])}\n{r['routing']}" for r in rows]
        ops = list(dict.fromkeys(r["op"] for r in rows))
        colors = [f"C{ops.index(r['op']) % 10}" for r in rows]
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


def print_report(console: Console, report: dict) -> None:
    config = report["config"]
    title = (
        f"{report['mode']} | backend {report['backend']} | {report['device']} | R={report['world_size']} | "
        f"{config['num_tokens']} tokens x {config['hidden']} hidden, top-{config['num_topk']} of "
        f"{config['num_experts']} | torch {report['torch']}"
    )
    if report["mode"] == "low_latency":
        columns = [
            "routing",
            "SMs",
            "op",
            "hook",
            "µs min",
            "µs mean",
            "µs max",
            "GB/s mean",
            "floor µs",
            "data",
        ]
        rows = [
            [
                r["routing"],
                str(r.get("num_sms")),
                OP_LABELS.get(r["op"], r["op"]),
                str(config["hook"]) if r["op"] in LOW_LATENCY_OPS else "-",
                f"{r['us_min']:.1f}",
                f"{r['us_mean']:.1f}",
                f"{r['us_max']:.1f}",
                f"{r['gbps_mean']:.2f}" if "gbps_mean" in r else "-",
                f"{r['floor_us']:.1f}" if "floor_us" in r else "-",
                f"{100 * r['data_share']:.0f}%" if "data_share" in r else "-",
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
            "network MB",
            "network GB/s",
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
                    f"{sum(r['network_bytes']) / len(r['network_bytes']) / 1e6:.1f}"
                    if "network_bytes" in r
                    else "-",
                    f"{r['rdma_gbps_mean']:.2f}" if "rdma_gbps_mean" in r else "-",
                    _reference(r, r["op"], shapes_match),
                ]
            )
        if all(row[-3] == "-" for row in rows):  # within one node: nothing crosses nodes
            columns = columns[:-3] + columns[-1:]
            rows = [row[:-3] + row[-1:] for row in rows]
        if all(row[-1] == "-" for row in rows):
            columns, rows = columns[:-1], [row[:-1] for row in rows]
    console.table(title, columns, rows)
