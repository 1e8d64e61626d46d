"""The deepep dispatcher with the options megatron-core's flex dispatcher accepts: expert tensor
parallelism (the combined expert-TP x EP group), capacity dropping with padding of the expert
inputs to capacity, and padding of the expert inputs for quantised GEMMs; and the Buffer size
agreed across the group with uneven token counts (CPU, gloo ranks).

References: megatron-core's alltoall dispatcher on the same routing (its expert-TP path
all-gathers and reduce-scatters uneven splits, which gloo lacks: ``cpu_compat`` emulates them),
and the plain semantics ``out[t] = sum_e map[t, e] * p[t, e] * expert_e(x[t])``.

Padding routes (probability 0, added by the router for pad-to-capacity and by the alltoall
dispatcher for quantisation) are not sent: padding rows are added where the tokens arrive. Their
probabilities' gradients are therefore 0 here while alltoall computes them; megatron-core's router
discards them (its probabilities are a scatter of the top-k), so whole-layer gradients agree, which
the MoELayer tests check.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("megatron.core")

from deepep_megatron.megatron.expert_padding import (  # noqa: E402
    pad_rows,
    padded_counts,
    padding_destinations,
    unpad_rows,
)
from deepep_megatron.megatron.expert_tensor_parallel import (  # noqa: E402
    expand_over_expert_tp,
    real_expert_counts,
)
from deepep_megatron.testing import megatron as mt  # noqa: E402

pytestmark = pytest.mark.megatron

REL_TOL = 2e-2
STEP_KEYS = ["out", "grad_x", "grad_probs"]
MOE_KEYS = ["out", "grad_x", "grad_router", "grad_fc1", "grad_fc2", "grad_shared_fc1", "grad_shared_fc2"]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0 and b.numel() == 0:
        return 0.0
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / (scale if scale > 0 else 1.0)


def assert_step_close(ours: dict, ref: dict, what: str) -> None:
    """Outputs and input gradients everywhere; probability gradients on the real routes."""
    real = ref["real_routes"]
    for key in STEP_KEYS:
        a, b = ours[key], ref[key]
        if key == "grad_probs":
            a, b = a * real, b * real
        err = rel_err(a, b)
        assert err <= REL_TOL, f"{what} {key}: relative error {err:.3e}"


# ---------------------------------------------------------------------------- pure helpers


def test_expand_over_expert_tp_matches_plain_loop():
    """Each (token, slot) becomes T copies for the T expert-TP ranks of the expert's EP rank."""
    g = torch.Generator().manual_seed(3)
    num_local, tp, ep = 4, 2, 3
    idx = torch.randint(0, num_local * ep, (7, 3), generator=g)
    idx[1, 2] = idx[4, 0] = -1
    probs = torch.rand(7, 3, generator=g).requires_grad_(True)
    out_idx, out_probs = expand_over_expert_tp(idx, probs, num_local, tp)
    assert out_idx.shape == out_probs.shape == (7, 6)
    for n in range(7):
        for k in range(3):
            for t in range(tp):
                e = int(idx[n, k])
                expected = -1 if e < 0 else ((e // num_local) * tp + t) * num_local + e % num_local
                assert int(out_idx[n, k * tp + t]) == expected
                assert out_probs[n, k * tp + t] == probs[n, k]
    out_probs.sum().backward()
    assert torch.equal(probs.grad, torch.full_like(probs, tp))  # the T copies' gradients add up
    same_idx, same_probs = expand_over_expert_tp(idx, probs, num_local, 1)
    assert same_idx is idx and same_probs is probs


def test_real_expert_counts_folds_tp_copies():
    """Counts per virtual expert ((r * T + t) * L + l) fold back to counts per expert (r * L + l)."""
    num_local, tp, ep = 3, 2, 2
    real = torch.arange(ep * num_local) * 10
    virtual = torch.zeros(ep * tp * num_local, dtype=torch.long)
    for r in range(ep):
        for t in range(tp):
            for local in range(num_local):
                virtual[(r * tp + t) * num_local + local] = real[r * num_local + local]
    assert torch.equal(real_expert_counts(virtual, num_local, tp), real)
    assert real_expert_counts(real, num_local, 1) is real


@pytest.mark.parametrize(
    "counts,kwargs,expected",
    [
        ([3, 0, 16, 17], {"multiple": 16}, [16, 0, 16, 32]),
        ([3, 0, 5], {"rows_per_expert": 8}, [8, 8, 8]),
        ([0, 0], {"rows_per_expert": 0}, [0, 0]),
        ([3, 5], {}, [3, 5]),
    ],
)
def test_padding_round_trip(counts, kwargs, expected):
    """Padded sizes, and pad_rows / unpad_rows against a plain loop (zeros between groups)."""
    padded = padded_counts(counts, **kwargs)
    assert padded == expected
    x = torch.randn(sum(counts), 4, requires_grad=True)
    dest = padding_destinations(counts, padded, x.device)
    y = pad_rows(x, dest, sum(padded))
    chunks, start = [], 0
    for c, p in zip(counts, padded):
        chunks += [x[start : start + c].detach(), torch.zeros(p - c, 4)]
        start += c
    assert torch.equal(y.detach(), torch.cat(chunks))
    assert torch.equal(unpad_rows(y, dest).detach(), x.detach())
    (y * torch.arange(y.numel()).view_as(y)).sum().backward()
    assert torch.equal(x.grad, torch.arange(y.numel()).view_as(y).float()[dest])


def test_padding_over_capacity_raises():
    with pytest.raises(ValueError, match="more than its padded capacity"):
        padded_counts([3, 9], rows_per_expert=8)


# ---------------------------------------------------------------------------- expert tensor parallelism


@pytest.mark.parametrize("ep,etp", [(2, 2), (1, 4), (1, 2)])
def test_expert_tensor_parallel_matches_reference(cpu_pools, ep, etp):
    """ETP > 1: each expert split over expert-TP (stand-in experts return partial products); the
    dispatch over the TP x EP group sums them back: outputs and gradients equal the plain
    semantics, and every expert-TP rank of an expert sees the same rows."""
    pool = cpu_pools(4)
    ours = pool.run(mt.feature_dispatch_step, ep, "deepep", etp=etp)
    alltoall = pool.run(mt.feature_dispatch_step, ep, "alltoall", etp=etp)
    reference = pool.run(mt.feature_dispatch_step, ep, "reference", etp=etp)
    for rank in range(4):
        assert_step_close(ours[rank], reference[rank], f"EP={ep} ETP={etp} rank {rank}")
        assert_step_close(ours[rank], alltoall[rank], f"vs alltoall EP={ep} ETP={etp} rank {rank}")
        assert torch.equal(ours[rank]["tokens_per_expert"], alltoall[rank]["tokens_per_expert"])
    for rank in range(0, 4, etp):  # ranks rank..rank+etp-1 form one expert-TP group
        for peer in range(rank + 1, rank + etp):
            assert torch.equal(ours[peer]["tokens_per_expert"], ours[rank]["tokens_per_expert"])
        assert int(ours[rank]["tokens_per_expert"].sum()) > 0


@pytest.mark.parametrize("experts", ["sequential", "grouped"])
def test_expert_tensor_parallel_moe_layer(cpu_pools, experts):
    """A whole MoELayer at EP=2 x ETP=2 (SequentialMLP, or grouped GEMM experts split by
    column / row) equals megatron-core's alltoall dispatcher at EP=2 x ETP=2 and at EP=1 on the
    same global weights: output, input, router, expert and shared-expert gradients."""
    pool = cpu_pools(4)
    ours = pool.run(mt.moe_layer_step, 2, "deepep", experts=experts, etp=2)
    for reference in (
        pool.run(mt.moe_layer_step, 2, "alltoall", etp=2),
        pool.run(mt.moe_layer_step, 1, "alltoall"),
    ):
        for rank in range(4):
            for key in MOE_KEYS:
                err = rel_err(ours[rank][key], reference[rank][key])
                assert err <= REL_TOL, f"rank {rank} {key}: relative error {err:.3e}"


def test_expert_tensor_parallel_topk_limit(cpu_pools):
    """top-k x ETP above the dispatch's top-k limit (16) is refused with a clear error."""
    errors = cpu_pools(4).run(mt.dispatcher_build_error, 1, 4, moe_router_topk=6)
    assert all("top-k limit" in e for e in errors), errors


# ---------------------------------------------------------------------------- capacity and padding


@pytest.mark.parametrize("capacity_factor,pad", [(1.0, True), (0.5, True), (1.0, False)])
def test_capacity_matches_alltoall(cpu_pools, capacity_factor, pad):
    """--moe-expert-capacity-factor (the router drops over-capacity routes), with and without
    --moe-pad-expert-input-to-capacity: same outputs and gradients as alltoall and the plain
    semantics; padded, every local expert gets alltoall's static row count."""
    pool = cpu_pools(4)
    kwargs = dict(capacity_factor=capacity_factor, pad_to_capacity=pad)
    ours = pool.run(mt.feature_dispatch_step, 4, "deepep", **kwargs)
    alltoall = pool.run(mt.feature_dispatch_step, 4, "alltoall", **kwargs)
    reference = pool.run(mt.feature_dispatch_step, 4, "reference", **kwargs)
    dropped = sum(int((~r["real_routes"]).sum()) for r in reference)
    assert dropped > 0  # the capacity really dropped something
    for rank in range(4):
        assert_step_close(ours[rank], alltoall[rank], f"vs alltoall rank {rank}")
        assert_step_close(ours[rank], reference[rank], f"vs reference rank {rank}")
        assert torch.equal(ours[rank]["real_tokens"], alltoall[rank]["real_tokens"])
        if pad:
            assert torch.equal(ours[rank]["tokens_per_expert"], alltoall[rank]["tokens_per_expert"])
    if pad and capacity_factor >= 1.0:  # some experts are below capacity: padding rows exist
        assert any(bool((r["tokens_per_expert"] > r["real_tokens"]).any()) for r in ours)


def test_capacity_padding_moe_layer(cpu_pools):
    """A whole MoELayer with capacity 1.0 padded to capacity: deepep equals alltoall, router
    gradients included (the padding routes' probability gradients do not reach the router)."""
    pool = cpu_pools(4)
    overrides = dict(moe_expert_capacity_factor=1.0, moe_pad_expert_input_to_capacity=True)
    ours = pool.run(mt.moe_layer_step, 4, "deepep", **overrides)
    alltoall = pool.run(mt.moe_layer_step, 4, "alltoall", **overrides)
    for rank in range(4):
        for key in MOE_KEYS:
            err = rel_err(ours[rank][key], alltoall[rank][key])
            assert err <= REL_TOL, f"rank {rank} {key}: relative error {err:.3e}"


def test_padding_for_quantization(cpu_pools):
    """--moe-router-padding-for-quantization: every local expert's rows are a multiple of the
    FP8 alignment (16), the least such multiple (flex's layout), and results equal alltoall's
    (which pads per sender instead) and the plain semantics."""
    pool = cpu_pools(4)
    ours = pool.run(mt.feature_dispatch_step, 4, "deepep", pad_for_quantization=True)
    alltoall = pool.run(mt.feature_dispatch_step, 4, "alltoall", pad_for_quantization=True)
    reference = pool.run(mt.feature_dispatch_step, 4, "reference", pad_for_quantization=True)
    for rank in range(4):
        assert_step_close(ours[rank], alltoall[rank], f"vs alltoall rank {rank}")
        assert_step_close(ours[rank], reference[rank], f"vs reference rank {rank}")
        rows, real = ours[rank]["tokens_per_expert"], ours[rank]["real_tokens"]
        assert torch.equal(real, alltoall[rank]["real_tokens"])
        assert bool((rows % 16 == 0).all() and (rows >= real).all() and (rows - real < 16).all())
        assert bool((rows > real).any())


# ---------------------------------------------------------------------------- Buffer sizing


def test_buffer_size_agreed_with_uneven_tokens(cpu_pools):
    """Ranks with 0, few and many tokens get one Buffer size; when one rank's batch outgrows
    it, every rank rebuilds at that call, to the same size."""
    calls = [[0, 64, 3, 16], [0, 8, 8, 8], [0, 8, 400, 8]]
    results = cpu_pools(4).run(mt.buffer_sizes_over_calls, 4, calls)
    for call in range(len(calls)):
        sizes = results[0]["sizes"][call]
        assert len(set(sizes)) == 1, f"call {call}: ranks disagree on the Buffer size: {sizes}"
        assert len({r["rebuilt"][call] for r in results}) == 1, f"call {call}: not every rank rebuilt"
    assert [results[0]["rebuilt"][i] for i in range(3)] == [True, False, True]
    assert results[0]["sizes"][2][0] > results[0]["sizes"][0][0]


def test_dispatch_with_uneven_tokens(cpu_pools):
    """One rank with no tokens, one with many: results equal the plain semantics and alltoall's,
    and the Buffers agree in size."""
    pool = cpu_pools(4)
    counts = [0, 96, 5, 16]
    ours = pool.run(mt.feature_dispatch_step, 4, "deepep", tokens_per_rank=counts)
    alltoall = pool.run(mt.feature_dispatch_step, 4, "alltoall", tokens_per_rank=counts)
    reference = pool.run(mt.feature_dispatch_step, 4, "reference", tokens_per_rank=counts)
    assert len(set(ours[0]["nvl_bytes"])) == 1
    for rank in range(4):
        assert ours[rank]["out"].shape[0] == counts[rank]
        assert_step_close(ours[rank], reference[rank], f"vs reference rank {rank}")
        assert_step_close(ours[rank], alltoall[rank], f"vs alltoall rank {rank}")


# ---------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_dispatcher_options_match_reference():
    """The same options on CUDA tensors (4 ranks sharing GPU 0, BF16 dispatch): expert TP,
    capacity padding, quantisation padding and uneven token counts equal the plain semantics."""
    from deepep_megatron.testing.rank_pool import RankPool

    cases = [
        (2, dict(etp=2)),
        (4, dict(capacity_factor=1.0, pad_to_capacity=True)),
        (4, dict(pad_for_quantization=True)),
        (4, dict(tokens_per_rank=[0, 96, 5, 16])),
    ]
    pool = RankPool(4, backend="gloo", device="cuda", env={"DEEPEP_MEGATRON_SHARE_GPU": "1"})
    try:
        for ep, kwargs in cases:
            ours = pool.run(mt.feature_dispatch_step, ep, "deepep", **kwargs)
            reference = pool.run(mt.feature_dispatch_step, ep, "reference", **kwargs)
            for rank in range(4):
                assert_step_close(ours[rank], reference[rank], f"{kwargs} rank {rank}")
            assert len(set(ours[0]["nvl_bytes"])) == 1
    finally:
        pool.close()
