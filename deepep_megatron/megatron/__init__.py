"""Megatron-core integration: ``--moe-token-dispatcher-type deepep``.

Usage with a stock Megatron-LM ``pretrain_gpt.py`` (add two lines at the top)::

    import deepep_megatron.megatron as deepep_megatron_megatron
    deepep_megatron_megatron.install()   # accepts --moe-token-dispatcher-type deepep and --deepep-* flags

then run it with ``--moe-token-dispatcher-type deepep --moe-router-dtype fp32`` (and optionally
``--no-deepep-fp8-dispatch``, ``--deepep-num-sms 24``...). Or, without editing the script::

    torchrun ... -m deepep_megatron.megatron.run pretrain_gpt.py --moe-token-dispatcher-type deepep ...

Megatron's own flex dispatcher (``--moe-token-dispatcher-type flex --moe-flex-dispatcher-backend
deepep``) runs on ``deepep_megatron.Buffer`` after :func:`use_for_flex_dispatcher` (:mod:`.flex`).

Contents: :class:`DeepEPTokenDispatcher` (megatron-core's ``MoETokenDispatcher`` on
``deepep_megatron.Buffer``), :func:`install` / :func:`uninstall`, :func:`add_deepep_args` (an
``extra_args_provider``), :func:`configure` (options without argparse), :mod:`.metrics`
(per-layer dispatch/combine bandwidth), and :mod:`.grouped_experts` (grouped-GEMM experts without
Transformer Engine: :func:`grouped_experts_builder`, :func:`use_grouped_experts`).
"""

from deepep_megatron.megatron.dispatcher import DeepEPTokenDispatcher, release_buffers
from deepep_megatron.megatron.flex import stop_using_for_flex_dispatcher, use_for_flex_dispatcher
from deepep_megatron.megatron.grouped_experts import grouped_experts_builder, use_grouped_experts
from deepep_megatron.megatron.install import install, installed, uninstall
from deepep_megatron.megatron.metrics import METRICS, collect
from deepep_megatron.megatron.options import (
    DISPATCHER_TYPE,
    DeepEPOptions,
    add_deepep_args,
    configure,
    resolve_options,
)

__all__ = [
    "DISPATCHER_TYPE",
    "DeepEPOptions",
    "DeepEPTokenDispatcher",
    "METRICS",
    "add_deepep_args",
    "collect",
    "configure",
    "grouped_experts_builder",
    "install",
    "installed",
    "release_buffers",
    "resolve_options",
    "stop_using_for_flex_dispatcher",
    "uninstall",
    "use_for_flex_dispatcher",
    "use_grouped_experts",
]
