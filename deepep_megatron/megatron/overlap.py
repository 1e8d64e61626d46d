"""The deepep dispatcher under megatron-core's EP-communication overlap
(``--overlap-moe-expert-parallel-comm``, optionally ``--delay-wgrad-compute``).

That schedule (``pipeline_parallel/combined_1f1b.py``, ``models/common/model_chunk_schedule_plan.py``)
runs the forward of one micro-batch interleaved with the backward of another, layer by layer, so
each one's dispatch/combine runs on a communication stream while the other computes. It splits a
transformer layer into four schedule nodes (``models/gpt/fine_grained_callables.py``):

- ``pre_dispatch_computation`` (compute stream): attention, ``MoELayer.route`` and ``preprocess``
  -> ``dispatch_preprocess``;
- ``moe_dispatch`` (communication stream): ``MoELayer.dispatch`` -> ``token_dispatch(tokens, probs)``;
- ``mlp`` (compute stream): ``routed_experts_compute`` -> ``dispatch_postprocess``,
  ``get_expert_zero_copy_buffers`` (the base class's ``(None, None)``), the experts,
  ``combine_preprocess``;
- ``moe_combine`` (communication stream): ``MoELayer.combine`` -> ``token_combine``, then
  ``postprocess`` -> ``combine_postprocess``.

Each node detaches its inputs, so the dispatcher must take the probabilities from its arguments,
not from state saved by an earlier stage (megatron's own flex dispatcher needs the schedule to
overwrite ``_comm_manager.token_probs``; ``DeepEPTokenDispatcher`` reads its arguments and needs
nothing), and a layer's forward state must survive another micro-batch's backward running in
between (``DeepEPTokenDispatcher`` keeps forward state per layer call and backward state in its
autograd Functions only).

What it does need is the right **free-input policy**. After a node's forward, the schedule may
release its inputs' storage (``untyped_storage().resize_(0)``) when ``should_free_input`` says the
backward will not read them. Megatron decides by dispatcher type; a ``deepep`` layer, being
neither ``flex`` nor ``alltoall``, would have all three inputs below freed, two of them wrongly
(the schedule then fails in backward reading freed storage). :func:`deepep_frees_input` answers:

- ``moe_dispatch`` -- inputs: the local tokens ``[N, H]`` and top-k probabilities. Not freed: our
  ``dispatch_preprocess`` returns the tokens as a view of the pre-MLP layernorm output, which the
  router (and the shared experts) saved for their backward. (alltoall permutes into a new tensor
  first, so it may free; megatron keeps them for its deepep flex path for the same reason as ours.)
- ``mlp`` -- input: the received rows ``[R, H]``. Not freed: with the compiled backend they are
  views of the Buffer's zero-copy arena, whose storage cannot be resized (and must not be: it is
  the Buffer's). They are released with the node after its backward, at the cost of holding
  ``R x H`` per MoE layer and micro-batch in flight until then.
- ``moe_combine`` -- input: the un-permuted expert outputs ``[R, H]``, a new tensor that the
  combine's backward (a cached dispatch of the output gradient) does not read. Freed.
"""

from __future__ import annotations

from deepep_megatron.megatron.options import DISPATCHER_TYPE

# Node name -> whether the schedule may free that node's inputs after its forward (see above).
DEEPEP_FREE_INPUT = {"moe_dispatch": False, "mlp": False, "moe_combine": True}


def deepep_frees_input(name: str, is_moe: bool) -> bool:
    """``should_free_input`` for a layer with the deepep dispatcher (dense layers free nothing)."""
    return is_moe and DEEPEP_FREE_INPUT.get(name, False)


def wrap_should_free_input(original):
    """``megatron.core.models.common.utils.should_free_input``, answering for deepep layers."""

    def should_free_input(name, is_moe, config, num_local_experts):
        if getattr(config, "moe_token_dispatcher_type", None) == DISPATCHER_TYPE:
            return deepep_frees_input(name, is_moe)
        return original(name, is_moe, config, num_local_experts)

    should_free_input.__wrapped__ = original
    return should_free_input
