"""Grouped-GEMM experts without Transformer Engine: megatron-core's ``TEGroupedMLP`` on
``torch.nn.functional.grouped_mm``.

``TEGroupedMLP`` (megatron-core 0.19.2) takes its two grouped linear layers from
``GroupedMLPSubmodules`` builders and needs Transformer Engine only for its fused (op-fuser), FP8
and FP4 paths. Its plain BF16 path -- activation (SwiGLU included), ``permuted_probs`` applied
after the activation, ``moe_apply_probs_on_input``, activation recompute, checkpoint layout shared
with ``SequentialMLP`` -- runs with any linear layers that honour the builder protocol. This
module provides them on torch's grouped GEMM:

- :class:`TorchGroupedLinear` (``linear_fc1``, column-parallel over the expert-TP group) and
  :class:`TorchRowGroupedLinear` (``linear_fc2``, row-parallel): one parameter
  ``weight{i}`` ``[out, in]`` per local expert (TE's ``GroupedLinear`` layout, so checkpoints and
  ``SequentialMLP`` weights map one to one), applied to the expert-major rows the dispatchers
  produce (``tokens_per_expert[i]`` consecutive rows for expert ``i``) with one grouped GEMM.
- :func:`grouped_experts_builder`: the ``experts`` entry of an MoE layer spec (TE's grouped
  linear layers when Transformer Engine is installed, these otherwise), and
  :func:`use_grouped_experts` to put it into an existing GPT block spec.

Layout requirements of ``grouped_mm`` (BF16): operands BF16, row strides multiples of 16 bytes
(``hidden_size`` and the expert FFN width per TP rank multiples of 8). Group boundaries (the
cumulative ``tokens_per_expert``) need no alignment for BF16; only FP8 / MXFP8 grouped GEMMs need
16 / 32-row groups, which ``--moe-router-padding-for-quantization`` provides in the dispatcher.
torch 2.13 runs ``grouped_mm`` forward and backward on the CPU as well as on CUDA (sm_80+).
"""

from __future__ import annotations

import dataclasses
from functools import partial

import torch
import torch.nn.functional as F

