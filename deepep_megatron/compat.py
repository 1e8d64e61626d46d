"""Serve programs written for DeepEP under the module name `deep_ep`.

    import deepep_megatron
    deepep_megatron.install_as_deep_ep()
    from deep_ep import Buffer            # deepep_megatron.Buffer
    from deep_ep.utils import EventOverlap

Megatron-LM's `flex` token dispatcher (`--moe-flex-dispatcher-backend deepep`) imports `deep_ep`
when its module is first imported, so call this before importing megatron-core's MoE code.
"""

from __future__ import annotations

import importlib
import sys

_PACKAGE = __name__.rpartition(".")[0]  # "deepep_megatron"


def install_as_deep_ep() -> None:
    """Register `deepep_megatron` as `deep_ep` (and `deepep_megatron.utils` as `deep_ep.utils`).

    Raises:
        RuntimeError: a different `deep_ep` (DeepEP itself) is already imported; the two cannot
            share one name in one process.
    """
    package = sys.modules[_PACKAGE]  # imported already: this module is part of it
    utils = importlib.import_module(f"{_PACKAGE}.utils")
    present = sys.modules.get("deep_ep")
    if present is not None and present is not package:
        raise RuntimeError(
            f"a different deep_ep is already imported ({getattr(present, '__file__', present)}); "
            "call deepep_megatron.install_as_deep_ep() before anything imports deep_ep, or use DeepEP itself"
        )
    sys.modules["deep_ep"] = package
    sys.modules["deep_ep.utils"] = utils


def uninstall_as_deep_ep() -> None:
    """Undo `install_as_deep_ep` (modules that already imported `deep_ep` keep what they got)."""
    if sys.modules.get("deep_ep") is sys.modules[_PACKAGE]:
        del sys.modules["deep_ep"]
        sys.modules.pop("deep_ep.utils", None)
