"""Smoke probe of the low-latency kernels on this machine: R ranks (default 2) on the GPU(s) as
the tests place them, one tiny dispatch + combine through the NVSHMEM kernels, checked against
the portable backend. Prints one line per rank; exits non-zero on any failure. Meant to run
before the full GPU tests so that a bootstrap problem shows up in seconds, not at a timeout.

    python scripts/ll_probe.py [num_ranks] [num_ranks_per_node]
"""

from __future__ import annotations

import sys

import torch


def probe(per_node: int) -> str:
    import torch.distributed as dist

    from deepep_megatron import Buffer
    from deepep_megatron.backends import nvshmem

    rank, num_ranks = dist.get_rank(), dist.get_world_size()
    experts, tokens, hidden = 4 * num_ranks, 8, 256
    size = Buffer.get_low_latency_rdma_size_hint(tokens, hidden, num_ranks, experts)
    compiled = Buffer(
        None, num_rdma_bytes=size, low_latency_mode=True, backend="cuda", num_ranks_per_node=per_node
    )
    portable = Buffer(None, num_rdma_bytes=size, low_latency_mode=True, backend="portable")
    generator = torch.Generator().manual_seed(rank)
    x = torch.randn((tokens, hidden), generator=generator).to(torch.bfloat16).cuda()
    topk_idx = torch.rand((tokens, experts), generator=generator).topk(2, dim=1).indices.cuda()
    weights = torch.rand((tokens, 2), generator=generator).cuda()
    results = []
    for buffer in (compiled, portable):
        recv, count, handle, _, _ = buffer.low_latency_dispatch(x, topk_idx, tokens, experts, use_fp8=False)
        combined = buffer.low_latency_combine(recv, topk_idx, weights, handle)[0]
        torch.cuda.synchronize()
        results.append((recv.cpu(), count.cpu(), combined.cpu()))
    (recv_a, count_a, comb_a), (recv_b, count_b, comb_b) = results
    assert torch.equal(count_a, count_b), (count_a, count_b)
    for e in range(count_a.numel()):
        assert torch.equal(recv_a[e, : count_a[e]], recv_b[e, : count_b[e]]), f"expert {e} rows"
    assert torch.equal(comb_a, comb_b), "combine"
    env = {k: v for k, v in __import__("os").environ.items() if k.startswith("NVSHMEM_")}
    return f"rank {rank}: ok ({compiled.backend_summary}; PE {nvshmem.module.my_pe()}; {env})"


def main() -> int:
    from deepep_megatron.launch import start_mps_daemon
    from deepep_megatron.testing.rank_pool import RankPool

    num_ranks = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    per_node = int(sys.argv[2]) if len(sys.argv) > 2 else num_ranks
    share = torch.cuda.device_count() < num_ranks
    env = {"DEEPEP_MEGATRON_SHARE_GPU": "1" if share else "0", "DEEPEP_MEGATRON_TIMEOUT_S": "20"}
    daemon = start_mps_daemon() if share else None
    if daemon is not None:
        env.update(daemon.env)
    pool = RankPool(num_ranks, device="cuda", env=env)
    try:
        for nodes_of in sorted({per_node, num_ranks}):  # the put path, then the mapped path
            for line in pool.run(probe, nodes_of, timeout=60):
                print(f"nodes of {nodes_of}: {line}", flush=True)
    finally:
        pool.close()
        if daemon is not None:
            daemon.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
