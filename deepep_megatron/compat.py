"""Serve programs written for DeepEP under the module name `deep_ep`.

    import deepep_megatron
    deepep_megatron.install_as_deep_ep()
    from deep_ep import Buffer            # deepep_megatron.Buffer
    from deep_ep.utils import EventOverlap

Megatron-LM's `flex` token dispatcher (`--moe-flex-dispatcher-backend deepep`) imports `deep_ep`
when its module is first imported, so call this before importing megatron-core's MoE code.
"""

from __future__ import annotations

import sys


def install_as_deep_ep() -> None:
    """Register `deepep_megatron` as `deep_ep` (and `deepep_megatron.utils` as `deep_ep.utils`).

    Raises:
        RuntimeError: a different `deep_ep` (DeepEP itself) is already imported; the two cannot
            share one name in one process.
    """
    import deepep_megatron
    from deepep_megatron import utils

    present = sys.modules.get("deep_ep")
    if present is not None and present is not deepep_megatron:
        raise RuntimeError(
            f"a different deep_ep is already imported ({getattr(present, '__file__', present)}); "
            "call deepep_megatron.install_as_deep_ep() before anything imports deep_ep, or use DeepEP itself"
        )
    sys.modules["deep_ep"] = deepep_megatron
    sys.modules["deep_ep.utils"] = utils


def uninstall_as_deep_ep() -> None:
    """Undo `install_as_deep_ep` (modules that already imported `deep_ep` keep what they got)."""
    import deepep_megatron

    if sys.modules.get("deep_ep") is deepep_megatron:
        del sys.modules["deep_ep"]
        sys.modules.pop("deep_ep.utils", None)
