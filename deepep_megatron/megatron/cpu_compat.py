"""Run megatron-core's MoE model code on the CPU (gloo), for tests and the tiny example.

megatron-core 0.19.2 assumes CUDA in a few places that matter for an MoE GPT model even when
every tensor lives on the CPU:

- ``torch.cuda.current_device()`` names the device of router buffers and weights
  (``router.py``) and of a few scratch tensors;
- ``torch.cuda.Stream`` / ``torch.cuda.stream`` / ``torch.cuda.current_stream`` are used by the
  shared-expert overlap (``shared_experts.py``) and by the alltoall dispatcher's D2H stream;
- the CUDA RNG tracker (``tensor_parallel.random``) is forked around attention dropout;
- ``MoEAuxLossAutoScaler``'s loss scale is set on the CUDA device by ``megatron.training``;
- the alltoall dispatcher's ``maybe_move_tensor_to_cpu`` turns CUDA split sizes into numpy arrays
  for ``all_to_all_single`` but leaves CPU tensors as tensors, which gloo rejects;
- with expert tensor parallelism, the alltoall dispatcher all-gathers and reduce-scatters uneven
  splits over the expert-TP group (``tensor_parallel.mappings``); gloo has no uneven all-gather
  and no reduce-scatter, so those two go through equal-size all-gathers and an all-reduce;
- the EP-overlap schedule (``--overlap-moe-expert-parallel-comm``) calls ``Tensor.record_stream``
  with its streams, which a CPU tensor rejects for a stand-in stream.

:func:`enable` replaces just these with CPU stand-ins (streams and events that do nothing,
because CPU work is synchronous, and ``current_device() == "cpu"``), and only when CUDA is not
available, so it is a no-op on a GPU machine. :func:`disable` undoes it. Nothing here changes a
result: every replaced call is about placement or ordering, or (the uneven collectives) computes
the same values another way.
"""

from __future__ import annotations

import contextlib

import torch

_saved: dict[str, object] = {}


class CpuStream:
    """Stands in for ``torch.cuda.Stream`` on the CPU, where all work is synchronous."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, stream) -> None:
        pass

    def wait_event(self, event) -> None:
        pass

    def record_event(self, event=None):
        return event if event is not None else CpuEvent()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def __eq__(self, other) -> bool:
        return isinstance(other, CpuStream)

    def __hash__(self) -> int:
        return 0


class CpuEvent:
    """Stands in for ``torch.cuda.Event`` on the CPU."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None) -> None:
        pass

    def wait(self, stream=None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


_DEFAULT_STREAM = CpuStream()


def _stream_context(stream=None):
    return contextlib.nullcontext()


def _gather_uneven(input_, group, output_split_sizes=None, use_global_buffer=False):
    """``mappings._gather_along_first_dim`` with uneven splits, over gloo: every rank's rows
    padded to the largest split, an equal-size all-gather, then the padding cut off."""
    import torch.distributed as dist

    original = _saved["mappings._gather_along_first_dim"]
    if output_split_sizes is None or group.size() == 1:
        return original(input_, group, output_split_sizes, use_global_buffer)
    most = max(output_split_sizes)
    padded = input_.new_zeros((most, *input_.shape[1:]))
    padded[: input_.size(0)] = input_
    pieces = [torch.empty_like(padded) for _ in output_split_sizes]
    dist.all_gather(pieces, padded, group=group)
    return torch.cat([piece[:n] for piece, n in zip(pieces, output_split_sizes)])


def _reduce_scatter_uneven(input_, group, input_split_sizes=None, use_global_buffer=False):
    """``mappings._reduce_scatter_along_first_dim`` with uneven splits, over gloo: an all-reduce
    (sum) of the whole input, then this rank's split."""
    import torch.distributed as dist

    original = _saved["mappings._reduce_scatter_along_first_dim"]
    if input_split_sizes is None or group.size() == 1:
        return original(input_, group, input_split_sizes, use_global_buffer)
    total = input_.clone()
    dist.all_reduce(total, group=group)
    return torch.split(total, list(input_split_sizes))[group.rank()].contiguous()


def enabled() -> bool:
    return bool(_saved)


def enable() -> bool:
    """Install the CPU stand-ins if CUDA is unavailable. Returns whether they are active."""
    if torch.cuda.is_available():
        return False
    if _saved:
        return True
    replacements = {
        "current_device": lambda: "cpu",
        "Stream": CpuStream,
        "Event": CpuEvent,
        "current_stream": lambda device=None: _DEFAULT_STREAM,
        "stream": _stream_context,
    }
    for name, value in replacements.items():
        _saved[name] = getattr(torch.cuda, name)
        setattr(torch.cuda, name, value)
    # Dropout is forked into the "model-parallel" CUDA RNG stream; on the CPU there is only the
    # default generator, so use megatron-core's own no-op tracker (its inference tracker).
    from megatron.core.tensor_parallel import random as tp_random

    tp_random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1))
    from megatron.core.transformer.moe import token_dispatcher

    original = token_dispatcher.maybe_move_tensor_to_cpu

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if as_numpy and torch.is_tensor(tensor) and tensor.device.type == "cpu":
            return tensor.numpy()
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    _saved["token_dispatcher.maybe_move_tensor_to_cpu"] = original
    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    from megatron.core.tensor_parallel import mappings

    for name, stand_in in (
        ("_gather_along_first_dim", _gather_uneven),
        ("_reduce_scatter_along_first_dim", _reduce_scatter_uneven),
    ):
        _saved[f"mappings.{name}"] = getattr(mappings, name)
        setattr(mappings, name, stand_in)
    _saved["Tensor.record_stream"] = torch.Tensor.record_stream
    torch.Tensor.record_stream = _record_stream
    return True


def _record_stream(tensor: torch.Tensor, stream) -> None:
    """``Tensor.record_stream`` that ignores the stand-in streams (nothing to order on the CPU)."""
    if not isinstance(stream, CpuStream):
        _saved["Tensor.record_stream"](tensor, stream)


def disable() -> None:
    """Restore what :func:`enable` replaced."""
    from megatron.core.tensor_parallel import mappings
    from megatron.core.transformer.moe import token_dispatcher

    for name, value in _saved.items():
        if name == "token_dispatcher.maybe_move_tensor_to_cpu":
            token_dispatcher.maybe_move_tensor_to_cpu = value
        elif name.startswith("mappings."):
            setattr(mappings, name.split(".", 1)[1], value)
        elif name == "Tensor.record_stream":
            torch.Tensor.record_stream = value
        else:
            setattr(torch.cuda, name, value)
    _saved.clear()