# grouped_mm's operands need 16-byte row strides: 8 BF16 elements.
_ROW_ALIGNMENT = 8


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, tokens_per_expert: list[int]) -> torch.Tensor:
    """``out[rows of expert i] = x[rows of expert i] @ weight[i].T`` in one grouped GEMM.

    Args:
        x: ``[num_rows, in]`` bf16, expert-major (``tokens_per_expert[i]`` rows for expert i).
        weight: ``[num_experts, out, in]`` bf16.
        tokens_per_expert: rows per expert (host ints), summing to ``num_rows``.

    Returns:
        ``[num_rows, out]`` bf16 (fp32 accumulation inside the GEMM).
    """
    if sum(tokens_per_expert) != x.size(0) or len(tokens_per_expert) != weight.size(0):
        raise ValueError(
            f"tokens_per_expert {list(tokens_per_expert)} does not describe {x.size(0)} rows "
            f"over {weight.size(0)} experts"
        )
    offsets = torch.tensor(tokens_per_expert, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    out = F.grouped_mm(x, weight.transpose(1, 2), offs=offsets.to(x.device, non_blocking=True))
    if out.requires_grad:
        # grouped_mm's backward rejects broadcast (stride-0) gradients, e.g. from ``out.sum()``.
        out.register_hook(torch.Tensor.contiguous)
    return out


class TorchGroupedLinear(torch.nn.Module):
    """``num_local_experts`` linear layers ``[in] -> [out]`` run as one ``grouped_mm``
    (megatron-core's ``GroupedLinearFc1Builder`` / ``GroupedLinearFc2Builder`` protocol).

    The weights are split over the expert tensor-parallel group like megatron-core's expert
    ``ColumnParallelLinear`` (``parallel_mode="column"``: output rows) or ``RowParallelLinear``
    (``"row"``: input columns). No communication happens here: with expert-TP the token
    dispatcher gathers tokens over the TP group and reduce-scatters the partial outputs, as it
    does for ``SequentialMLP`` and TE.
    """

    parallel_mode = "column"

    def __init__(
        self,
        num_local_experts: int,
        input_size: int,
        output_size: int,
        /,
        *,
        config,
        init_method,
        bias: bool,
        skip_bias_add: bool,
        is_expert: bool,
        tp_comm_buffer_name: str | None = None,
        pg_collection=None,
        name: str | None = None,
    ) -> None:
        super().__init__()
        _check_supported(config, bias, is_expert)
        tp_group = pg_collection.expt_tp if pg_collection is not None else None
        self.tp_size = tp_group.size() if tp_group is not None else 1
        self.ep_group = pg_collection.ep if pg_collection is not None else None
        self.tp_group = tp_group
        self.dp_group = pg_collection.expt_dp if pg_collection is not None else None
        self.num_local_experts = num_local_experts
        self.config = config
        self.skip_bias_add = skip_bias_add
        self.partition_dim = 0 if self.parallel_mode == "column" else 1
        local_out, local_in = output_size, input_size
        if self.parallel_mode == "column":
            local_out = _divide(output_size, self.tp_size, "output_size")
        else:
            local_in = _divide(input_size, self.tp_size, "input_size")
        for what, size in (("input", local_in), ("output", local_out)):
            if size % _ROW_ALIGNMENT:
                raise ValueError(
                    f"torch grouped GEMM needs the {what} width per TP rank to be a multiple of "
                    f"{_ROW_ALIGNMENT} (16-byte rows), got {size}"
                )
        for i in range(num_local_experts):
            weight = torch.nn.Parameter(
                torch.empty(local_out, local_in, dtype=config.params_dtype, device=_init_device(config))
            )
            _init_expert_weight(weight, init_method, self.partition_dim, config)
            setattr(self, f"weight{i}", weight)

    def stacked_weight(self) -> torch.Tensor:
        """``[num_local_experts, out, in]`` (a differentiable stack of ``weight{i}``)."""
        return torch.stack([getattr(self, f"weight{i}") for i in range(self.num_local_experts)])

    def forward(self, x: torch.Tensor, tokens_per_expert: list[int]):
        """``x`` ``[num_rows, in]`` bf16, expert-major -> ``([num_rows, out] bf16, None)``."""
        if x.dtype != torch.bfloat16:
            raise TypeError(f"torch grouped GEMM experts take bf16 inputs, got {x.dtype}")
        return grouped_linear(x, self.stacked_weight(), list(tokens_per_expert)), None

    def backward_dw(self) -> None:
        """Weight gradients are computed in the ordinary backward (no delayed wgrad)."""

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        """Per-expert ``weight{i}`` sharded like TE's grouped linear (expert axis appended to
        ``sharded_offsets``, TP axis of the parallel mode), so ``TEGroupedMLP`` maps them to the
        keys and global shapes of ``SequentialMLP``."""
        from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        num_global = self.ep_group.size() * self.num_local_experts
        first_global = self.ep_group.rank() * self.num_local_experts
        singleton = (metadata or {}).get("singleton_local_shards", False)
        out = {}
        for i in range(self.num_local_experts):
            global_idx = first_global + i
            offsets = sharded_offsets
            expert_prefix = f"{global_idx}.{prefix}" if singleton else prefix
            if not singleton:
                offsets = (*sharded_offsets, (len(sharded_offsets), global_idx, num_global))
            sub = make_sharded_tensors_for_checkpoint(
                {f"{i}.weight": getattr(self, f"weight{i}")},
                "",
                {f"{i}.weight": self.partition_dim},
                offsets,
                tp_group=self.tp_group,
                dp_cp_group=metadata["dp_cp_group"],
            )
            replace_prefix_for_sharding(sub, f"{i}.", expert_prefix)
            tensor = sub[f"{i}.weight"]
            # Expert weights are replicated over the expert-DP group only.
            tensor.replica_id = (*tensor.replica_id[:2], self.dp_group.rank())
            out[f"{prefix}weight{i}"] = tensor
        return out


class TorchRowGroupedLinear(TorchGroupedLinear):
    """:class:`TorchGroupedLinear` split over the expert-TP group by input columns (``linear_fc2``)."""

    parallel_mode = "row"


def _check_supported(config, bias: bool, is_expert: bool) -> None:
    if bias:
        raise NotImplementedError("torch grouped GEMM experts have no bias (use --disable-bias-linear)")
    if not is_expert:
        raise ValueError("TorchGroupedLinear is for routed experts (is_expert=True)")
    if config.params_dtype != torch.bfloat16:
        raise TypeError(f"torch grouped GEMM experts need bf16 parameters, got {config.params_dtype}")
    if config.fp8 or config.fp4:
        raise NotImplementedError(
            "torch grouped GEMM experts are BF16; FP8/FP4 expert GEMMs need Transformer Engine"
        )
    if getattr(config, "delay_wgrad_compute", False):
        raise NotImplementedError("torch grouped GEMM experts do not delay weight gradients")


def _divide(size: int, parts: int, what: str) -> int:
    if size % parts:
        raise ValueError(f"{what}={size} is not divisible by the expert tensor-parallel size {parts}")
    return size // parts


def _init_device(config) -> torch.device:
    if config.use_cpu_initialization or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def _init_expert_weight(weight: torch.Tensor, init_method, partition_dim: int, config) -> None:
    """Initialise one expert's shard in the expert RNG stream and mark it as expert-parallel
    (gradients reduced over the expert-DP group) and TP-partitioned."""
    from megatron.core.tensor_parallel.layers import _initialize_affine_weight_gpu

    if config.perform_initialization:
        _initialize_affine_weight_gpu(weight, init_method, partition_dim, is_expert=True)
    else:
        from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

        set_tensor_model_parallel_attributes(weight, is_parallel=True, dim=partition_dim, stride=1)
    weight.allreduce = False


# ---------------------------------------------------------------------------- layer specs


def have_te_grouped_linear() -> bool:
    from megatron.core.extensions.transformer_engine import TEColumnParallelGroupedLinear

    return TEColumnParallelGroupedLinear is not None


def grouped_experts_builder(backend: str = "auto"):
    """The ``experts`` builder of an MoE layer spec: ``TEGroupedMLP`` with TE's grouped linear
    layers (``backend="te"``; ``"auto"`` picks it where Transformer Engine is installed) or with
    :class:`TorchGroupedLinear` / :class:`TorchRowGroupedLinear` (``"torch"``)."""
    from megatron.core.transformer.moe.experts import GroupedMLPSubmodules, TEGroupedMLP

    if backend not in ("auto", "te", "torch"):
        raise ValueError(f"grouped experts backend must be auto, te or torch, got {backend!r}")
    use_te = backend == "te" or (backend == "auto" and have_te_grouped_linear())
    if use_te:
        from megatron.core.extensions.transformer_engine import (
            TEColumnParallelGroupedLinear,
            TERowParallelGroupedLinear,
        )

        if TEColumnParallelGroupedLinear is None:
            raise ImportError("grouped experts backend 'te' needs Transformer Engine")
        fc1, fc2 = TEColumnParallelGroupedLinear, TERowParallelGroupedLinear
    else:
        fc1, fc2 = TorchGroupedLinear, TorchRowGroupedLinear
    return partial(TEGroupedMLP, submodules=GroupedMLPSubmodules(linear_fc1=fc1, linear_fc2=fc2))


def use_grouped_experts(block_spec, backend: str = "auto"):
    """Replace the experts of every MoE layer in a GPT layer / block spec (as built by
    ``get_gpt_decoder_block_spec``) by :func:`grouped_experts_builder`, in place. Returns its
    argument."""
    specs = getattr(block_spec, "layer_specs", block_spec)
    if not isinstance(specs, list | tuple):
        specs = [specs]
    builder = grouped_experts_builder(backend)
    for spec in specs:
        mlp = getattr(spec.submodules, "mlp", None)
        submodules = getattr(mlp, "keywords", {}).get("submodules")
        if submodules is not None and hasattr(submodules, "experts"):
            mlp.keywords["submodules"] = dataclasses.replace(submodules, experts=builder)
    return block_spec
