"""The example's GPU training step on megatron-core's own schedules (``get_forward_backward_func``).

On a GPU, ``pretrain.py`` runs the micro-batches of an iteration through megatron-core's
no-pipelining schedule instead of its compact loop, so the schedule's options apply -- above all the
EP-communication overlap (``--overlap-moe-expert-parallel-comm``: the combined 1F1B schedule, one
micro-batch's forward interleaved layer by layer with the previous one's backward, each one's
dispatch/combine on a communication stream). The schedules allocate on ``device="cuda"``, so the CPU
keeps the compact loop (``--compact-loop`` selects it on the GPU too).

Loss convention: megatron's 3-tuple ``(sum over tokens, token count, values to report)``; the
schedule divides by the count and the number of micro-batches before the backward, which is the
compact loop's ``mean / num_micro``.
"""

from __future__ import annotations

import functools

import torch


def loss_func(per_token_loss: torch.Tensor):
    """``per_token_loss [B, S]`` (GPTModel with labels) -> ``(sum, count, {"lm loss": mean})``."""
    loss_sum = per_token_loss.float().sum()
    count = torch.tensor(per_token_loss.numel(), dtype=torch.int, device=per_token_loss.device)
    return loss_sum, count, {"lm loss": loss_sum.detach() / per_token_loss.numel()}


def forward_step(positions: torch.Tensor, data_iterator, model, return_schedule_plan: bool = False):
    """megatron's ``forward_step_func``: one micro-batch of token ids ``[B, S + 1]`` (int64) ->
    ``(per-token losses [B, S], loss_func)``, or, when the EP-overlap schedule asks for it, the
    model's schedule plan in place of the losses (``model`` is then the unwrapped GPTModel)."""
    tokens = next(data_iterator)
    inputs = dict(input_ids=tokens[:, :-1], position_ids=positions, attention_mask=None, labels=tokens[:, 1:])
    if return_schedule_plan:
        return model.build_schedule_plan(**inputs), loss_func
    return model(**inputs), loss_func


def train_step(ddp, micro_batches: list[torch.Tensor], positions: torch.Tensor, args) -> torch.Tensor:
    """Forward and backward of ``micro_batches`` (each ``[B, S + 1]`` token ids on the GPU) through
    megatron-core's schedule; gradients accumulate in ``ddp``'s buffers. Returns the mean loss over
    the micro-batches (a 0-dim tensor on the GPU, unsynchronised)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    forward_backward = get_forward_backward_func()
    reported = forward_backward(
        forward_step_func=functools.partial(forward_step, positions),
        data_iterator=iter(micro_batches),
        model=[ddp],
        num_microbatches=len(micro_batches),
        seq_length=args.seq_length,
        micro_batch_size=args.micro_batch_size,
        forward_only=False,
    )
    return torch.stack([item["lm loss"] for item in reported]).mean()
