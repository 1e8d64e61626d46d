"""The deepep dispatcher under megatron-core's EP-communication overlap
(``overlap_moe_expert_parallel_comm``: the combined 1F1B schedule).

CPU (gloo ranks): megatron's own ``combined_1f1b_schedule_for_no_pipelining`` trains a 2-MoE-layer
GPT for one step of 3 micro-batches; losses and every gradient must equal the plain step (forward
+ backward per micro-batch) with the same dispatcher, and the losses must equal megatron's alltoall
dispatcher's up to BF16 rounding. The GPU section runs the same on CUDA tensors, where the
schedule's streams are real.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("megatron.core")

from deepep_megatron.testing import megatron_overlap as mo  # noqa: E402
from tests.test_megatron_dispatcher import REL_TOL, rel_err  # noqa: E402

pytestmark = pytest.mark.megatron


def assert_same_step(ours: dict, ref: dict, loss_tol: float, grad_tol: float, what: str) -> None:
    assert torch.allclose(ours["losses"], ref["losses"], rtol=loss_tol, atol=0), (
        what,
        ours["losses"],
        ref["losses"],
    )
    assert ours["grads"].keys() == ref["grads"].keys(), what
    for name, grad in ref["grads"].items():
        err = rel_err(ours["grads"][name], grad)
        assert err <= grad_tol, f"{what} {name}: relative error {err:.3e} > {grad_tol}"


@pytest.mark.parametrize("ep", [2, 4])
def test_overlap_schedule_matches_plain_step(cpu_pools, ep):
    """Same losses and gradients with and without the EP-overlap schedule (the schedule interleaves
    a micro-batch's forward with the previous one's backward, layer by layer, and frees node inputs
    by the deepep policy), and the same as megatron's alltoall dispatcher."""
    pool = cpu_pools(4)
    plain = pool.run(mo.train_step, ep, "deepep", False)
    overlapped = pool.run(mo.train_step, ep, "deepep", True)
    alltoall = pool.run(mo.train_step, ep, "alltoall", False)
    # Control: megatron's own supported pairing (alltoall under the overlap) through this harness.
    alltoall_overlapped = pool.run(mo.train_step, ep, "alltoall", True)
    expert_grads = [name for name in plain[0]["grads"] if "local_experts" in name]
    assert expert_grads and any(plain[0]["grads"][name].abs().max() > 0 for name in expert_grads)
    for rank in range(4):
        # Same arithmetic in the same order on the CPU: equal up to float noise.
        assert_same_step(overlapped[rank], plain[rank], 1e-6, 1e-6, f"EP={ep} overlap vs plain rank {rank}")
        assert_same_step(alltoall_overlapped[rank], alltoall[rank], 1e-6, 1e-6, f"EP={ep} alltoall control")
        # Against alltoall only the losses: the two dispatchers sum in different orders, so layer 2
        # sees BF16-different inputs and may route a token differently, which moves the gradients
        # of rarely chosen experts by far more than rounding (dispatcher-level gradients are
        # compared with alltoall's in test_megatron_dispatcher.py).
        assert torch.allclose(plain[rank]["losses"], alltoall[rank]["losses"], rtol=1e-3, atol=0)


def test_overlap_free_input_policy():
    """install() answers the schedule's should_free_input for deepep layers by our policy (keep the
    dispatch inputs and the received rows, free the combine input, nothing for dense layers) and
    leaves every other dispatcher's answers to megatron."""
    from types import SimpleNamespace

    from megatron.core.models.common import utils

    from deepep_megatron.megatron import install, installed, uninstall

    def answers(dispatcher):
        config = SimpleNamespace(
            moe_token_dispatcher_type=dispatcher,
            moe_flex_dispatcher_backend="deepep",
            fp8=None,
            fp4=None,
            cuda_graph_modules=[],
        )
        return {
            (name, is_moe): utils.should_free_input(name, is_moe, config, 4)
            for name in ("pre_dispatch_computation", "moe_dispatch", "mlp", "moe_combine")
            for is_moe in (False, True)
        }

    was_installed = installed()
    uninstall()
    try:
        stock = {d: answers(d) for d in ("alltoall", "flex")}
        install(arguments=False)
        assert {d: answers(d) for d in ("alltoall", "flex")} == stock
        ours = answers("deepep")
        assert ours == {
            (name, is_moe): is_moe and name == "moe_combine"
            for name in ("pre_dispatch_computation", "moe_dispatch", "mlp", "moe_combine")
            for is_moe in (False, True)
        }
        assert stock["alltoall"][("moe_dispatch", True)]  # what a deepep layer would get otherwise
    finally:
        uninstall()
        if was_installed:
            install(arguments=False)


