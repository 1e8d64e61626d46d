"""Rank-side helpers for the EP-overlap tests: a small MoE GPTModel trained for one step of
several micro-batches, either plainly (forward + backward per micro-batch) or under megatron-core's
combined 1F1B EP-overlap schedule (``--overlap-moe-expert-parallel-comm``).

Run inside ``RankPool`` ranks (``deepep_megatron.testing.rank_pool``), like
``deepep_megatron.testing.megatron``; results come back as CPU tensors.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from deepep_megatron.testing.megatron import NUM_EXPERTS, device, moe_config, setup, teardown

GPT_SEQ, GPT_BATCH, VOCAB, NUM_MICROBATCHES = 16, 2, 256, 3


def gpt_config(dispatcher: str, overlap: bool, num_layers: int = 2):
    """moe_config's MoE recipe in a GPT of ``num_layers`` MoE layers, without the shared-expert
    overlap (the EP-overlap schedule excludes it) and with the plain-torch kernels."""
    return moe_config(
        dispatcher,
        num_layers=num_layers,
        overlap_moe_expert_parallel_comm=overlap,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
    )


def build_gpt(config):
    """megatron-core's GPTModel (local spec: SequentialMLP experts), BF16 parameters."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = get_gpt_layer_local_spec(num_experts=NUM_EXPERTS, moe_grouped_gemm=False)
    model = GPTModel(
        config=config, transformer_layer_spec=spec, vocab_size=VOCAB, max_sequence_length=GPT_SEQ
    )
    model = model.to(device())
    for param in model.parameters():  # parameters only: the router's buffers stay fp32
        param.data = param.data.to(torch.bfloat16)
    return model


def microbatches(seed: int) -> list[dict]:
    """This rank's micro-batches: token ids, next-token labels, and a loss mask that drops a few
    positions (so the per-token normalisation is exercised)."""
    rank = dist.get_rank()
    batches = []
    for i in range(NUM_MICROBATCHES):
        g = torch.Generator().manual_seed(seed * 1000 + rank * 10 + i)
        tokens = torch.randint(0, VOCAB, (GPT_BATCH, GPT_SEQ + 1), generator=g)
        mask = (torch.rand(GPT_BATCH, GPT_SEQ, generator=g) > 0.1).float()
        batches.append(
            {
                "tokens": tokens[:, :-1].to(device()),
                "labels": tokens[:, 1:].to(device()),
                "loss_mask": mask.to(device()),
                "position_ids": torch.arange(GPT_SEQ, device=device()).expand(GPT_BATCH, -1),
                # Causal, True = masked (megatron's default mask is built on device="cuda").
                "attention_mask": torch.ones(1, 1, GPT_SEQ, GPT_SEQ, device=device()).triu(1).bool(),
            }
        )
    return batches


def loss_func(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    """Megatron's 3-tuple loss convention: (masked sum, token count, values to report)."""
    loss_sum = (per_token_loss.float() * loss_mask).sum()
    count = loss_mask.sum().to(torch.int)
    return loss_sum, count, {"lm loss": loss_sum.detach() / count}


def _model_inputs(batch: dict) -> dict:
    return dict(
        input_ids=batch["tokens"],
        position_ids=batch["position_ids"],
        attention_mask=batch["attention_mask"],
        labels=batch["labels"],
    )


def _plain_step(model, batches) -> list[float]:
    """Forward + backward per micro-batch, losses scaled as megatron's schedules scale them."""
    losses = []
    for batch in batches:
        loss_sum, count, _ = loss_func(batch["loss_mask"], model(**_model_inputs(batch)))
        (loss_sum / count / len(batches)).backward()
        losses.append((loss_sum / count).item())
    return losses


def _overlapped_step(model, batches, config) -> list[float]:
    """megatron-core's combined 1F1B schedule (no pipelining): micro-batch i+1's forward runs
    layer by layer interleaved with micro-batch i's backward."""
    import functools

    from megatron.core.pipeline_parallel.combined_1f1b import combined_1f1b_schedule_for_no_pipelining

    def forward_step(data_iterator, model, return_schedule_plan=False):
        assert return_schedule_plan, "the EP-overlap schedule asks for a schedule plan"
        batch = next(data_iterator)
        plan = model.build_schedule_plan(**_model_inputs(batch))
        return plan, functools.partial(loss_func, batch["loss_mask"])

    store, _ = combined_1f1b_schedule_for_no_pipelining(
        forward_step,
        iter(batches),
        model,
        len(batches),
        None,  # input_tensor (no pipelining)
        None,  # output_tensor_grad
        [],
        config,
        False,  # collect_non_loss_data
        None,  # first_val_step
        False,  # forward_only
        contextlib.nullcontext,
        torch.zeros([], dtype=torch.int, device=device()),  # total_num_tokens
        lambda is_first: is_first,  # check_first_val_step
    )
    return [float(item["lm loss"]) for item in store]


def train_step(ep: int, dispatcher: str = "deepep", overlap: bool = False, seed: int = 3, fp8=None):
    """One optimizer-free training step of a 2-MoE-layer GPT over NUM_MICROBATCHES micro-batches.

    Returns ``{"losses" [M], "grads": {name: fp32 CPU gradient}}`` for this rank; with
    ``overlap`` the step runs under megatron-core's combined 1F1B EP-overlap schedule (the model
    is built with ``overlap_moe_expert_parallel_comm=True``), otherwise plainly. ``fp8``: the
    deepep dispatcher's FP8 dispatch (None: its default, on for CUDA tensors)."""
    from deepep_megatron.megatron import configure

    try:
        setup(ep)
        if fp8 is not None:
            configure(fp8_dispatch=fp8)
        config = gpt_config(dispatcher, overlap)
        model = build_gpt(config)
        batches = microbatches(seed)
        losses = _overlapped_step(model, batches, config) if overlap else _plain_step(model, batches)
        grads = {
            name: param.grad.float().cpu()
            for name, param in model.named_parameters()
            if param.grad is not None
        }
        return {"losses": torch.tensor(losses), "grads": grads}
    finally:
        teardown()
