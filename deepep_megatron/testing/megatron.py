"""Rank-side helpers for the Megatron integration tests (CPU over gloo, or CUDA).

Every function here runs inside a rank process of ``deepep_megatron.testing.rank_pool.RankPool``
(``pool.run(fn, ...)``) with ``torch.distributed`` already initialised, and returns CPU tensors so
the test process can compare runs. Weights and inputs are generated for the *global* problem from
fixed seeds, so a layer at EP=1 and the same layer at EP=2 or 4 see identical numbers.
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F

warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex|absl|GPTModel).*")

SEQ, BATCH, HIDDEN = 8, 2, 128
NUM_EXPERTS, TOPK, NUM_GROUPS, GROUP_TOPK = 16, 4, 4, 2
MOE_FFN, SHARED_FFN = 64, 64


def device() -> torch.device:
    return (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )


def setup(ep: int, seed: int = 1234, etp: int = 1) -> None:
    """(Re)initialise megatron-core's parallel state with expert parallelism ``ep`` and expert
    tensor parallelism ``etp`` over the whole world (the rest is data parallelism), install the
    deepep dispatcher and the CPU stand-ins where there is no GPU."""
    from megatron.core import tensor_parallel

    from deepep_megatron.megatron import cpu_compat, install, release_buffers

    cpu_compat.enable()
    install(arguments=False)
    release_buffers()
    _parallel_state(ep, etp)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        tensor_parallel.model_parallel_cuda_manual_seed(seed)


def _parallel_state(ep: int, etp: int) -> None:
    """A fresh megatron-core parallel state with EP ``ep`` and expert TP ``etp``.

    megatron builds a few dozen process groups per initialisation and ``destroy_model_parallel``
    only forgets them: on gloo each keeps its threads, and a rank pool shared by many tests grew
    to thousands of threads per rank (the machine's load average in the thousands). So the groups
    are destroyed whenever the state goes (here and in :func:`teardown`)."""
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        _destroy_parallel_state()
    ps.initialize_model_parallel(expert_model_parallel_size=ep, expert_tensor_parallel_size=etp)


def _destroy_parallel_state() -> None:
    """Forget megatron-core's parallel state and destroy its process groups (every group but
    the default one: the rank pools use only that)."""
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()
    for group in list(dist.distributed_c10d._world.pg_map):
        if group is not dist.group.WORLD:
            dist.destroy_process_group(group)


def teardown() -> None:
    """Undo :func:`setup` (the rank pools are shared with other tests): options, Buffers, parallel
    state, install() patches and the CPU stand-ins."""
    from megatron.core import parallel_state as ps

    from deepep_megatron.megatron import METRICS, configure, cpu_compat, release_buffers, uninstall
    from deepep_megatron.megatron.flex import stop_using_for_flex_dispatcher

    stop_using_for_flex_dispatcher()
    configure()
    release_buffers()
    METRICS.reset()
    if ps.model_parallel_is_initialized():
        _destroy_parallel_state()
    uninstall()
    cpu_compat.disable()


def _session(fn):
    """Run a rank function between :func:`setup` (called by ``fn``) and :func:`teardown`."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        finally:
            teardown()

    return wrapper