def test_config_accepts_deepep_with_overlap():
    """TransformerConfig accepts overlap_moe_expert_parallel_comm with deepep after install() (as
    for alltoall: EP > 1, BF16, no shared-expert overlap), and rejects it before."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    from deepep_megatron.megatron import install, installed, uninstall

    kwargs = dict(
        num_layers=1,
        hidden_size=64,
        num_attention_heads=4,
        num_moe_experts=4,
        moe_router_topk=2,
        moe_token_dispatcher_type="deepep",
        expert_model_parallel_size=2,
        overlap_moe_expert_parallel_comm=True,
        bf16=True,
        add_bias_linear=False,
    )
    was_installed = installed()
    uninstall()
    try:
        with pytest.raises((AssertionError, ValueError)):
            TransformerConfig(**kwargs)
        install(arguments=False)
        assert TransformerConfig(**kwargs).moe_token_dispatcher_type == "deepep"
        with pytest.raises(AssertionError, match="moe_shared_expert_overlap"):
            TransformerConfig(
                **kwargs, moe_shared_expert_intermediate_size=32, moe_shared_expert_overlap=True
            )
    finally:
        uninstall()
        if was_installed:
            install(arguments=False)


# ---------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("fp8", [False, True])
def test_gpu_overlap_schedule_matches_plain_step(gpu_pools, fp8):
    """EP=4 ranks on CUDA tensors (compiled kernels when built): the overlap schedule, with real
    compute and communication streams, gives the plain step's losses and gradients. BF16 dispatch
    hands the experts views of the Buffer's zero-copy arena (which the schedule must not free)."""
    pool = gpu_pools(4)
    plain = pool.run(mo.train_step, 4, "deepep", False, fp8=fp8)
    overlapped = pool.run(mo.train_step, 4, "deepep", True, fp8=fp8)
    for rank in range(4):
        assert_same_step(overlapped[rank], plain[rank], 1e-3, REL_TOL, f"fp8={fp8} rank {rank}")


# ------------------------------------------------- the example on megatron-core's schedules


def test_example_overlap_needs_the_gpu_schedules():
    """pretrain.py refuses --overlap-moe-expert-parallel-comm where it would run its compact loop
    (CPU, or --compact-loop), which would silently ignore it."""
    from tests.test_megatron_pretrain import ROOT, SCRIPT

    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--config",
            "tiny",
            "--expert-model-parallel-size",
            "1",
            "--overlap-moe-expert-parallel-comm",
            "--compact-loop",
            "--wandb-project",
            "",
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert "--overlap-moe-expert-parallel-comm runs in megatron-core's schedules" in proc.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_example_schedules_and_overlap_match_compact_loop(tmp_path):
    """The proxy preset, EP=4 ranks on one GPU, 3 micro-batches per iteration: megatron-core's
    schedule gives the compact loop's losses, and so does its EP-overlap schedule."""
    from tests.test_megatron_pretrain import launch

    common = [
        "--config",
        "proxy",
        "--train-iters",
        "4",
        "--expert-model-parallel-size",
        "4",
        "--distributed-backend",
        "gloo",
        "--seq-length",
        "512",
        "--micro-batch-size",
        "1",
        "--global-batch-size",
        "12",
        "--wandb-project",
        "",
    ]
    env = {"DEEPEP_MEGATRON_SHARE_GPU": "1"}
    compact = launch(4, [*common, "--compact-loop"], tmp_path / "compact.jsonl", env=env)
    schedule = launch(4, common, tmp_path / "schedule.jsonl", env=env)
    overlap = launch(4, [*common, "--overlap-moe-expert-parallel-comm"], tmp_path / "overlap.jsonl", env=env)
    assert len(compact) == len(schedule) == len(overlap) == 4
    for ref, ours in zip(compact, schedule):
        assert abs(ours["train/loss"] - ref["train/loss"]) < 1e-2 * max(1.0, abs(ref["train/loss"]))
    # The overlap preset drops --moe-shared-expert-overlap (megatron excludes it); same arithmetic.
    for ref, ours in zip(schedule, overlap):
        assert abs(ours["train/loss"] - ref["train/loss"]) < 1e-2 * max(1.0, abs(ref["train/loss"]))
