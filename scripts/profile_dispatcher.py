"""Host overhead of one MoE layer: the deepep dispatcher vs megatron-core's alltoall.

One process on the CPU (world size 1, gloo, EP=1) builds one megatron-core MoELayer of the
``proxy`` preset's shape (examples/pretrain_deepseek_v3/configs.py: hidden 1024, 64 experts
top-8 in 8 groups with 4 kept, expert FFN 256, shared expert 256 with overlap, SequentialMLP
experts, sigmoid router with expert bias, seq_aux_loss) once per dispatcher, runs forward +
backward on a few hundred tokens (compute is small, so the difference is host work), and reports:

- the median forward+backward wall time per layer pass;
- the number of torch (aten) ops launched per forward+backward, counted with a
  TorchDispatchMode and attributed to the Python code that launched them (our package,
  megatron-core, or the autograd engine for C++ backward formulas);
- a cProfile breakdown: cumulative host time of each dispatcher stage (and of our autograd
  Functions' backwards) per pass, and the top functions of our package by own time.

Usage::

    .venv/bin/python scripts/profile_dispatcher.py [--tokens 256] [--iters 20] [--fp8]
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import sys
import time
from collections import Counter

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

OURS = os.path.join(ROOT, "deepep_megatron")

PROXY = dict(
    hidden_size=1024,
    ffn_hidden_size=2816,
    num_attention_heads=16,
    num_moe_experts=64,
    moe_ffn_hidden_size=256,
    moe_shared_expert_intermediate_size=256,
    moe_router_topk=8,
    moe_router_num_groups=8,
    moe_router_group_topk=4,
    moe_router_topk_scaling_factor=2.5,
    moe_router_load_balancing_type="seq_aux_loss",
    moe_aux_loss_coeff=1e-4,
    moe_shared_expert_overlap=True,
)

STAGES = (
    "dispatch_preprocess",
    "token_dispatch",
    "dispatch_postprocess",
    "combine_preprocess",
    "token_combine",
    "combine_postprocess",
)


def _origin(frame) -> str:
    """Who launched an op: the innermost frame in our package or megatron-core."""
    while frame is not None:
        name = frame.f_code.co_filename
        if name.startswith(OURS):
            return os.path.relpath(name, ROOT)
        if "megatron/core" in name:
            return "megatron"
        frame = frame.f_back
    return "autograd engine (C++ backward)"


class OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter = Counter()
        self.origins: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        self.origins[_origin(sys._getframe(1))] += 1
        return func(*args, **(kwargs or {}))


def build(dispatcher: str, fp8: bool):
    from deepep_megatron.megatron import configure
    from deepep_megatron.testing import megatron as T

    T.setup(1)
    configure()
    configure(fp8_dispatch=fp8)
    config = T.moe_config(dispatcher, **PROXY)
    layer = T.build_moe_layer(config)
    return layer, config


def step(layer, x, dy) -> None:
    out, _ = layer(x)
    out.backward(dy)
    x.grad = None
    for p in layer.parameters():
        p.grad = None


def profile(dispatcher: str, args) -> dict:
    from deepep_megatron.megatron import METRICS
    from deepep_megatron.testing import megatron as T

    layer, config = build(dispatcher, args.fp8)
    seq = args.tokens // 2
    g = torch.Generator().manual_seed(0)
    x = torch.randn(seq, 2, config.hidden_size, generator=g).to(torch.bfloat16).requires_grad_(True)
    dy = torch.randn(seq, 2, config.hidden_size, generator=g).to(torch.bfloat16)
    for _ in range(3):
        step(layer, x, dy)
    METRICS.reset()

    times = []
    for _ in range(args.iters):
        t0 = time.perf_counter()
        step(layer, x, dy)
        times.append(time.perf_counter() - t0)
        METRICS.reset()

    counter = OpCounter()
    with counter:
        step(layer, x, dy)
    METRICS.reset()

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(args.iters):
        step(layer, x, dy)
        METRICS.reset()
    prof.disable()
    stats = pstats.Stats(prof)

    stage_ms: dict[str, float] = {}
    own_ms: Counter = Counter()
    disp_file = "deepep_megatron/megatron/dispatcher.py" if dispatcher == "deepep" else "token_dispatcher.py"
    for (filename, line, funcname), (_, _, tottime, cumtime, _) in stats.stats.items():
        if filename.endswith(disp_file) and funcname in STAGES + ("forward", "backward"):
            label = funcname if funcname in STAGES else f"{funcname} (line {line})"
            stage_ms[label] = stage_ms.get(label, 0.0) + cumtime / args.iters * 1e3
        if filename.startswith(OURS):
            rel = os.path.relpath(filename, ROOT)
            own_ms[f"{rel}:{funcname}"] += tottime / args.iters * 1e3
    T.teardown()
    return {
        "median_ms": statistics.median(times) * 1e3,
        "min_ms": min(times) * 1e3,
        "ops": counter.ops,
        "origins": counter.origins,
        "stage_ms": stage_ms,
        "own_ms": own_ms,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--fp8", action="store_true", help="FP8 dispatch for deepep (as on the GPU)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)

    results = {name: profile(name, args) for name in ("deepep", "alltoall")}
    print(f"\n=== one MoE layer (proxy shape), {args.tokens} tokens, fp8={args.fp8}, {args.iters} iters ===")
    for name, r in results.items():
        print(
            f"{name:9s} fwd+bwd wall: median {r['median_ms']:.2f} ms, min {r['min_ms']:.2f} ms; "
            f"torch ops {sum(r['ops'].values())} ({dict(r['origins'])})"
        )
    d, a = results["deepep"], results["alltoall"]
    print(
        f"deepep - alltoall: {d['median_ms'] - a['median_ms']:+.2f} ms, "
        f"{sum(d['ops'].values()) - sum(a['ops'].values()):+d} ops per layer fwd+bwd"
    )
    for name, r in results.items():
        print(f"\n--- {name}: cProfile cumulative ms per pass, by dispatcher stage / autograd Function")
        for stage, ms in r["stage_ms"].items():
            print(f"  {stage:30s} {ms:8.3f}")
        print(f"--- {name}: aten ops per fwd+bwd (top {args.top})")
        for op, n in r["ops"].most_common(args.top):
            print(f"  {op:40s} {n}")
    print(f"\n--- deepep: own host time in deepep_megatron (cProfile tottime ms per pass, top {args.top})")
    for fn, ms in d["own_ms"].most_common(args.top):
        print(f"  {fn:70s} {ms:8.3f}")
    print(f"  {'total':70s} {sum(d['own_ms'].values()):8.3f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
