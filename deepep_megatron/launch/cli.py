"""`python -m deepep_megatron.launch`: the command line of the launcher."""

from __future__ import annotations

import argparse
import sys

from deepep_megatron.launch.supervisor import launch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deepep_megatron.launch",
        description="Start N ranks of a script on this machine: CPU ranks, all ranks on one GPU under MPS, "
        "or one rank per GPU.",
    )
    parser.add_argument(
        "--nproc", "--nproc-per-node", type=int, default=1, help="number of ranks (default 1)"
    )
    parser.add_argument(
        "--share-gpu",
        choices=("auto", "yes", "no"),
        default="auto",
        help="put all ranks on GPU 0 under MPS (auto: when one GPU is visible and N > 1)",
    )
    parser.add_argument("--master-port", type=int, default=None, help="rendezvous port (default: a free one)")
    parser.add_argument(
        "--grace",
        type=float,
        default=5.0,
        help="seconds between SIGTERM and SIGKILL when stopping ranks (default 5)",
    )
    parser.add_argument("-m", "--module", action="store_true", help="run `script` as a module (python -m)")
    parser.add_argument("script", help="the script (or module with -m) each rank runs")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the script")
    args = parser.parse_args(argv)
    command = [sys.executable, "-u"] + (["-m", args.script] if args.module else [args.script]) + args.args
    try:
        return launch(command, args.nproc, args.share_gpu, args.master_port, args.grace)
    except ValueError as error:
        parser.error(str(error))
    return 2  # unreachable: parser.error exits
