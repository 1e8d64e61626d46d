"""Megatron's own ``flex`` token dispatcher on ``deepep_megatron.Buffer``.

    from deepep_megatron.megatron import use_for_flex_dispatcher
    use_for_flex_dispatcher()   # then: --moe-token-dispatcher-type flex --moe-flex-dispatcher-backend deepep

megatron-core's ``MoEFlexTokenDispatcher`` (deepep backend) reaches DeepEP only through
``megatron/core/transformer/moe/fused_a2a.py``, which runs ``from deep_ep import Buffer`` and
``from deep_ep.utils import EventHandle, EventOverlap`` *once, when it is first imported*, and
records the outcome in ``HAVE_DEEP_EP``: without DeepEP it defines ``fused_dispatch``,
``fused_combine`` and ``set_deepep_num_sms`` as ``None``, and ``token_dispatcher.py`` copies
those three names at its own import. Since ``import deepep_megatron.megatron`` (and any model
code) already imports both modules, registering ``deep_ep`` afterwards is not enough.

:func:`use_for_flex_dispatcher` therefore:

1. registers this package as ``deep_ep`` (:func:`deepep_megatron.install_as_deep_ep`);
2. if ``fused_a2a`` was imported without DeepEP, re-executes it (``importlib.reload``), so that
   megatron's own import now finds our ``Buffer``, ``EventHandle`` and ``EventOverlap`` and
   defines its own ``fused_dispatch``/``fused_combine``/``set_deepep_num_sms``;
3. rebinds those three names in ``token_dispatcher`` (the only module that copied them).

Nothing of megatron's flex code is replaced: its ``get_buffer`` sizes and caches our ``Buffer``
(reading ``buffer.group``, ``num_nvl_bytes``, ``num_rdma_bytes``), and its autograd Functions
call our ``get_dispatch_layout``/``dispatch``/``combine``. :func:`stop_using_for_flex_dispatcher`
restores the module state saved in step 2. Where DeepEP itself is already bound to
``fused_a2a``, the call raises instead of silently replacing it. HybridEP and NCCL-EP (the other
flex backends) stay unavailable: this package has no ``HybridEPBuffer``.
"""

from __future__ import annotations

import importlib
import sys

import deepep_megatron
from deepep_megatron.compat import install_as_deep_ep, uninstall_as_deep_ep

FUSED_A2A = "megatron.core.transformer.moe.fused_a2a"
TOKEN_DISPATCHER = "megatron.core.transformer.moe.token_dispatcher"
# The names token_dispatcher.py (megatron-core 0.19.2) imports from fused_a2a that depend on DeepEP.
_DEEPEP_NAMES = ("fused_dispatch", "fused_combine", "set_deepep_num_sms")

_saved: dict[str, dict] = {}  # module name -> its namespace before we changed it


def flex_uses_deepep_megatron() -> bool:
    """Whether megatron-core's flex dispatcher (deepep backend) currently calls our Buffer."""
    fused_a2a = sys.modules.get(FUSED_A2A)
    return fused_a2a is not None and getattr(fused_a2a, "Buffer", None) is deepep_megatron.Buffer


def use_for_flex_dispatcher() -> None:
    """Make ``--moe-token-dispatcher-type flex --moe-flex-dispatcher-backend deepep`` (megatron-core's
    ``MoEFlexTokenDispatcher``) run on ``deepep_megatron.Buffer``. Idempotent.

    Raises:
        RuntimeError: DeepEP itself is already imported (as ``deep_ep``) or bound to megatron-core.
    """
    install_as_deep_ep()
    if flex_uses_deepep_megatron():
        return
    fused_a2a = sys.modules.get(FUSED_A2A)
    if fused_a2a is None:
        fused_a2a = importlib.import_module(FUSED_A2A)  # first import: finds deep_ep = us
    else:
        if fused_a2a.HAVE_DEEP_EP:
            raise RuntimeError(
                f"megatron-core's fused_a2a is already bound to another deep_ep ({fused_a2a.Buffer!r}); "
                "use DeepEP itself or call use_for_flex_dispatcher() before anything imports DeepEP"
            )
        _saved[FUSED_A2A] = dict(vars(fused_a2a))
        importlib.reload(fused_a2a)  # megatron's `from deep_ep import Buffer` runs again, now finding us
    if not flex_uses_deepep_megatron():
        raise RuntimeError(f"{FUSED_A2A} did not pick up deepep_megatron as deep_ep")
    token_dispatcher = sys.modules.get(TOKEN_DISPATCHER)
    if token_dispatcher is not None:
        _saved[TOKEN_DISPATCHER] = {name: getattr(token_dispatcher, name) for name in _DEEPEP_NAMES}
        for name in _DEEPEP_NAMES:
            setattr(token_dispatcher, name, getattr(fused_a2a, name))


def stop_using_for_flex_dispatcher() -> None:
    """Undo :func:`use_for_flex_dispatcher`: megatron's modules get back the state they had
    (a fused_a2a first imported by us keeps our Buffer), and ``deep_ep`` is unregistered."""
    token_dispatcher = sys.modules.get(TOKEN_DISPATCHER)
    saved = _saved.pop(TOKEN_DISPATCHER, None)
    if token_dispatcher is not None and saved is not None:
        for name, value in saved.items():
            setattr(token_dispatcher, name, value)
    fused_a2a = sys.modules.get(FUSED_A2A)
    saved = _saved.pop(FUSED_A2A, None)
    if fused_a2a is not None and saved is not None:
        namespace = vars(fused_a2a)
        namespace.clear()
        namespace.update(saved)
    uninstall_as_deep_ep()


def _flag_value(argv: list[str], flag: str) -> str | None:
    """The last value given to ``flag`` (``--flag v`` or ``--flag=v``) in ``argv``."""
    value = None
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value


def flex_deepep_requested(argv: list[str]) -> bool:
    """Whether Megatron-LM arguments ``argv`` select the flex dispatcher with its deepep backend
    (the backend's default, or the deprecated ``--moe-enable-deepep``)."""
    if _flag_value(argv, "--moe-token-dispatcher-type") != "flex":
        return False
    return "--moe-enable-deepep" in argv or _flag_value(argv, "--moe-flex-dispatcher-backend") in (
        None,
        "deepep",
    )