def moe_config(dispatcher: str = "deepep", **overrides):
    """A small DeepSeek-V3-style MoE config: sigmoid group-limited top-4 of 16 experts (4 groups,
    2 kept), expert bias, scaling factor 2.5, fp32 router, one shared expert, SwiGLU, BF16.
    ``dispatcher="flex"`` is megatron-core's flex dispatcher on our Buffer (deepep backend)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    if dispatcher == "flex":
        from deepep_megatron.megatron.flex import use_for_flex_dispatcher

        use_for_flex_dispatcher()

    kwargs = dict(
        num_layers=1,
        hidden_size=HIDDEN,
        ffn_hidden_size=4 * HIDDEN,
        num_attention_heads=4,
        num_moe_experts=NUM_EXPERTS,
        moe_ffn_hidden_size=MOE_FFN,
        moe_shared_expert_intermediate_size=SHARED_FFN,
        moe_router_topk=TOPK,
        moe_router_num_groups=NUM_GROUPS,
        moe_router_group_topk=GROUP_TOPK,
        moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        moe_router_topk_scaling_factor=2.5,
        moe_router_dtype="fp32",
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
        moe_token_dispatcher_type=dispatcher,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        bf16=True,
        params_dtype=torch.bfloat16,
        pipeline_dtype=torch.bfloat16,
        use_cpu_initialization=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_activation_fusion=False,
        gradient_accumulation_fusion=False,
        expert_model_parallel_size=_ep_size(),
        expert_tensor_parallel_size=_etp_size(),
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def _ep_size() -> int:
    from megatron.core import parallel_state as ps

    return ps.get_expert_model_parallel_world_size()


def _etp_size() -> int:
    from megatron.core import parallel_state as ps

    return ps.get_expert_tensor_parallel_world_size()


def _etp_rank() -> int:
    from megatron.core import parallel_state as ps

    return ps.get_expert_tensor_parallel_rank()


def _fc1_shard(full: torch.Tensor) -> torch.Tensor:
    """This expert-TP rank's rows of a GLU fc1 weight ``[2F, H]``: its slice of the gate half,
    then the same slice of the linear half (megatron-core's column-parallel GLU layout)."""
    tp, t = _etp_size(), _etp_rank()
    gate, linear = full.chunk(2)
    return torch.cat([gate.chunk(tp)[t], linear.chunk(tp)[t]])


def _fc2_shard(full: torch.Tensor) -> torch.Tensor:
    """This expert-TP rank's input columns of an fc2 weight ``[H, F]`` (row-parallel)."""
    return full.chunk(_etp_size(), dim=1)[_etp_rank()]


def _fc1_unshard(shard: torch.Tensor, full_rows: int) -> torch.Tensor:
    """Place an fc1 shard (or its gradient) into a zero ``[2F, H]`` at its global rows."""
    tp, t = _etp_size(), _etp_rank()
    out = shard.new_zeros(full_rows, shard.size(1))
    half, part = full_rows // 2, full_rows // 2 // tp
    gate, linear = shard.chunk(2)
    out[t * part : (t + 1) * part] = gate
    out[half + t * part : half + (t + 1) * part] = linear
    return out


def _fc2_unshard(shard: torch.Tensor, full_cols: int) -> torch.Tensor:
    out = shard.new_zeros(shard.size(0), full_cols)
    t, part = _etp_rank(), full_cols // _etp_size()
    out[:, t * part : (t + 1) * part] = shard
    return out


def build_moe_layer(config, experts: str = "sequential"):
    """megatron-core's MoELayer from the local (non-TE) spec: TopKRouter, SharedExpertMLP and
    ``SequentialMLP`` experts, or with ``experts="grouped"`` ``TEGroupedMLP`` on torch's grouped
    GEMM (:mod:`deepep_megatron.megatron.grouped_experts`)."""
    import dataclasses

    from megatron.core.models.backends import LocalSpecProvider
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec_for_backend

    from deepep_megatron.megatron.grouped_experts import grouped_experts_builder

    builder = get_moe_module_spec_for_backend(LocalSpecProvider(), num_experts=config.num_moe_experts)
    if experts == "grouped":
        submodules = dataclasses.replace(
            builder.keywords["submodules"], experts=grouped_experts_builder("torch")
        )
        builder = functools.partial(builder.func, submodules=submodules)
    elif experts != "sequential":
        raise ValueError(f"experts must be sequential or grouped, got {experts!r}")
    layer = builder(config=config, layer_number=1)
    return layer.to(device())


def local_expert_linears(layer):
    """``[(fc1 weight, fc2 weight)]`` per local expert of an MoELayer with either kind of experts
    (``SequentialMLP``'s ``local_experts[i]``, or grouped ``weight{i}``)."""
    experts = layer.experts
    if hasattr(experts, "local_experts"):
        return [(e.linear_fc1.weight, e.linear_fc2.weight) for e in experts.local_experts]
    return [
        (getattr(experts.linear_fc1, f"weight{i}"), getattr(experts.linear_fc2, f"weight{i}"))
        for i in range(experts.num_local_experts)
    ]


def global_weights(config, seed: int = 7) -> dict[str, torch.Tensor]:
    """fp32 weights of the whole (global) MoE layer, the same on every rank."""
    g = torch.Generator().manual_seed(seed)
    h, e, f = config.hidden_size, config.num_moe_experts, config.moe_ffn_hidden_size
    fs = config.moe_shared_expert_intermediate_size or SHARED_FFN

    def randn(*shape, scale):
        return torch.randn(*shape, generator=g) * scale

    return {
        "router": randn(e, h, scale=h**-0.5),
        "expert_bias": randn(e, scale=0.05),
        "fc1": randn(e, 2 * f, h, scale=h**-0.5),
        "fc2": randn(e, h, f, scale=f**-0.5),
        "shared_fc1": randn(2 * fs, h, scale=h**-0.5),
        "shared_fc2": randn(h, fs, scale=fs**-0.5),
    }


def load_weights(layer, weights: dict[str, torch.Tensor]) -> None:
    """Copy the global weights into a (possibly expert-parallel) MoELayer."""
    with torch.no_grad():
        layer.router.weight.copy_(weights["router"])
        if layer.router.expert_bias is not None:
            layer.router.expert_bias.copy_(weights["expert_bias"])
        for i, (fc1, fc2) in enumerate(local_expert_linears(layer)):
            e = layer.local_expert_indices[i]
            fc1.copy_(_fc1_shard(weights["fc1"][e]))
            fc2.copy_(_fc2_shard(weights["fc2"][e]))
        if layer.shared_experts is not None:
            layer.shared_experts.linear_fc1.weight.copy_(weights["shared_fc1"])
            layer.shared_experts.linear_fc2.weight.copy_(weights["shared_fc2"])


def global_inputs(seed: int, shape: tuple[int, ...], dtype=torch.bfloat16) -> torch.Tensor:
    """``[world, *shape]`` values from ``seed``; rank r uses row r."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(dist.get_world_size(), *shape, generator=g).to(dtype)


def _expert_grads(layer, config) -> dict[str, torch.Tensor]:
    """Expert weight gradients placed at their global index and summed over all ranks."""
    e, f, h = config.num_moe_experts, config.moe_ffn_hidden_size, config.hidden_size
    fc1 = torch.zeros(e, 2 * f, h, dtype=torch.float32, device=device())
    fc2 = torch.zeros(e, h, f, dtype=torch.float32, device=device())
    for i, (w1, w2) in enumerate(local_expert_linears(layer)):
        idx = layer.local_expert_indices[i]
        if w1.grad is not None:
            fc1[idx] = _fc1_unshard(w1.grad.float(), 2 * f)
            fc2[idx] = _fc2_unshard(w2.grad.float(), f)
    for t in (fc1, fc2):
        dist.all_reduce(t)
    return {"grad_fc1": fc1.cpu(), "grad_fc2": fc2.cpu()}


@_session
def moe_layer_step(
    ep: int,
    dispatcher: str = "deepep",
    shared_overlap: bool = False,
    fp8=None,
    seed: int = 11,
    backend: str | None = None,
    experts: str = "sequential",
    etp: int = 1,
    ranks_per_node: int | None = None,
    **config_overrides,
):
    """Forward and backward of one MoELayer on this rank's tokens. Returns CPU tensors: the
    output, the input gradient, the router weight gradient (this rank's tokens only), the
    expert and shared-expert gradients (summed over all ranks), and which Buffer backend served.

    ``fp8``: None = the default (on for CUDA tensors); ``backend``: the Buffer backend
    ("auto", "portable", "cuda"; None = the default); ``experts``: "sequential" or "grouped"
    (:func:`build_moe_layer`); ``etp``: expert tensor parallelism; ``ranks_per_node``: EP ranks
    per (emulated) node (None = the Buffer's default); ``config_overrides``: more
    TransformerConfig fields (e.g. ``moe_expert_capacity_factor``)."""
    from deepep_megatron.megatron import configure
    from deepep_megatron.megatron.dispatcher import _BUFFERS

    setup(ep, etp=etp)
    configure()
    if fp8 is not None:
        configure(fp8_dispatch=fp8)
    if backend is not None:
        configure(backend=backend)
    if ranks_per_node is not None:
        configure(num_ranks_per_node=ranks_per_node)
    config = moe_config(dispatcher, moe_shared_expert_overlap=shared_overlap, **config_overrides)
    layer = build_moe_layer(config, experts)
    load_weights(layer, global_weights(config))
    rank = dist.get_rank()
    x = global_inputs(seed, (SEQ, BATCH, HIDDEN))[rank].to(device()).requires_grad_(True)
    dy = global_inputs(seed + 1, (SEQ, BATCH, HIDDEN))[rank].to(device())
    out, bias = layer(x)
    assert bias is None
    out.backward(dy)
    buffer = next(iter(_BUFFERS.values()), None)
    result = {
        "out": out.detach().float().cpu(),
        "grad_x": x.grad.float().cpu(),
        "grad_router": layer.router.weight.grad.float().cpu(),
        "dispatcher": type(layer.token_dispatcher).__name__,
        "experts": type(layer.experts).__name__,
        "buffer_backend": buffer.backend_name if buffer is not None else None,
        "buffer_ranks_per_node": buffer.num_ranks_per_node if buffer is not None else None,
    }
    result.update(_expert_grads(layer, config))
    if layer.shared_experts is not None:
        shared = [layer.shared_experts.linear_fc1.weight.grad, layer.shared_experts.linear_fc2.weight.grad]
        result["grad_shared_fc1"], result["grad_shared_fc2"] = (g.float().cpu() for g in shared)
    configure()
    return result


# ------------------------------------------------------------------ dispatcher-only checks


def _routing(seed: int, num_tokens: int, drop_fraction: float = 0.0, skew: bool = False):
    """Dense group-limited sigmoid routing for this rank's tokens: ``(routing_map [T, E] bool,
    probs [T, E] fp32)``; with ``drop_fraction``, some (token, expert) pairs are dropped, as
    capacity dropping does; with ``skew``, every token picks experts 0..3 (so at EP=4 only rank 0
    receives anything)."""
    from deepep_megatron.routing import topk_routing

    rank = dist.get_rank()
    logits = global_inputs(seed, (num_tokens, NUM_EXPERTS), torch.float32)[rank]
    if skew:
        logits[:, :TOPK] += 20.0
    idx, weights = topk_routing(
        logits,
        TOPK,
        score_function="sigmoid",
        num_groups=NUM_GROUPS,
        topk_groups=GROUP_TOPK,
        scaling_factor=2.5,
    )
    if drop_fraction > 0:
        g = torch.Generator().manual_seed(seed + 100 + rank)
        keep = torch.rand(idx.shape, generator=g) >= drop_fraction
        weights = weights * keep
        idx = torch.where(keep, idx, torch.full_like(idx, NUM_EXPERTS))  # scatter into a spare column
    routing_map = torch.zeros(num_tokens, NUM_EXPERTS + 1, dtype=torch.bool).scatter_(1, idx, True)[
        :, :NUM_EXPERTS
    ]
    probs = torch.zeros(num_tokens, NUM_EXPERTS + 1).scatter_(1, idx, weights)[:, :NUM_EXPERTS]
    return routing_map, probs


def _expert_weights(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(NUM_EXPERTS, HIDDEN, HIDDEN, generator=g) * HIDDEN**-0.5


def _run_experts(tokens, tokens_per_expert, permuted_probs, weights, local_experts):
    """A stand-in for the experts: expert e maps x to ``(x @ W_e) * p`` (probabilities applied in
    the expert, as megatron-core's experts do)."""
    outs = []
    chunks = torch.split(tokens, tokens_per_expert.tolist())
    probs = torch.split(permuted_probs, tokens_per_expert.tolist())
    for e, chunk, p in zip(local_experts, chunks, probs):
        outs.append(((chunk.float() @ weights[e].to(chunk.device)) * p.unsqueeze(-1)).to(tokens.dtype))
    return torch.cat(outs) if outs else tokens[:0]


@_session
def dispatcher_step(
    ep: int, dispatcher: str, seed: int = 21, drop_fraction: float = 0.0, fp8=None, skew: bool = False
):
    """Run the six stages of one dispatcher (``"deepep"``, megatron-core's ``"alltoall"``, or its
    ``"flex"`` on our Buffer) with stand-in experts on this rank's tokens, then backward.
    Returns ``{"out", "grad_x", "grad_probs"}`` (CPU), and for ``dispatcher="reference"``
    the plain semantics computed locally with every expert: ``out[t] = sum_e map[t, e] *
    p[t, e] * (x[t] @ W_e)``."""
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
    from megatron.core.transformer.moe.token_dispatcher import (
        MoEAlltoAllTokenDispatcher,
        MoEFlexTokenDispatcher,
    )

    from deepep_megatron.megatron import DeepEPTokenDispatcher, configure
    from deepep_megatron.megatron.options import DeepEPOptions

    setup(ep)
    configure()
    rank = dist.get_rank()
    num_tokens = SEQ * BATCH
    routing_map, probs = _routing(seed, num_tokens, drop_fraction, skew)
    routing_map, probs = routing_map.to(device()), probs.to(device()).requires_grad_(True)
    x = global_inputs(seed + 1, (SEQ, BATCH, HIDDEN))[rank].to(device()).requires_grad_(True)
    dy = global_inputs(seed + 2, (SEQ, BATCH, HIDDEN))[rank].to(device())
    weights = _expert_weights(seed + 3)

    if dispatcher == "reference":
        contributions = torch.einsum(
            "th,ehk->tek", x.reshape(num_tokens, HIDDEN).float(), weights.to(x.device)
        )
        out = (contributions * (probs * routing_map).unsqueeze(-1)).sum(1).view(SEQ, BATCH, HIDDEN)
    else:
        # megatron's flex dispatcher marks dropped (zero-probability) slots only when a capacity
        # factor is configured, the only case in which its router drops.
        dropping = {"moe_expert_capacity_factor": 1.0} if dispatcher == "flex" and drop_fraction > 0 else {}
        config = moe_config(dispatcher, moe_shared_expert_intermediate_size=None, **dropping)
        num_local = NUM_EXPERTS // ep
        local = list(range(_ep_rank() * num_local, (_ep_rank() + 1) * num_local))
        pgs = get_default_pg_collection()
        if dispatcher == "alltoall":
            disp = MoEAlltoAllTokenDispatcher(num_local, local, config=config, pg_collection=pgs)
        elif dispatcher == "flex":
            disp = MoEFlexTokenDispatcher(num_local, local, config=config, pg_collection=pgs)
        else:
            disp = DeepEPTokenDispatcher(
                num_local, local, config=config, pg_collection=pgs, options=DeepEPOptions(fp8_dispatch=fp8)
            )
        hidden, p = disp.dispatch_preprocess(x, routing_map, probs)
        hidden, p = disp.token_dispatch(hidden, p)
        tokens, tokens_per_expert, permuted_probs = disp.dispatch_postprocess(hidden, p)
        expert_out = _run_experts(tokens, tokens_per_expert, permuted_probs, weights, local)
        out = disp.combine_postprocess(disp.token_combine(disp.combine_preprocess(expert_out)))
    out.backward(dy.to(out.dtype))
    return {
        "out": out.detach().float().cpu(),
        "grad_x": x.grad.float().cpu(),
        "grad_probs": probs.grad.float().cpu(),
    }


def _run_sharded_experts(tokens, tokens_per_expert, permuted_probs, weights, local_experts):
    """:func:`_run_experts` under expert tensor parallelism: expert-TP rank t holds input rows
    t of T of each ``W_e`` and returns its partial product; the T partials sum to the full one."""
    tp, t = _etp_size(), _etp_rank()
    part = HIDDEN // tp
    sliced = tokens[:, t * part : (t + 1) * part]
    shards = weights[:, t * part : (t + 1) * part]
    return _run_experts(sliced, tokens_per_expert, permuted_probs, shards, local_experts)


@_session
def feature_dispatch_step(
    ep: int,
    dispatcher: str,
    seed: int = 41,
    *,
    etp: int = 1,
    capacity_factor: float | None = None,
    pad_to_capacity: bool = False,
    pad_for_quantization: bool = False,
    tokens_per_rank: list[int] | None = None,
):
    """:func:`dispatcher_step` for the options megatron-core's flex dispatcher accepts: expert
    tensor parallelism ``etp`` (stand-in experts split over expert-TP), capacity dropping (and
    padding) applied by megatron-core's own router function, padding for quantised GEMMs, and
    uneven token counts per rank (``tokens_per_rank``).

    Returns ``{"out", "grad_x", "grad_probs", "real_routes"}`` (``real_routes``: the routes with a
    probability > 0, i.e. not the router's padding) and, for the dispatchers,
    ``"tokens_per_expert"``, ``"real_tokens"`` (received rows per local expert before padding:
    probability > 0) and ``"nvl_bytes"`` (every rank's Buffer size, all-gathered; deepep only)."""
    from megatron.core.transformer.moe.moe_utils import apply_router_token_dropping, get_default_pg_collection
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    from deepep_megatron.megatron import DeepEPTokenDispatcher, configure
    from deepep_megatron.megatron.dispatcher import _BUFFERS
    from deepep_megatron.megatron.options import DeepEPOptions

    setup(ep, etp=etp)
    configure()
    rank = dist.get_rank()
    counts = tokens_per_rank or [SEQ * BATCH] * dist.get_world_size()
    num_tokens = counts[rank]
    routing_map, probs = _routing(seed, max(counts))
    routing_map, probs = routing_map[:num_tokens], probs[:num_tokens]
    if capacity_factor is not None:
        probs, routing_map = apply_router_token_dropping(
            probs, routing_map, TOPK, capacity_factor, pad_to_capacity=pad_to_capacity
        )
    routing_map, probs = routing_map.to(device()), probs.to(device()).requires_grad_(True)
    x = global_inputs(seed + 1, (max(counts), 1, HIDDEN))[rank, :num_tokens].to(device()).requires_grad_(True)
    dy = global_inputs(seed + 2, (max(counts), 1, HIDDEN))[rank, :num_tokens].to(device())
    weights = _expert_weights(seed + 3)
    result = {"real_routes": (probs > 0).cpu()}

    if dispatcher == "reference":
        contributions = torch.einsum(
            "th,ehk->tek", x.reshape(num_tokens, HIDDEN).float(), weights.to(x.device)
        )
        out = (contributions * (probs * routing_map).unsqueeze(-1)).sum(1).view(num_tokens, 1, HIDDEN)
    else:
        overrides = {}
        if capacity_factor is not None:
            overrides.update(
                moe_expert_capacity_factor=capacity_factor, moe_pad_expert_input_to_capacity=pad_to_capacity
            )
        config = moe_config(dispatcher, moe_shared_expert_intermediate_size=None, **overrides)
        if pad_for_quantization:
            # TransformerConfig only accepts fp8 with Transformer Engine installed; the dispatchers
            # read just the recipe's alignment (16 rows for FP8).
            config.fp8, config.moe_router_padding_for_quantization = "e4m3", True
        num_local = NUM_EXPERTS // ep
        local = list(range(_ep_rank() * num_local, (_ep_rank() + 1) * num_local))
        pgs = get_default_pg_collection()
        if dispatcher == "alltoall":
            disp = MoEAlltoAllTokenDispatcher(num_local, local, config=config, pg_collection=pgs)
        else:
            disp = DeepEPTokenDispatcher(
                num_local, local, config=config, pg_collection=pgs, options=DeepEPOptions(fp8_dispatch=False)
            )
        hidden, p = disp.dispatch_preprocess(x, routing_map, probs)
        hidden, p = disp.token_dispatch(hidden, p)
        tokens, tokens_per_expert, permuted_probs = disp.dispatch_postprocess(hidden, p)
        expert_out = _run_sharded_experts(tokens, tokens_per_expert, permuted_probs, weights, local)
        out = disp.combine_postprocess(disp.token_combine(disp.combine_preprocess(expert_out)))
        real = [int((chunk > 0).sum()) for chunk in torch.split(permuted_probs, tokens_per_expert.tolist())]
        result.update(tokens_per_expert=tokens_per_expert.cpu(), real_tokens=torch.tensor(real))
        if dispatcher == "deepep":
            sizes = [None] * dist.get_world_size()
            dist.all_gather_object(sizes, next(iter(_BUFFERS.values())).num_nvl_bytes)
            result["nvl_bytes"] = sizes
    out.backward(dy.to(out.dtype))
    result.update(
        out=out.detach().float().cpu(), grad_x=x.grad.float().cpu(), grad_probs=probs.grad.float().cpu()
    )
    return result


@_session
def buffer_sizes_over_calls(ep: int, tokens_per_call: list[list[int]]):
    """Ask ``get_buffer`` for the EP group's Buffer once per entry of ``tokens_per_call`` (rank r
    with ``tokens_per_call[i][r]`` tokens). Returns, per call, every rank's Buffer size
    (all-gathered) and whether this rank built a new Buffer at that call."""
    from megatron.core import parallel_state as ps

    from deepep_megatron.megatron.dispatcher import get_buffer
    from deepep_megatron.megatron.options import DeepEPOptions

    setup(ep)
    group = ps.get_expert_model_parallel_group()
    rank = dist.get_rank(group)
    sizes, rebuilt, previous = [], [], None
    for counts in tokens_per_call:
        buffer = get_buffer(group, HIDDEN, counts[rank], DeepEPOptions(backend="portable"))
        everyone = [None] * dist.get_world_size(group)
        dist.all_gather_object(everyone, buffer.num_nvl_bytes, group=group)
        sizes.append(everyone)
        rebuilt.append(buffer is not previous)
        previous = buffer
    return {"sizes": sizes, "rebuilt": rebuilt}


@_session
def dispatcher_build_error(ep: int, etp: int = 1, **config_overrides) -> str:
    """Build a DeepEPTokenDispatcher; returns the error message ("" if it builds)."""
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    from deepep_megatron.megatron import DeepEPTokenDispatcher

    setup(ep, etp=etp)
    config = moe_config("deepep", moe_shared_expert_intermediate_size=None, **config_overrides)
    num_local = NUM_EXPERTS // ep
    local = list(range(_ep_rank() * num_local, (_ep_rank() + 1) * num_local))
    try:
        DeepEPTokenDispatcher(num_local, local, config=config, pg_collection=get_default_pg_collection())
    except (ValueError, RuntimeError, NotImplementedError) as error:
        return str(error)
    return ""


def _ep_rank() -> int:
    from megatron.core import parallel_state as ps

    return ps.get_expert_model_parallel_rank()


@_session
def fp8_dispatch_roundtrip(ep: int, seed: int = 31):
    """Dispatch the same tokens in BF16 and in FP8; returns, per received row, the FP8 result,
    the BF16 result and the elementwise error bound of the 1x128 cast (all CPU)."""
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    from deepep_megatron.fp8 import fp8_roundtrip_error_bound, per_token_cast_back, per_token_cast_to_fp8
    from deepep_megatron.megatron import DeepEPTokenDispatcher
    from deepep_megatron.megatron.options import DeepEPOptions

    setup(ep)
    rank = dist.get_rank()
    num_tokens = SEQ * BATCH
    routing_map, probs = _routing(seed, num_tokens)
    routing_map, probs = routing_map.to(device()), probs.to(device())
    x = (global_inputs(seed + 1, (SEQ, BATCH, HIDDEN)) * 3)[rank].to(device())
    config = moe_config("deepep", moe_shared_expert_intermediate_size=None)
    num_local = NUM_EXPERTS // ep
    local = list(range(_ep_rank() * num_local, (_ep_rank() + 1) * num_local))
    received = {}
    for fp8 in (False, True):
        disp = DeepEPTokenDispatcher(
            num_local,
            local,
            config=config,
            pg_collection=get_default_pg_collection(),
            options=DeepEPOptions(fp8_dispatch=fp8),
        )
        hidden, p = disp.dispatch_preprocess(x, routing_map, probs)
        recv, _ = disp.token_dispatch(hidden, p)
        received[fp8] = recv.float().cpu()
        disp._state = None
    bf16 = received[False].to(torch.bfloat16)
    expected = per_token_cast_back(*per_token_cast_to_fp8(bf16)).float() if bf16.numel() else received[True]
    bound = fp8_roundtrip_error_bound(bf16).float() if bf16.numel() else received[True]
    return {"fp8": received[True], "bf16": received[False], "expected": expected, "bound": bound}


@_session
def grouped_linear_config_errors():
    """Build :class:`~deepep_megatron.megatron.grouped_experts.TorchGroupedLinear` with bad
    settings; returns ``{case: error message}`` (a case that does not raise maps to "")."""
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    from deepep_megatron.megatron.grouped_experts import TorchGroupedLinear

    setup(1)
    pgs = get_default_pg_collection()
    config = moe_config()

    def build(in_size=HIDDEN, out_size=MOE_FFN, bias=False, cfg=config):
        return TorchGroupedLinear(
            2,
            in_size,
            out_size,
            config=cfg,
            init_method=torch.nn.init.zeros_,
            bias=bias,
            skip_bias_add=False,
            is_expert=True,
            pg_collection=pgs,
        )

    cases = {
        "bias": lambda: build(bias=True),
        "fp32": lambda: build(cfg=moe_config(params_dtype=torch.float32, bf16=False)),
        "unaligned": lambda: build(out_size=MOE_FFN + 4),
        "fp32_input": lambda: build()(torch.zeros(3, HIDDEN), [1, 2]),
    }
    errors = {}
    for name, case in cases.items():
        try:
            case()
            errors[name] = ""
        except (ValueError, TypeError, NotImplementedError) as error:
            errors[name] = str(error)
    return errors


@_session
def experts_sharded_state_dict(ep: int):
    """``{kind: sorted (key, global shape, global offset) of the experts' checkpoint entries}``
    for SequentialMLP and the grouped experts of the same MoELayer config."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    setup(ep)
    config = moe_config("deepep", moe_shared_expert_intermediate_size=None)
    result = {}
    for kind in ("sequential", "grouped"):
        layer = build_moe_layer(config, kind)
        entries = []
        for value in layer.experts.sharded_state_dict(prefix="mlp.").values():
            if isinstance(value, ShardedTensorFactory):
                value = value.build()
                value = value if isinstance(value, list) else [value]
            else:
                value = [value]
            for t in value:
                if isinstance(t, ShardedTensor):
                    entries.append((t.key, tuple(t.global_shape), tuple(t.global_offset)))
        result[kind] = sorted(entries)
    return result


def flex_binding_states():
    """What megatron-core's flex path is bound to, before, during and after
    :func:`~deepep_megatron.megatron.flex.use_for_flex_dispatcher` (run in a rank process: it
    re-executes megatron's ``fused_a2a``). Returns a list of three ``dict`` snapshots."""
    import sys

    import deepep_megatron
    from deepep_megatron.megatron import flex

    def snapshot():
        fused_a2a = sys.modules[flex.FUSED_A2A]
        token_dispatcher = sys.modules[flex.TOKEN_DISPATCHER]
        return {
            "have_deep_ep": fused_a2a.HAVE_DEEP_EP,
            "buffer_is_ours": getattr(fused_a2a, "Buffer", None) is deepep_megatron.Buffer,
            "dispatch_bound": token_dispatcher.fused_dispatch is not None
            and token_dispatcher.fused_dispatch is fused_a2a.fused_dispatch,
            "deep_ep_registered": sys.modules.get("deep_ep") is deepep_megatron,
        }

    import deepep_megatron.megatron  # noqa: F401  (imports megatron's MoE modules first, as users do)

    flex.stop_using_for_flex_dispatcher()
    states = [snapshot()]
    flex.use_for_flex_dispatcher()
    flex.use_for_flex_dispatcher()  # idempotent
    states.append(snapshot())
    flex.stop_using_for_flex_dispatcher()
    states.append(snapshot())
    return states


def parse_megatron_args(argv: list[str]):
    """Megatron-LM's parser (after install()) on ``argv``; returns the namespace."""
    import sys

    from megatron.training.arguments import parse_args

    old = sys.argv
    sys.argv = ["pretrain_gpt.py", *argv]
    try:
        return parse_args()
    finally:
        sys.argv = old


__all__ = [
    "buffer_sizes_over_calls",
    "build_moe_layer",
    "dispatcher_build_error",
    "dispatcher_step",
    "experts_sharded_state_dict",
    "feature_dispatch_step",
    "grouped_linear_config_errors",
    "flex_binding_states",
    "fp8_dispatch_roundtrip",
    "global_weights",
    "load_weights",
    "moe_config",
    "moe_layer_step",
    "parse_megatron_args",
    "setup",
]
