"""DeepEPTokenDispatcher against megatron-core's alltoall dispatcher and a plain reference, EP
equivalence of a whole MoELayer, FP8 dispatch error, and registration (CPU, gloo ranks).

The GPU section at the end runs the same checks with several ranks sharing one GPU.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("megatron.core")

from deepep_megatron.testing import megatron as mt  # noqa: E402

pytestmark = pytest.mark.megatron

# BF16 results: one rounding of a sum of O(1) terms is ~2**-8 relative; allow a few.
REL_TOL = 2e-2


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / (scale if scale > 0 else 1.0)


def assert_close(a: dict, b: dict, keys, tol=REL_TOL, what=""):
    for key in keys:
        err = rel_err(a[key], b[key])
        assert err <= tol, f"{what} {key}: relative error {err:.3e} > {tol}"


@pytest.mark.parametrize("ep", [2, 4])
def test_dispatcher_matches_alltoall_and_reference(cpu_pools, ep):
    """Outputs and the gradients of the input and of the top-k probabilities equal megatron-core's
    alltoall dispatcher and the plain semantics (sum over experts of p * expert(x))."""
    pool = cpu_pools(4)
    ours = pool.run(mt.dispatcher_step, ep, "deepep")
    alltoall = pool.run(mt.dispatcher_step, ep, "alltoall")
    reference = pool.run(mt.dispatcher_step, ep, "reference")
    for rank in range(4):
        assert_close(
            ours[rank], alltoall[rank], ["out", "grad_x", "grad_probs"], what=f"vs alltoall rank {rank}"
        )
        assert_close(
            ours[rank], reference[rank], ["out", "grad_x", "grad_probs"], what=f"vs reference rank {rank}"
        )
        # Probabilities' gradients are fp32 end to end: much tighter than BF16.
        assert rel_err(ours[rank]["grad_probs"], reference[rank]["grad_probs"]) < 1e-5


def test_dispatcher_handles_dropped_slots(cpu_pools):
    """Tokens with fewer than top-k experts (capacity dropping) dispatch with -1 slots."""
    pool = cpu_pools(4)
    ours = pool.run(mt.dispatcher_step, 4, "deepep", 5, 0.3)
    reference = pool.run(mt.dispatcher_step, 4, "reference", 5, 0.3)
    for rank in range(4):
        assert_close(ours[rank], reference[rank], ["out", "grad_x", "grad_probs"], what=f"rank {rank}")


def test_dispatcher_rank_receives_nothing(cpu_pools):
    """Every token routed to rank 0's experts: ranks 1-3 receive zero rows, run their experts on
    empty inputs and still combine and backpropagate (megatron-core issue #1877's case)."""
    pool = cpu_pools(4)
    ours = pool.run(mt.dispatcher_step, 4, "deepep", 9, 0.0, None, True)
    reference = pool.run(mt.dispatcher_step, 4, "reference", 9, 0.0, None, True)
    for rank in range(4):
        assert_close(ours[rank], reference[rank], ["out", "grad_x", "grad_probs"], what=f"rank {rank}")


MOE_KEYS = ["out", "grad_x", "grad_router", "grad_fc1", "grad_fc2", "grad_shared_fc1", "grad_shared_fc2"]


def test_moe_layer_equal_across_ep(cpu_pools):
    """A whole MoELayer (group-limited sigmoid router with expert bias, 16 experts, shared expert)
    gives the same outputs and gradients at EP=1, 2 and 4, and equals the alltoall dispatcher."""
    pool = cpu_pools(4)
    reference = pool.run(mt.moe_layer_step, 1, "alltoall")
    assert reference[0]["dispatcher"] == "MoEAlltoAllTokenDispatcher"
    for ep in (1, 2, 4):
        ours = pool.run(mt.moe_layer_step, ep, "deepep")
        assert ours[0]["dispatcher"] == "DeepEPTokenDispatcher"
        for rank in range(4):
            assert_close(ours[rank], reference[rank], MOE_KEYS, what=f"EP={ep} rank {rank}")


def test_shared_expert_overlap(cpu_pools):
    """moe_shared_expert_overlap (shared experts scheduled inside dispatch/combine) gives the same
    results (the output bit for bit; the input gradient up to the order autograd adds its three
    BF16 contributions in)."""
    pool = cpu_pools(4)
    plain = pool.run(mt.moe_layer_step, 4, "deepep", False)
    overlapped = pool.run(mt.moe_layer_step, 4, "deepep", True)
    for rank in range(4):
        assert torch.equal(overlapped[rank]["out"], plain[rank]["out"])
        assert_close(overlapped[rank], plain[rank], MOE_KEYS, what=f"rank {rank}")


def test_fp8_dispatch_error_bound(cpu_pools):
    """FP8 dispatch delivers exactly the 1x128-block FP8 round trip of each token, so its error
    against BF16 dispatch stays within fp8_roundtrip_error_bound."""
    pool = cpu_pools(4)
    for result in pool.run(mt.fp8_dispatch_roundtrip, 4):
        assert result["fp8"].shape == result["bf16"].shape and result["fp8"].numel() > 0
        assert torch.equal(result["fp8"], result["expected"])
        assert bool(((result["fp8"] - result["bf16"]).abs() <= result["bound"]).all())


def test_moe_layer_over_emulated_nodes(cpu_pools):
    """EP=4 as 2 nodes x 2 (--deepep-num-ranks-per-node 2) gives the one-node results: the
    dispatcher's Buffer takes the node size (on CPU tensors the portable backend serves both)."""
    pool = cpu_pools(4)
    one_node = pool.run(mt.moe_layer_step, 4, "deepep", True, False)
    two_nodes = pool.run(mt.moe_layer_step, 4, "deepep", True, False, ranks_per_node=2)
    assert [r["buffer_ranks_per_node"] for r in two_nodes] == [2] * 4
    assert [r["buffer_ranks_per_node"] for r in one_node] == [4] * 4
    for rank in range(4):
        assert_close(two_nodes[rank], one_node[rank], MOE_KEYS, tol=1e-6, what=f"rank {rank}")


def test_fp8_dispatch_moe_layer(cpu_pools):
    """With FP8 dispatch the MoE layer output stays close to BF16 dispatch; gradients (BF16 wire)
    stay close too."""
    pool = cpu_pools(4)
    bf16 = pool.run(mt.moe_layer_step, 4, "deepep", False, False)
    fp8 = pool.run(mt.moe_layer_step, 4, "deepep", False, True)
    for rank in range(4):
        # e4m3 keeps 3 mantissa bits: ~6% per element, averaging down through the GEMMs.
        assert_close(
            fp8[rank], bf16[rank], ["out", "grad_x", "grad_fc1", "grad_fc2"], tol=0.1, what=f"rank {rank}"
        )
        assert rel_err(fp8[rank]["out"], bf16[rank]["out"]) > 0  # FP8 really was used


def test_install_registers_dispatcher_type():
    """install() makes Megatron-LM's parser accept --moe-token-dispatcher-type deepep and the
    --deepep-* flags; uninstall() restores the stock choices."""
    pytest.importorskip("megatron.training")
    from deepep_megatron.megatron import install, installed, uninstall

    was_installed = installed()
    uninstall()
    try:
        with pytest.raises(SystemExit):
            mt.parse_megatron_args(["--moe-token-dispatcher-type", "deepep"])
        install()
        args = mt.parse_megatron_args(
            ["--moe-token-dispatcher-type", "deepep", "--no-deepep-fp8-dispatch", "--deepep-num-sms", "24"]
        )
        assert args.moe_token_dispatcher_type == "deepep"
        assert args.deepep_fp8_dispatch is False and args.deepep_num_sms == 24
        args = mt.parse_megatron_args(["--moe-token-dispatcher-type", "alltoall"])
        assert args.deepep_fp8_dispatch is None and args.deepep_timing is None
    finally:
        uninstall()
        if was_installed:
            install()


def test_config_accepts_deepep_with_shared_expert_overlap():
    """TransformerConfig validates 'deepep' like 'alltoall' (e.g. shared-expert overlap) after
    install(), and rejects it before."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    from deepep_megatron.megatron import install, installed, uninstall

    kwargs = dict(
        num_layers=1,
        hidden_size=64,
        num_attention_heads=4,
        num_moe_experts=4,
        moe_router_topk=2,
        moe_shared_expert_intermediate_size=32,
        moe_shared_expert_overlap=True,
        moe_token_dispatcher_type="deepep",
        add_bias_linear=False,
    )
    was_installed = installed()
    uninstall()
    try:
        with pytest.raises(ValueError):
            TransformerConfig(**kwargs)
        install(arguments=False)
        assert TransformerConfig(**kwargs).moe_token_dispatcher_type == "deepep"
    finally:
        uninstall()
        if was_installed:
            install(arguments=False)


# ---------------------------------------------------------------------------- GPU


def _gpu_ready() -> bool:
    return torch.cuda.is_available()


gpu = pytest.mark.skipif(not _gpu_ready(), reason="needs a CUDA GPU")


def nvshmem_built() -> bool:
    from deepep_megatron.backends import nvshmem

    return nvshmem.module is not None and hasattr(nvshmem.module, "InternodeRuntime")


@pytest.fixture(scope="module")
def gpu_pool():
    """4 ranks on the GPU(s): with a single GPU all ranks share it under MPS (the compiled kernels
    need the ranks' kernels to run concurrently), bootstrapped over gloo."""
    from deepep_megatron.launch import start_mps_daemon
    from deepep_megatron.testing.rank_pool import RankPool

    share_gpu = torch.cuda.device_count() < 4
    env = {"DEEPEP_MEGATRON_SHARE_GPU": "1" if share_gpu else "0", "DEEPEP_MEGATRON_TIMEOUT_S": "60"}
    daemon = start_mps_daemon() if share_gpu else None
    if daemon is not None:
        env.update(daemon.env)
    pool = RankPool(4, backend="gloo", device="cuda", env=env)
    yield pool
    pool.close()
    if daemon is not None:
        daemon.stop()


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("ep", [2, 4])
def test_gpu_dispatcher_matches_reference(gpu_pool, ep):
    """On CUDA tensors (compiled kernels when built, else the portable backend), BF16 dispatch."""
    ours = gpu_pool.run(mt.dispatcher_step, ep, "deepep", 21, 0.0, False)
    reference = gpu_pool.run(mt.dispatcher_step, ep, "reference")
    for rank in range(4):
        assert_close(ours[rank], reference[rank], ["out", "grad_x", "grad_probs"], what=f"rank {rank}")


@gpu
@pytest.mark.gpu
def test_gpu_moe_layer_equal_across_ep(gpu_pool):
    """Whole MoELayer on the GPU, BF16 dispatch: EP=1, 2, 4 agree (EP=1 is the reference)."""
    reference = gpu_pool.run(mt.moe_layer_step, 1, "deepep", False, False)
    for ep in (2, 4):
        for overlap in (False, True):
            ours = gpu_pool.run(mt.moe_layer_step, ep, "deepep", overlap, False)
            for rank in range(4):
                assert_close(
                    ours[rank], reference[rank], MOE_KEYS, what=f"EP={ep} overlap={overlap} rank {rank}"
                )


@gpu
@pytest.mark.gpu
def test_gpu_compiled_backend_matches_portable(gpu_pool):
    """The compiled kernels (when built) give the portable backend's results through the whole
    MoELayer, forward and backward, FP8 dispatch (the GPU default) and shared-expert overlap on."""
    portable = gpu_pool.run(mt.moe_layer_step, 4, "deepep", True, None, 11, "portable")
    auto = gpu_pool.run(mt.moe_layer_step, 4, "deepep", True, None, 11, "auto")
    assert portable[0]["buffer_backend"] == "portable"
    print(f"Buffer backend for CUDA tensors: {auto[0]['buffer_backend']}")
    for rank in range(4):
        assert_close(auto[rank], portable[rank], MOE_KEYS, tol=1e-6, what=f"rank {rank}")


@gpu
@pytest.mark.gpu
def test_gpu_moe_layer_over_emulated_nodes_matches_portable(gpu_pool):
    """EP=4 as 2 emulated nodes x 2 on CUDA tensors: the dispatcher's Buffer runs the internode
    kernels (where NVSHMEM is built) and the whole MoELayer, forward and backward, FP8 dispatch,
    gives the portable backend's results. Combine adds each node's partial sum: another order of
    fp32 additions than the portable backend's, hence the tolerance."""
    portable = gpu_pool.run(mt.moe_layer_step, 4, "deepep", True, None, 11, "portable", ranks_per_node=2)
    auto = gpu_pool.run(mt.moe_layer_step, 4, "deepep", True, None, 11, "auto", ranks_per_node=2)
    print(f"Buffer backend over 2 emulated nodes: {auto[0]['buffer_backend']}")
    if nvshmem_built():
        assert auto[0]["buffer_backend"] == "internode", auto[0]["buffer_backend"]
    for rank in range(4):
        assert_close(auto[rank], portable[rank], MOE_KEYS, tol=1e-3, what=f"rank {rank}")


@gpu
@pytest.mark.gpu
def test_gpu_fp8_dispatch(gpu_pool):
    """FP8 dispatch (the GPU default) on CUDA tensors: exact FP8 round trip, within the bound."""
    for result in gpu_pool.run(mt.fp8_dispatch_roundtrip, 4):
        assert torch.equal(result["fp8"], result["expected"])
        assert bool(((result["fp8"] - result["bf16"]).abs() <= result["bound"]).all())
    bf16 = gpu_pool.run(mt.moe_layer_step, 4, "deepep", False, False)
    fp8 = gpu_pool.run(mt.moe_layer_step, 4, "deepep", False, None)  # default: FP8 on GPU
    for rank in range(4):
        assert_close(fp8[rank], bf16[rank], ["out", "grad_x"], tol=0.1, what=f"rank {rank}")
