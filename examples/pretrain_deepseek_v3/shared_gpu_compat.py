"""Megatron-core's DDP gradient reduction on a gloo group holding CUDA tensors.

When several ranks share one GPU (development under MPS), NCCL refuses the group, so it is gloo.
Gloo all-reduces CUDA tensors one at a time but has no coalesced variant, which megatron-core's
bucketed gradient sync asks for (``_coalescing_manager`` in ``param_and_grad_buffer``). With
``overlap_grad_reduce=False`` every all-reduce there is synchronous, so issuing them one by one
gives the same result. :func:`enable` makes that substitution for gloo groups only;
:func:`disable` undoes it.
"""

from __future__ import annotations

import contextlib

import torch.distributed as dist

_saved: dict[str, object] = {}


class _Finished:
    """What the coalescing manager yields: the reductions already ran synchronously."""

    def wait(self) -> None:
        pass


def _coalescing_manager_for(original):
    @contextlib.contextmanager
    def manager(group=None, device=None, async_ops=False):
        if dist.get_backend(group) != "gloo":
            with original(group, device=device, async_ops=async_ops) as cm:
                yield cm
            return
        if async_ops:
            raise RuntimeError(
                "gloo on CUDA: set overlap_grad_reduce=False (the reductions must be synchronous)"
            )
        yield _Finished()

    return manager


def enable() -> None:
    from megatron.core.distributed import param_and_grad_buffer

    if "manager" not in _saved:
        _saved["manager"] = param_and_grad_buffer._coalescing_manager
        param_and_grad_buffer._coalescing_manager = _coalescing_manager_for(_saved["manager"])


def disable() -> None:
    from megatron.core.distributed import param_and_grad_buffer

    if "manager" in _saved:
        param_and_grad_buffer._coalescing_manager = _saved.pop("manager")
