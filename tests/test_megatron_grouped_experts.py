"""Grouped-GEMM experts without Transformer Engine (deepep_megatron.megatron.grouped_experts).

``grouped_linear`` against plain per-expert matmuls on random inputs (empty experts, one expert
taking every row, no rows at all), bad input, and a whole MoELayer whose experts are
``TEGroupedMLP`` on torch's grouped GEMM against the same layer with ``SequentialMLP`` on the same
weights: outputs and every gradient, with the deepep and the alltoall dispatchers, EP=1, 2, 4
(CPU, gloo ranks: torch 2.13 runs grouped_mm forward and backward on the CPU). The GPU section
repeats the layer comparison on CUDA tensors.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("megatron.core")

from deepep_megatron.megatron.grouped_experts import grouped_linear  # noqa: E402
from deepep_megatron.testing import megatron as mt  # noqa: E402

pytestmark = pytest.mark.megatron

MOE_KEYS = ["out", "grad_x", "grad_router", "grad_fc1", "grad_fc2", "grad_shared_fc1", "grad_shared_fc2"]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = b.abs().max().item() if b.numel() else 0.0
    return (a - b).abs().max().item() / (scale if scale > 0 else 1.0) if a.numel() else 0.0


def plain_grouped_linear(x, weight, counts):
    """fp32 reference: each expert's rows times its weight, one matmul per expert."""
    outs, start = [], 0
    for e, n in enumerate(counts):
        outs.append(x[start : start + n] @ weight[e].t())
        start += n
    return torch.cat(outs) if outs else x.new_zeros(0, weight.size(1))


@pytest.mark.parametrize("counts", [[5, 0, 7, 3], [0, 0, 16, 0], [1, 2, 3, 4], [0, 0, 0, 0], [13, 1, 0, 9]])
def test_grouped_linear_matches_plain_matmuls(counts):
    """Forward and the gradients of input and weights equal per-expert fp32 matmuls (BF16
    rounding), for uneven, empty and unaligned groups."""
    g = torch.Generator().manual_seed(sum(counts) + len(counts))
    in_size, out_size = 32, 48
    x = torch.randn(sum(counts), in_size, generator=g).bfloat16().requires_grad_(True)
    w = (torch.randn(len(counts), out_size, in_size, generator=g) * in_size**-0.5).bfloat16()
    w.requires_grad_(True)
    dy = torch.randn(sum(counts), out_size, generator=g).bfloat16()
    out = grouped_linear(x, w, counts)
    out.backward(dy)
    x_ref = x.detach().float().requires_grad_(True)
    w_ref = w.detach().float().requires_grad_(True)
    ref = plain_grouped_linear(x_ref, w_ref, counts)
    ref.backward(dy.float())
    assert out.shape == (sum(counts), out_size) and out.dtype == torch.bfloat16
    assert rel_err(out.float(), ref) < 2e-2
    assert rel_err(x.grad.float(), x_ref.grad) < 2e-2
    assert rel_err(w.grad.float(), w_ref.grad) < 2e-2
    for e, n in enumerate(counts):  # an expert without rows gets an exactly zero gradient
        if n == 0:
            assert not w.grad[e].any()


def test_grouped_linear_broadcast_gradient():
    """``out.sum().backward()`` (a stride-0 gradient, which grouped_mm's backward rejects) works."""
    x = torch.randn(6, 16).bfloat16().requires_grad_(True)
    w = torch.randn(2, 8, 16).bfloat16().requires_grad_(True)
    grouped_linear(x, w, [2, 4]).sum().backward()
    expected = w.detach().float().sum(1)  # d(sum x @ W.T)/dx = column sums of W, per expert
    assert torch.allclose(x.grad[:2].float(), expected[0].expand(2, -1), rtol=2e-2, atol=2e-2)
    assert torch.allclose(x.grad[2:].float(), expected[1].expand(4, -1), rtol=2e-2, atol=2e-2)


def test_grouped_linear_rejects_bad_counts():
    x = torch.randn(6, 16).bfloat16()
    w = torch.randn(2, 8, 16).bfloat16()
    with pytest.raises(ValueError, match="does not describe"):
        grouped_linear(x, w, [2, 3])
    with pytest.raises(ValueError, match="does not describe"):
        grouped_linear(x, w, [2, 2, 2])


def test_grouped_linear_layer_validates_config(cpu_pools):
    """Bad configurations raise clear Python exceptions when the layer is built."""
    errors = cpu_pools(1).run(mt.grouped_linear_config_errors)[0]
    assert "bias" in errors["bias"]
    assert "bf16" in errors["fp32"]
    assert "multiple of 8" in errors["unaligned"]
    assert "bf16 inputs" in errors["fp32_input"]


@pytest.mark.parametrize("dispatcher,ep", [("deepep", 1), ("deepep", 2), ("deepep", 4), ("alltoall", 4)])
def test_moe_layer_grouped_matches_sequential(cpu_pools, dispatcher, ep):
    """A whole MoELayer with TEGroupedMLP on torch's grouped GEMM gives SequentialMLP's output and
    gradients (input, router, experts, shared expert) on the same weights and tokens."""
    pool = cpu_pools(4)
    sequential = pool.run(mt.moe_layer_step, ep, dispatcher, False, None, 11, None, "sequential")
    grouped = pool.run(mt.moe_layer_step, ep, dispatcher, False, None, 11, None, "grouped")
    assert grouped[0]["experts"] == "TEGroupedMLP" and sequential[0]["experts"] == "SequentialMLP"
    for rank in range(4):
        for key in MOE_KEYS:
            err = rel_err(grouped[rank][key], sequential[rank][key])
            # Both run BF16 GEMMs with fp32 accumulation; they differ by BF16 rounding only.
            assert err < 2e-2, f"rank {rank} {key}: relative error {err:.3e}"
        assert grouped[rank]["grad_fc1"].abs().sum() > 0


def test_sharded_state_dict_matches_sequential(cpu_pools):
    """The grouped experts' checkpoint entries have SequentialMLP's keys and global shapes."""
    for result in cpu_pools(4).run(mt.experts_sharded_state_dict, 2):
        assert result["grouped"] == result["sequential"]
        assert result["grouped"]  # not vacuous


# ---------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_moe_layer_grouped_matches_sequential():
    """On CUDA tensors (BF16 dispatch), grouped experts match SequentialMLP at EP=2."""
    from deepep_megatron.testing.rank_pool import RankPool

    pool = RankPool(2, backend="gloo", device="cuda", env={"DEEPEP_MEGATRON_SHARE_GPU": "1"})
    try:
        sequential = pool.run(mt.moe_layer_step, 2, "deepep", False, False, 11, "portable", "sequential")
        grouped = pool.run(mt.moe_layer_step, 2, "deepep", False, False, 11, "portable", "grouped")
    finally:
        pool.close()
    for rank in range(2):
        for key in MOE_KEYS:
            assert rel_err(grouped[rank][key], sequential[rank][key]) < 2e-2, f"rank {rank} {key}"
