"""The benchmark's driver: arguments, rank placement (as the launcher places ranks), the cases,
and the report."""

from __future__ import annotations

import argparse
import datetime
import json
import os

from deepep_megatron.bench import cases
from deepep_megatron.bench.measures import (
    GROUP_LIMITED,
    MIN_ITERS,
    MIN_WARMUP,
    SHAPE_DEFAULTS,
    summarize_low_latency,
    summarize_normal,
)
from deepep_megatron.bench.report import Console, plot, print_report


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m deepep_megatron.bench",
        description="Time Buffer dispatch/combine over ranks this command starts "
        "(conventions: docs/benchmarking.md).",
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
    parser.add_argument(
        "--num-ranks-per-node",
        type=int,
        default=None,
        help="ranks per (emulated) node; fewer than --nproc makes the group span nodes, which runs "
        "the internode kernels and reports the bytes that cross nodes (default: Buffer's default)",
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
        args.num_sms = [16] if args.low_latency else [8, 16, 24] if device == "cuda" else [20]
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
    import torch

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
        info = pool.run(cases.rank_info, placement.device, timeout=args.timeout)[0]
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
            "num_ranks_per_node": args.num_ranks_per_node,
            "nccl_baseline": args.nccl_baseline and info["dist_backend"] == "nccl",
        }
        runs = [dict(base, routing=routing, num_sms=sms) for routing in args.routing for sms in args.num_sms]
        results, backends, summaries = [], set(), []
        with console.progress(len(runs)) as progress:
            for case in runs:
                mode_label = "low-latency, " if args.low_latency else ""
                label = f"{mode_label}{case['routing']} routing, {case['num_sms']} SMs"
                progress.describe(label)
                fn = cases.run_low_latency_case if args.low_latency else cases.run_normal_case
                rank_results = pool.run(fn, case, timeout=args.timeout)
                backends.update(r["backend"] for r in rank_results)
                if not summaries:
                    summaries.append(rank_results[0]["backend_summary"])
                    console.print(f"Buffer backends: {summaries[0]}")
                console.print(
                    f"[green]check passed on all {args.nproc} ranks[/green]: {rank_results[0]['checked']}"
                )
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
        "backend_summary": summaries[0] if summaries else None,
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
            "num_sms": args.num_sms,
            "warmup": args.warmup,
            "iters": args.iters,
            "seed": args.seed,
            "dispatch": "fresh" if args.fresh else "cached",
            "hook": args.hook,
            "num_ranks_per_node": args.num_ranks_per_node,
            "nccl_baseline": base["nccl_baseline"],
        },
        "units": {
            "times_s": "seconds per call",
            "gbps": "1e9 bytes per second per rank",
            "rdma_gbps": "1e9 bytes that cross nodes per second per rank (deepep_megatron.network_bytes)",
        },
        "results": results,
    }
    print_report(console, report)
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


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    run(args)
    return 0
