"""Options of the DeepEP dispatcher, and the Megatron-style command-line flags that set them.

Resolution order for each option (first one set wins):

1. an attribute of the ``TransformerConfig`` the dispatcher is built with (``config.deepep_fp8_dispatch``
   and so on; handy for code that builds configs directly);
2. :func:`configure` (programmatic, process-wide);
3. Megatron's parsed arguments (``megatron.training.get_args()``) when ``pretrain()`` parsed our
   flags (see :func:`add_deepep_args`);
4. the defaults below.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields, replace

import torch

# The value of --moe-token-dispatcher-type that selects DeepEPTokenDispatcher.
DISPATCHER_TYPE = "deepep"

_FLAG_PREFIX = "deepep_"


@dataclass
class DeepEPOptions:
    """Settings of :class:`~deepep_megatron.megatron.DeepEPTokenDispatcher`.

    Attributes:
        fp8_dispatch: cast tokens to FP8 (e4m3, one scale per 1x128 block) before dispatch.
            ``None`` means "on where the tokens are on a GPU, off on the CPU". Needs
            ``hidden_size % 128 == 0``; with the automatic default, other sizes dispatch BF16.
        num_sms: SMs the communication kernels use (``Buffer.set_num_sms``); ``None`` keeps the
            library default (20).
        num_nvl_bytes: bytes of the intranode buffer; ``None`` sizes it from the largest token
            count of any rank of the group (``Config.get_nvl_buffer_size_hint``; one MAX
            all-reduce per dispatch) and grows it when a batch needs more.
        max_tokens_per_rank: tokens per rank the automatic sizing provisions for at least.
        num_ranks_per_node: ranks of the EP group per node (``Buffer(num_ranks_per_node=...)``);
            ``None`` keeps the Buffer's default. An EP group larger than a node runs the
            internode kernels (NVSHMEM between nodes) with ``num_rdma_bytes`` sized like the
            intranode buffer; a smaller value emulates several nodes on one host.
        backend: ``"auto"`` (compiled kernels for CUDA tensors when built), ``"portable"`` or
            ``"cuda"`` (see ``deepep_megatron.Buffer``).
        timing: record per-layer dispatch/combine times and bandwidth
            (:mod:`deepep_megatron.megatron.metrics`).
    """

    fp8_dispatch: bool | None = None
    num_sms: int | None = None
    num_nvl_bytes: int | None = None
    max_tokens_per_rank: int | None = None
    num_ranks_per_node: int | None = None
    backend: str = "auto"
    timing: bool = True


_configured: dict = {}


def configure(**kwargs) -> None:
    """Set options process-wide (see :class:`DeepEPOptions`); ``configure()`` with no arguments
    clears what was set."""
    names = {f.name for f in fields(DeepEPOptions)}
    unknown = set(kwargs) - names
    if unknown:
        raise TypeError(f"unknown DeepEP options: {sorted(unknown)}")
    if not kwargs:
        _configured.clear()
    _configured.update(kwargs)


def _megatron_args():
    try:
        from megatron.training import global_vars

        return global_vars._GLOBAL_ARGS  # None unless megatron.training parsed arguments
    except Exception:  # megatron.training missing or unusable: fine, it is optional
        return None


def resolve_options(config=None) -> DeepEPOptions:
    """The options for a dispatcher built with ``config`` (see the module docstring)."""
    options = DeepEPOptions()
    args = _megatron_args()
    updates = {}
    for f in fields(DeepEPOptions):
        key = _FLAG_PREFIX + f.name
        if config is not None and getattr(config, key, None) is not None:
            updates[f.name] = getattr(config, key)
        elif f.name in _configured:
            updates[f.name] = _configured[f.name]
        elif args is not None and getattr(args, key, None) is not None:
            updates[f.name] = getattr(args, key)
    return replace(options, **updates)


def fp8_dispatch_enabled(options: DeepEPOptions, hidden_size: int, device: torch.device) -> bool:
    """Whether to dispatch FP8: the explicit setting, else on for CUDA tensors only; BF16 when the
    hidden size is not a multiple of 128 and FP8 was not asked for explicitly."""
    if options.fp8_dispatch is None:
        return device.type == "cuda" and hidden_size % 128 == 0
    if options.fp8_dispatch and hidden_size % 128 != 0:
        raise ValueError(f"FP8 dispatch needs hidden_size % 128 == 0, got {hidden_size}")
    return bool(options.fp8_dispatch)


def _has_flag(parser: argparse.ArgumentParser, flag: str) -> bool:
    return flag in parser._option_string_actions


def add_deepep_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron ``extra_args_provider``: adds the DeepEP flags and lets
    ``--moe-token-dispatcher-type`` accept ``deepep``. Idempotent.

    Flags: ``--deepep-fp8-dispatch`` / ``--no-deepep-fp8-dispatch`` (default: on for GPU, off
    on CPU), ``--deepep-num-sms N``, ``--deepep-num-nvl-bytes BYTES``,
    ``--deepep-max-tokens-per-rank N``, ``--deepep-num-ranks-per-node N``,
    ``--deepep-backend {auto,portable,cuda}``,
    ``--no-deepep-timing``.
    """
    for action in parser._actions:
        choices = action.choices
        if (
            action.dest == "moe_token_dispatcher_type"
            and choices is not None
            and DISPATCHER_TYPE not in choices
        ):
            action.choices = (*tuple(choices), DISPATCHER_TYPE)
    if _has_flag(parser, "--deepep-num-sms"):
        return parser
    group = parser.add_argument_group(title="deepep_megatron (--moe-token-dispatcher-type deepep)")
    group.add_argument(
        "--deepep-fp8-dispatch",
        dest="deepep_fp8_dispatch",
        action="store_true",
        default=None,
        help="Dispatch tokens in FP8 (e4m3, per-1x128-block scales); combine stays BF16. "
        "Default: on for GPU tensors, off on the CPU.",
    )
    group.add_argument(
        "--no-deepep-fp8-dispatch", dest="deepep_fp8_dispatch", action="store_false", help="Dispatch BF16."
    )
    group.add_argument(
        "--deepep-num-sms", type=int, default=None, help="SMs for the dispatch/combine kernels (default 20)."
    )
    group.add_argument(
        "--deepep-num-nvl-bytes",
        type=int,
        default=None,
        help="Intranode buffer bytes per rank (default: sized from the tokens per rank).",
    )
    group.add_argument(
        "--deepep-max-tokens-per-rank",
        type=int,
        default=None,
        help="Tokens per rank the automatic buffer sizing provisions for (default: the batch seen).",
    )
    group.add_argument(
        "--deepep-num-ranks-per-node",
        type=int,
        default=None,
        help="EP ranks per node (default: the Buffer's, up to 8 consecutive ranks); fewer than the EP "
        "size runs the internode kernels; a smaller value emulates several nodes on one host.",
    )
    group.add_argument(
        "--deepep-backend",
        choices=["auto", "portable", "cuda"],
        default=None,
        help="deepep_megatron.Buffer backend (default auto: compiled kernels for CUDA tensors when built).",
    )
    group.add_argument(
        "--no-deepep-timing",
        dest="deepep_timing",
        action="store_false",
        default=None,
        help="Do not time dispatch/combine (no per-layer bandwidth logging).",
    )
    return parser
