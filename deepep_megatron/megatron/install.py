"""Register ``--moe-token-dispatcher-type deepep`` with megatron-core / Megatron-LM, without
forking either. Every patch is recorded and :func:`uninstall` restores the originals.

What :func:`install` changes (megatron-core 0.19.2):

1. **Argument parsing.** ``megatron/training/arguments.py`` derives the choices of
   ``--moe-token-dispatcher-type`` from the ``Literal[...]`` type of
   ``TransformerConfig.moe_token_dispatcher_type`` (``ArgumentGroupFactory._extract_type``). The
   dataclass ``Field`` of that attribute gets ``Literal['allgather', 'alltoall', 'flex', 'deepep']``
   as its type, so every parser built afterwards accepts ``deepep``. With ``arguments=True``,
   ``add_megatron_arguments`` is also wrapped to add the ``--deepep-*`` flags
   (:func:`~deepep_megatron.megatron.options.add_deepep_args`), so a stock ``pretrain_gpt.py``
   needs no ``extra_args_provider``.
2. **Config validation.** ``TransformerConfig.__post_init__`` checks dispatcher-dependent
   options (e.g. shared-expert overlap needs alltoall or flex). For ``deepep`` it validates as
   ``alltoall`` -- the dropless, probability-in-experts semantics ours match -- and then restores
   ``deepep``.
3. **Dispatcher selection.** ``MoELayer.__init__`` picks the dispatcher with an if/elif on
   ``config.moe_token_dispatcher_type``. For ``deepep`` the wrapper presents the value ``flex`` for
   the duration of the original ``__init__`` (the name ``MoEFlexTokenDispatcher`` that
   ``moe_layer.py`` instantiates is replaced by a class whose constructor returns a
   :class:`DeepEPTokenDispatcher` while a deepep layer is being built, and restores ``deepep`` in
   the config at that moment, before the experts are built), then links the dispatcher to its
   layer. Layers of any other type are untouched.
4. **EP-communication overlap** (``--overlap-moe-expert-parallel-comm``): the combined 1F1B
   schedule's ``should_free_input`` (``models/common/utils.py``) answers for deepep layers with
   :func:`~deepep_megatron.megatron.overlap.deepep_frees_input` instead of the default answers
   (which would free tensors our dispatcher's backward still reads); the schedule's config check
   (alltoall or flex) already passes through 2.
5. **Logging** (with ``arguments=True``, when Megatron-LM's ``megatron.training`` is used):
   ``training_log`` -- called by every rank once per iteration -- is wrapped to collect the
   DeepEP metrics (:mod:`deepep_megatron.megatron.metrics`, summed over the expert-parallel group)
   and log them with Megatron's wandb writer (``--wandb-project``...) at the same iteration, and to
   print their means on the logging rank every ``--log-interval`` iterations.
"""

from __future__ import annotations

import inspect
import typing

from deepep_megatron.megatron.options import DISPATCHER_TYPE, add_deepep_args

_patches: list[tuple[object, str, object, bool]] = []  # (owner, attribute, original, was_present)
_building_deepep_layer = 0


def installed() -> bool:
    return bool(_patches)


def _patch(owner, name: str, value) -> None:
    present = name in vars(owner) if isinstance(owner, type) else hasattr(owner, name)
    _patches.append((owner, name, getattr(owner, name, None), present))
    setattr(owner, name, value)


def _all_subclasses(cls):
    out, stack = [], [cls]
    while stack:
        c = stack.pop()
        out.append(c)
        stack.extend(c.__subclasses__())
    return out


def _extend_literal_field() -> None:
    from megatron.core.transformer.transformer_config import TransformerConfig

    seen = set()
    for cls in _all_subclasses(TransformerConfig):
        field = getattr(cls, "__dataclass_fields__", {}).get("moe_token_dispatcher_type")
        if field is None or id(field) in seen:
            continue
        seen.add(id(field))
        choices = typing.get_args(field.type)
        if typing.get_origin(field.type) is typing.Literal and DISPATCHER_TYPE not in choices:
            _patch(field, "type", typing.Literal[(*choices, DISPATCHER_TYPE)])


def _patch_config_validation() -> None:
    from megatron.core.transformer.transformer_config import TransformerConfig

    original = TransformerConfig.__post_init__

    def __post_init__(self, *args, **kwargs):
        if getattr(self, "moe_token_dispatcher_type", None) != DISPATCHER_TYPE:
            return original(self, *args, **kwargs)
        self.moe_token_dispatcher_type = "alltoall"
        try:
            return original(self, *args, **kwargs)
        finally:
            self.moe_token_dispatcher_type = DISPATCHER_TYPE

    __post_init__.__wrapped__ = original
    _patch(TransformerConfig, "__post_init__", __post_init__)


