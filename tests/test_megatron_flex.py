"""megatron-core's own flex dispatcher (``MoEFlexTokenDispatcher``, deepep backend) on our Buffer,
through :func:`deepep_megatron.megatron.use_for_flex_dispatcher` (CPU, gloo ranks).

The flex dispatcher is megatron's class, unmodified: it reaches our ``Buffer`` through megatron's
``fused_a2a`` (``get_buffer``, ``FusedDispatch``, ``FusedCombine``). Its results are compared with
megatron-core's alltoall dispatcher and a plain reference on the same inputs.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("megatron.core")

from deepep_megatron.testing import megatron as mt  # noqa: E402
from tests.test_megatron_dispatcher import MOE_KEYS, assert_close, rel_err  # noqa: E402

pytestmark = pytest.mark.megatron


def test_use_for_flex_dispatcher_binds_and_restores(cpu_pools):
    """megatron's fused_a2a, imported before (HAVE_DEEP_EP False, fused_dispatch None), is re-bound
    to our Buffer by use_for_flex_dispatcher (idempotently), and restored by the undo."""
    before, during, after = cpu_pools(2).run(mt.flex_binding_states)[0]
    assert before == {
        "have_deep_ep": False,
        "buffer_is_ours": False,
        "dispatch_bound": False,
        "deep_ep_registered": False,
    }
    assert all(during.values()), during
    assert after == before


@pytest.mark.parametrize("ep", [2, 4])
def test_flex_dispatcher_matches_alltoall_and_reference(cpu_pools, ep):
    """The six stages of MoEFlexTokenDispatcher on our Buffer give megatron's alltoall dispatcher's
    outputs and input/probability gradients, and the plain semantics."""
    pool = cpu_pools(4)
    flex = pool.run(mt.dispatcher_step, ep, "flex")
    alltoall = pool.run(mt.dispatcher_step, ep, "alltoall")
    reference = pool.run(mt.dispatcher_step, ep, "reference")
    keys = ["out", "grad_x", "grad_probs"]
    for rank in range(4):
        assert flex[rank]["out"].abs().max() > 0
        assert_close(flex[rank], alltoall[rank], keys, what=f"EP={ep} flex vs alltoall rank {rank}")
        assert_close(flex[rank], reference[rank], keys, what=f"EP={ep} flex vs reference rank {rank}")
        assert rel_err(flex[rank]["grad_probs"], reference[rank]["grad_probs"]) < 1e-5


def test_flex_dispatcher_dropped_slots_and_empty_ranks(cpu_pools):
    """Edge cases through megatron's flex code: tokens with fewer than top-k experts (capacity
    dropping: -1 slots), and every token on rank 0's experts (ranks 1-3 receive nothing)."""
    pool = cpu_pools(4)
    for args in ((5, 0.3), (9, 0.0, None, True)):
        flex = pool.run(mt.dispatcher_step, 4, "flex", *args)
        reference = pool.run(mt.dispatcher_step, 4, "reference", *args)
        for rank in range(4):
            assert_close(
                flex[rank], reference[rank], ["out", "grad_x", "grad_probs"], what=f"{args} rank {rank}"
            )


def test_flex_moe_layer_matches_alltoall(cpu_pools):
    """A whole MoELayer built by megatron with moe_token_dispatcher_type="flex" (group-limited
    sigmoid router, shared expert) at EP=2 and 4 equals the alltoall dispatcher at EP=1."""
    pool = cpu_pools(4)
    reference = pool.run(mt.moe_layer_step, 1, "alltoall")
    for ep in (2, 4):
        flex = pool.run(mt.moe_layer_step, ep, "flex")
        assert flex[0]["dispatcher"] == "MoEFlexTokenDispatcher"
        assert flex[0]["buffer_backend"] is None  # megatron's own Buffer cache, not ours
        for rank in range(4):
            assert_close(flex[rank], reference[rank], MOE_KEYS, what=f"EP={ep} rank {rank}")


def test_flex_under_overlap_schedule(cpu_pools):
    """megatron's flex dispatcher on our Buffer also runs under its EP-overlap schedule (the
    pairing megatron supports: the schedule re-points the flex manager's probabilities at its
    detached tensors): a 2-MoE-layer GPT step gives the plain step's losses and gradients, and the
    deepep dispatcher's losses."""
    from deepep_megatron.testing import megatron_overlap as mo
    from tests.test_megatron_overlap import assert_same_step

    pool = cpu_pools(4)
    plain = pool.run(mo.train_step, 4, "flex", False)
    overlapped = pool.run(mo.train_step, 4, "flex", True)
    deepep = pool.run(mo.train_step, 4, "deepep", False)
    for rank in range(4):
        assert_same_step(overlapped[rank], plain[rank], 1e-6, 1e-6, f"flex overlap vs plain rank {rank}")
        assert torch.allclose(plain[rank]["losses"], deepep[rank]["losses"], rtol=1e-3, atol=0)


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--moe-token-dispatcher-type", "flex"], True),
        (["--moe-token-dispatcher-type=flex", "--moe-flex-dispatcher-backend", "deepep"], True),
        (["--moe-token-dispatcher-type", "flex", "--moe-flex-dispatcher-backend=hybridep"], False),
        (["--moe-token-dispatcher-type", "flex", "--moe-enable-deepep"], True),
        (["--moe-token-dispatcher-type", "alltoall"], False),
        (["--moe-token-dispatcher-type", "flex", "--moe-token-dispatcher-type", "deepep"], False),
        ([], False),
    ],
)
def test_runner_recognises_flex_deepep(argv, expected):
    """The runner (deepep_megatron.megatron.run) points flex at our Buffer exactly when the script's
    arguments select flex with the deepep backend (the last value of a repeated flag wins)."""
    from deepep_megatron.megatron.flex import flex_deepep_requested

    assert flex_deepep_requested(argv) is expected


# ---------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_flex_dispatcher_matches_reference(gpu_pools):
    """On CUDA tensors (compiled kernels when built): megatron's flex path with async_finish and
    its EventOverlap(EventHandle()) ordering, through the dispatcher stages and a whole MoELayer."""
    pool = gpu_pools(4)
    flex = pool.run(mt.dispatcher_step, 4, "flex")
    reference = pool.run(mt.dispatcher_step, 4, "reference")
    for rank in range(4):
        assert_close(flex[rank], reference[rank], ["out", "grad_x", "grad_probs"], what=f"rank {rank}")
    baseline = pool.run(mt.moe_layer_step, 1, "deepep", False, False)
    layer = pool.run(mt.moe_layer_step, 4, "flex")
    for rank in range(4):
        assert_close(layer[rank], baseline[rank], MOE_KEYS, what=f"MoELayer rank {rank}")