def _patch_moe_layer() -> None:
    from megatron.core.transformer.moe import moe_layer
    from megatron.core.transformer.moe.token_dispatcher import MoEFlexTokenDispatcher

    from deepep_megatron.megatron.dispatcher import DeepEPTokenDispatcher

    original_init = moe_layer.MoELayer.__init__
    signature = inspect.signature(original_init)

    class FlexOrDeepEPTokenDispatcher(MoEFlexTokenDispatcher):
        """Stands in for ``MoEFlexTokenDispatcher`` inside ``moe_layer.py``: builds a
        DeepEPTokenDispatcher while a deepep MoELayer is being constructed, the real flex
        dispatcher otherwise."""

        def __new__(cls, num_local_experts, local_expert_indices, config, pg_collection=None, **kwargs):
            global _building_deepep_layer
            if _building_deepep_layer:
                _building_deepep_layer = 0
                config.moe_token_dispatcher_type = DISPATCHER_TYPE
                return DeepEPTokenDispatcher(
                    num_local_experts, local_expert_indices, config=config, pg_collection=pg_collection
                )
            return MoEFlexTokenDispatcher(
                num_local_experts, local_expert_indices, config=config, pg_collection=pg_collection, **kwargs
            )

    def __init__(self, *args, **kwargs):
        global _building_deepep_layer
        config = signature.bind(self, *args, **kwargs).arguments["config"]
        if getattr(config, "moe_token_dispatcher_type", None) != DISPATCHER_TYPE:
            return original_init(self, *args, **kwargs)
        config.moe_token_dispatcher_type = "flex"
        _building_deepep_layer = 1
        try:
            original_init(self, *args, **kwargs)
        finally:
            _building_deepep_layer = 0
            config.moe_token_dispatcher_type = DISPATCHER_TYPE
        if not isinstance(self.token_dispatcher, DeepEPTokenDispatcher):
            raise RuntimeError("deepep_megatron: MoELayer did not build the DeepEP dispatcher")
        self.token_dispatcher.attach_to_layer(self)

    __init__.__wrapped__ = original_init
    _patch(moe_layer, "MoEFlexTokenDispatcher", FlexOrDeepEPTokenDispatcher)
    _patch(moe_layer.MoELayer, "__init__", __init__)


def _patch_overlap_free_input() -> None:
    from megatron.core.models.common import utils

    from deepep_megatron.megatron.overlap import wrap_should_free_input

    _patch(utils, "should_free_input", wrap_should_free_input(utils.should_free_input))


def _patch_arguments() -> bool:
    try:
        from megatron.training import arguments
    except Exception:  # megatron.training is optional (megatron-core alone works)
        return False

    original = arguments.add_megatron_arguments

    def add_megatron_arguments(parser, *args, **kwargs):
        return add_deepep_args(original(parser, *args, **kwargs))

    add_megatron_arguments.__wrapped__ = original
    _patch(arguments, "add_megatron_arguments", add_megatron_arguments)
    return True


def _patch_training_log() -> bool:
    try:
        from megatron.training import training
    except Exception:  # megatron.training is optional
        return False
    import torch.distributed as dist

    from deepep_megatron.megatron.metrics import METRICS

    original = training.training_log
    signature = inspect.signature(original)

    def training_log(*args, **kwargs):
        result = original(*args, **kwargs)
        if not METRICS._records and not METRICS._expert_counts:
            return result
        from megatron.core import parallel_state as ps
        from megatron.training.global_vars import get_args, get_wandb_writer

        iteration = signature.bind(*args, **kwargs).arguments["iteration"]
        scalars = METRICS.collect(ps.get_expert_model_parallel_group())
        writer = get_wandb_writer()
        if writer is not None:
            writer.log(scalars, iteration)
        interval = getattr(get_args(), "log_interval", 1) or 1
        if dist.get_rank() == dist.get_world_size() - 1 and iteration % interval == 0 and scalars:
            get = scalars.get
            print(
                f" [deepep] iteration {iteration}: dispatch {get('deepep/dispatch_GBps', 0):.1f} GB/s "
                f"({get('deepep/dispatch_ms', 0):.2f} ms), combine {get('deepep/combine_GBps', 0):.1f} GB/s "
                f"({get('deepep/combine_ms', 0):.2f} ms), "
                f"tokens-per-expert imbalance {get('deepep/expert_imbalance', 0):.2f}",
                flush=True,
            )
        return result

    training_log.__wrapped__ = original
    _patch(training, "training_log", training_log)
    return True


def install(arguments: bool = True) -> None:
    """Make ``--moe-token-dispatcher-type deepep`` / ``TransformerConfig(moe_token_dispatcher_type=
    "deepep")`` build :class:`~deepep_megatron.megatron.DeepEPTokenDispatcher` in every MoELayer.

    Args:
        arguments: also add the ``--deepep-*`` flags to Megatron-LM's parser and log the DeepEP
            metrics from its ``training_log`` (``megatron.training``), if it is importable.

    Idempotent; :func:`uninstall` reverts it.
    """
    if _patches:
        return
    try:
        _extend_literal_field()
        _patch_config_validation()
        _patch_moe_layer()
        _patch_overlap_free_input()
        if arguments:
            _patch_arguments()
            _patch_training_log()
    except BaseException:
        uninstall()
        raise


def uninstall() -> None:
    """Undo :func:`install`."""
    while _patches:
        owner, name, original, present = _patches.pop()
        if present:
            setattr(owner, name, original)
        else:
            delattr(owner, name)
