#!/usr/bin/env python
"""Pretrain a DeepSeek-V3-style MoE GPT on megatron-core with the DeepEP dispatcher.

    torchrun --standalone --nproc-per-node 4 examples/pretrain_deepseek_v3/pretrain.py --config tiny
    torchrun --standalone --nproc-per-node 1 examples/pretrain_deepseek_v3/pretrain.py --config proxy

Arguments are Megatron-LM's own flags (``megatron.training.arguments``), plus the ``--deepep-*``
flags and a few of this script's; ``--config {tiny,proxy,full}`` prepends a preset (configs.py)
that later flags override.

Why a compact loop and not ``megatron.training.pretrain()``: ``pretrain()`` and megatron-core's
pipeline schedules allocate on ``device="cuda"`` in many places (timers, token counts, loss
reduction, DDP streams), so they cannot run on a CPU; this loop runs the same megatron-core
pieces -- ``GPTModel``, ``DistributedDataParallel``, ``finalize_model_grads`` (DP gradient
all-reduce and the expert-bias update), ``get_megatron_optimizer`` -- on either device. On the
GPU the micro-batches of an iteration go through megatron-core's schedule instead
(``megatron_schedule.py``), so ``--overlap-moe-expert-parallel-comm`` applies; ``--compact-loop``
keeps the compact loop there too. On a GPU cluster, Megatron-LM's ``pretrain_gpt.py`` works as
well (``python -m deepep_megatron.megatron.run pretrain_gpt.py ... --moe-token-dispatcher-type
deepep``).

Data: a synthetic "Markov" corpus generated on the fly (each token has a few likely successors),
so the loss has somewhere to go: from ln(vocab) towards the chain's entropy (printed at start).

Logging: every iteration prints loss, throughput, and DeepEP dispatch/combine bandwidth, time and
tokens-per-expert imbalance; with ``--wandb-project`` the same scalars go to wandb, offline unless
``WANDB_MODE`` says otherwise (``--wandb-save-dir``, default ``./runs``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import math
import os
import sys
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(1, os.path.dirname(os.path.dirname(HERE)))  # the repository, if not pip-installed

warnings.filterwarnings(
    "ignore", message=r".*(Transformer Engine|transformer-engine|Apex|absl|GPTModel|deprecated|Torch Norm).*"
)
warnings.filterwarnings("ignore", category=FutureWarning)
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
logging.getLogger("megatron.core.models.gpt.gpt_model").setLevel(logging.ERROR)

import megatron_schedule  # noqa: E402
from configs import CONFIGS  # noqa: E402


def example_args(parser):
    """This script's flags, on top of Megatron-LM's and the --deepep-* ones."""
    from deepep_megatron.megatron import add_deepep_args

    add_deepep_args(parser)
    group = parser.add_argument_group("pretrain_deepseek_v3 example")
    group.add_argument("--config", choices=sorted(CONFIGS), default=None, help="preset (configs.py)")
    group.add_argument("--markov-branching", type=int, default=4, help="likely successors per token")
    group.add_argument("--metrics-jsonl", default=None, help="write each iteration's scalars here (rank 0)")
    group.add_argument("--verbose-args", action="store_true", help="print Megatron's argument table")
    group.add_argument("--cpu", action="store_true", help="train on the CPU even if CUDA is available")
    group.add_argument(
        "--experts",
        choices=["auto", "sequential", "grouped"],
        default="auto",
        help="routed experts: one grouped GEMM per layer (TEGroupedMLP on Transformer Engine's grouped "
        "linear, else on torch.nn.functional.grouped_mm) or megatron-core's SequentialMLP; "
        "auto: grouped on a GPU, sequential on the CPU",
    )
    group.add_argument(
        "--compact-loop",
        action="store_true",
        help="on the GPU too, run the compact micro-batch loop instead of megatron-core's schedules",
    )
    return parser


def parse_arguments(argv: list[str]):
    config = None
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            config = argv[i + 1]
        elif arg.startswith("--config="):
            config = arg.split("=", 1)[1]
    if config is not None and config not in CONFIGS:
        raise SystemExit(f"--config must be one of {sorted(CONFIGS)}, got {config!r}")
    preset = CONFIGS[config] if config else []
    if "--overlap-moe-expert-parallel-comm" in argv:
        # megatron-core excludes the shared-expert overlap under the EP-communication overlap (which
        # overlaps the shared experts itself); the presets turn it on and it has no --no- flag.
        preset = [arg for arg in preset if arg != "--moe-shared-expert-overlap"]

    from megatron.training.arguments import parse_args, validate_args

    old_argv = sys.argv
    sys.argv = [old_argv[0], *preset, *argv]
    try:
        args = parse_args(extra_args_provider=example_args)
    finally:
        sys.argv = old_argv
    args.world_size = int(os.environ.get("WORLD_SIZE", "1"))
    args.rank = int(os.environ.get("RANK", "0"))
    quiet = contextlib.nullcontext() if args.verbose_args else contextlib.redirect_stdout(io.StringIO())
    with quiet:
        validate_args(args, {})
    return args


# ------------------------------------------------------------------ data


class MarkovTokens:
    """Sequences from a fixed random Markov chain: token t is followed by one of
    ``branching`` successors with probabilities ~ 1/2, 1/4, ... (renormalised)."""

    def __init__(self, vocab_size: int, branching: int, seed: int = 1234):
        import torch

        g = torch.Generator().manual_seed(seed)
        self.vocab_size = vocab_size
        self.successors = torch.randint(0, vocab_size, (vocab_size, branching), generator=g)
        weights = 0.5 ** torch.arange(1, branching + 1, dtype=torch.float64)
        self.probs = (weights / weights.sum()).float()
        self.entropy = float(-(self.probs.double() * self.probs.double().log()).sum())

    def batch(self, num_sequences: int, length: int, seed: int):
        """``[num_sequences, length]`` int64 tokens, a function of ``seed`` only."""
        import torch

        g = torch.Generator().manual_seed(seed)
        choices = torch.multinomial(self.probs, num_sequences * (length - 1), replacement=True, generator=g)
        choices = choices.view(num_sequences, length - 1)
        tokens = torch.empty(num_sequences, length, dtype=torch.long)
        tokens[:, 0] = torch.randint(0, self.vocab_size, (num_sequences,), generator=g)
        for t in range(1, length):
            tokens[:, t] = self.successors[tokens[:, t - 1], choices[:, t - 1]]
        return tokens


# ------------------------------------------------------------------ model


def experts_kind(args, device) -> str:
    """``"grouped"`` or ``"sequential"`` (``--experts``; auto: grouped on a GPU)."""
    if args.experts != "auto":
        return args.experts
    return "grouped" if device.type == "cuda" else "sequential"


def build_model(args, config, device):
    import torch
    from megatron.core.extensions.transformer_engine import HAVE_TE
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_mtp_block_spec
    from sdpa_attention import use_sdpa_core_attention

    from deepep_megatron.megatron.grouped_experts import use_grouped_experts

    use_te = bool(HAVE_TE) and device.type == "cuda"
    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=use_te, normalization=args.normalization)
    if not use_te:
        # megatron-core's local spec cannot build MLA (DotProductAttention lacks k/v_channels).
        use_sdpa_core_attention(spec)
    if experts_kind(args, device) == "grouped":
        # TE's grouped linear where Transformer Engine serves, torch's grouped_mm otherwise.
        use_grouped_experts(spec, backend="te" if use_te else "torch")
    mtp_spec = None
    if getattr(args, "mtp_num_layers", None):
        mtp_spec = get_gpt_mtp_block_spec(config, spec.layer_specs[-1], use_transformer_engine=use_te)
    vocab = math.ceil(args.vocab_size / 128) * 128
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=vocab,
        max_sequence_length=args.max_position_embeddings,
        pre_process=True,
        post_process=True,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type,
        rotary_percent=args.rotary_percent,
        rotary_base=args.rotary_base,
        mtp_block_spec=mtp_spec,
    )
    model = model.to(device)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    for param in model.parameters():  # parameters only: the router's buffers stay fp32
        param.data = param.data.to(dtype)
    return model, use_te


def wrap_ddp(config, model):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    return DistributedDataParallel(
        config=config,
        ddp_config=DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=False
        ),
        module=model,
    )


class MasterWeightAdamW:
    """AdamW on fp32 master copies of the (BF16) model weights, reading the fp32 gradients that
    megatron-core's DDP leaves in ``param.main_grad``, with global-norm clipping that counts each
    expert shard once (``get_megatron_optimizer`` allocates on ``device="cuda"``, so it cannot
    run on a CPU; this does the same arithmetic on either device)."""

    def __init__(self, args, model, ep_group):
        import torch

        self.params = [p for p in model.parameters() if p.requires_grad]
        self.master = [p.detach().float().clone() for p in self.params]
        self.is_expert = [not getattr(p, "allreduce", True) for p in self.params]
        decay = [m for m, p in zip(self.master, self.params) if p.dim() > 1]
        no_decay = [m for m, p in zip(self.master, self.params) if p.dim() <= 1]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=args.lr,
            betas=(args.adam_beta1, args.adam_beta2),
            eps=args.adam_eps,
        )
        self.clip = args.clip_grad
        self.ep_group = ep_group

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def zero_grad(self) -> None:
        for m in self.master:
            m.grad = None

    def step(self) -> float:
        import torch
        import torch.distributed as dist

        dense_sq = torch.zeros((), dtype=torch.float32, device=self.master[0].device)
        expert_sq = torch.zeros_like(dense_sq)
        for m, p, expert in zip(self.master, self.params, self.is_expert):
            grad = getattr(p, "main_grad", None)
            grad = grad if grad is not None else p.grad
            m.grad = torch.zeros_like(m) if grad is None else grad.float()
            if expert:
                expert_sq += m.grad.square().sum()
            else:
                dense_sq += m.grad.square().sum()
        if dist.get_world_size(self.ep_group) > 1:
            dist.all_reduce(expert_sq, group=self.ep_group)
        norm = (dense_sq + expert_sq).sqrt()
        if self.clip and self.clip > 0:
            scale = torch.clamp(self.clip / (norm + 1e-6), max=1.0)
            for m in self.master:
                m.grad.mul_(scale)
        self.optimizer.step()
        with torch.no_grad():
            for m, p in zip(self.master, self.params):
                p.copy_(m)
        return norm.item()


def learning_rate(args, iteration: int) -> float:
    warmup = args.lr_warmup_iters or 0
    if iteration < warmup:
        return args.lr * (iteration + 1) / warmup
    progress = min(1.0, (iteration - warmup) / max(1, args.train_iters - warmup))
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * progress))


# ------------------------------------------------------------------ logging


class Logger:
    def __init__(self, args, rank: int):
        self.rank = rank
        self.run = None
        self.jsonl = None
        if rank != 0:
            return
        if args.metrics_jsonl:
            os.makedirs(os.path.dirname(os.path.abspath(args.metrics_jsonl)), exist_ok=True)
            self.jsonl = open(args.metrics_jsonl, "w")  # noqa: SIM115 - closed in finish()
        if args.wandb_project:
            os.environ.setdefault("WANDB_MODE", "offline")
            os.environ.setdefault("WANDB_SILENT", "true")
            import wandb

            save_dir = args.wandb_save_dir or os.path.join(os.getcwd(), "runs")
            os.makedirs(save_dir, exist_ok=True)
            simple = {
                k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None)))
            }
            self.run = wandb.init(
                project=args.wandb_project, name=args.wandb_exp_name, dir=save_dir, config=simple
            )

    def log(self, scalars: dict, step: int) -> None:
        if self.run is not None:
            self.run.log(scalars, step=step)
        if self.jsonl is not None:
            self.jsonl.write(json.dumps({"iteration": step, **scalars}) + "\n")
            self.jsonl.flush()

    def finish(self) -> str | None:
        where = None
        if self.run is not None:
            where = self.run.dir
            self.run.finish()
        if self.jsonl is not None:
            self.jsonl.close()
        return where


def fmt_line(it: int, total: int, s: dict) -> str:
    line = (
        f"iter {it:4d}/{total} | loss {s['train/loss']:.4f} | lr {s['train/lr']:.2e} | "
        f"grad-norm {s['train/grad_norm']:.3f} | {s['train/iteration_time_s']:.2f} s/it | "
        f"{s['train/tokens_per_s']:,.0f} tok/s"
    )
    if "deepep/dispatch_GBps" in s:
        line += (
            f" | dispatch {s['deepep/dispatch_GBps']:.3f} GB/s ({s['deepep/dispatch_ms']:.1f} ms)"
            f" | combine {s['deepep/combine_GBps']:.3f} GB/s ({s['deepep/combine_ms']:.1f} ms)"
            f" | imbalance {s.get('deepep/expert_imbalance', float('nan')):.2f}"
        )
    return line


# ------------------------------------------------------------------ main


def compact_step(ddp, micro_batches, positions):
    """Forward and backward of each micro-batch (token ids ``[B, S + 1]``) in turn, scaled as
    megatron-core's schedules scale them; returns the mean loss (0-dim tensor)."""
    import torch
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    num_micro = len(micro_batches)
    MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1, device=positions.device) / num_micro)
    loss_sum = torch.zeros((), device=positions.device)
    for tokens in micro_batches:
        losses = ddp(tokens[:, :-1], positions, None, labels=tokens[:, 1:])
        loss = losses.float().mean()
        (loss / num_micro).backward()
        loss_sum += loss.detach()
    return loss_sum / num_micro


def _describe_buffer(buffer, device) -> str:
    """The EP Buffer in one line: ranks, what serves this device's tensors, its sizes."""
    backend = buffer.backend_name if device.type == "cuda" else "portable"
    text = (
        f"{buffer.group_size} ranks, backend for {device.type} tensors: {backend}, "
        f"num_nvl_bytes {buffer.num_nvl_bytes / 2**20:.1f} MiB"
    )
    if buffer.num_ranks_per_node < buffer.group_size:  # the group spans (emulated) nodes
        text += (
            f", {buffer.num_ranks_per_node} ranks per node, "
            f"num_rdma_bytes {buffer.num_rdma_bytes / 2**20:.1f} MiB"
        )
    return text


def main(argv: list[str] | None = None) -> dict:
    import deepep_megatron.megatron as dm

    logging.getLogger("megatron").setLevel(logging.WARNING)

    dm.install(arguments=True)
    args = parse_arguments(sys.argv[1:] if argv is None else argv)

    import torch
    import torch.distributed as dist

    use_cuda = torch.cuda.is_available() and not args.cpu
    # megatron-core's schedules (and so the EP-communication overlap) need the GPU.
    use_schedule = use_cuda and not args.compact_loop
    if args.overlap_moe_expert_parallel_comm and not use_schedule:
        raise SystemExit(
            "--overlap-moe-expert-parallel-comm runs in megatron-core's schedules, which need a GPU "
            "(and no --compact-loop / --cpu)"
        )
    rank, world = args.rank, args.world_size
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        share = os.environ.get("DEEPEP_MEGATRON_SHARE_GPU") == "1"
        torch.cuda.set_device(0 if share else local_rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
        torch.set_num_threads(
            max(1, (os.cpu_count() or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
        )
    backend = args.distributed_backend
    if use_cuda and backend == "nccl" and os.environ.get("DEEPEP_MEGATRON_SHARE_GPU") == "1":
        backend = "gloo"  # NCCL refuses several ranks on one GPU
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world)

    from deepep_megatron.megatron import cpu_compat

    if not use_cuda:
        cpu_compat.enable()
    elif backend == "gloo":
        import shared_gpu_compat

        shared_gpu_compat.enable()  # DDP's coalesced gradient all-reduce, one bucket at a time
    option_names = [f.name for f in dataclasses.fields(dm.DeepEPOptions)]  # each has a --deepep-* flag
    dm.configure(
        **{
            name: getattr(args, "deepep_" + name)
            for name in option_names
            if getattr(args, "deepep_" + name, None) is not None
        }
    )

    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.distributed import finalize_model_grads
    from megatron.training.arguments import core_transformer_config_from_args

    ps.initialize_model_parallel(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size,
    )
    if args.pipeline_model_parallel_size != 1 or args.tensor_model_parallel_size != 1:
        raise SystemExit("this compact loop runs TP=PP=1 (use Megatron-LM's pretrain_gpt.py for more)")
    torch.manual_seed(args.seed)
    if use_cuda:
        tensor_parallel.model_parallel_cuda_manual_seed(args.seed)

    config = core_transformer_config_from_args(args)
    if not use_cuda:
        config.use_cpu_initialization = True
    model, use_te = build_model(args, config, device)
    ddp = wrap_ddp(config, model)
    ep_group = ps.get_expert_model_parallel_group()
    optimizer = MasterWeightAdamW(args, ddp, ep_group)

    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    num_micro = args.global_batch_size // (args.micro_batch_size * dp_size)
    assert num_micro >= 1, "global batch smaller than micro-batch x data-parallel size"
    data = MarkovTokens(args.vocab_size, args.markov_branching, seed=args.seed)
    num_params = sum(p.numel() for p in model.parameters())
    dispatcher = args.moe_token_dispatcher_type
    if rank == 0:
        buffer_backend = args.deepep_backend or os.environ.get("DEEPEP_MEGATRON_BACKEND", "auto")
        options = dm.resolve_options(config)
        fp8 = options.fp8_dispatch if options.fp8_dispatch is not None else device.type == "cuda"
        print(
            f"[pretrain] {args.config or 'custom'}: {args.num_layers} layers, hidden {args.hidden_size}, "
            f"{args.num_experts} experts top-{args.moe_router_topk} "
            f"(groups {args.moe_router_num_groups}/{args.moe_router_group_topk}), "
            f"MLA={args.multi_latent_attention}, {num_params / 1e6:.2f} M parameters on rank 0 | "
            f"world {world}, EP {args.expert_model_parallel_size}, "
            f"DP {dp_size}, {num_micro} micro-batch(es) of {args.micro_batch_size}x{args.seq_length} | "
            f"device {device.type}, dispatcher {dispatcher} "
            f"(Buffer backend {buffer_backend}, FP8 dispatch {fp8}), "
            f"experts {experts_kind(args, device)} ({'TE' if use_te else 'torch'})",
            flush=True,
        )
        print(
            f"[pretrain] data: Markov chain, vocab {args.vocab_size}, "
            f"{args.markov_branching} successors/token: "
            f"loss starts near ln(V) = {math.log(args.vocab_size):.2f}, floor = entropy {data.entropy:.2f}",
            flush=True,
        )
    logger = Logger(args, rank)
    tokens_per_iter = args.global_batch_size * args.seq_length
    positions = torch.arange(args.seq_length, device=device).unsqueeze(0).expand(args.micro_batch_size, -1)
    history = []
    dm.METRICS.reset()
    for iteration in range(args.train_iters):
        t0 = time.perf_counter()
        lr = learning_rate(args, iteration)
        for group in optimizer.param_groups:
            group["lr"] = lr
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        micro_batches = [
            data.batch(
                args.micro_batch_size,
                args.seq_length + 1,
                seed=args.seed * 1_000_003 + (iteration * dp_size + dp_rank) * num_micro + micro,
            ).to(device)
            for micro in range(num_micro)
        ]
        if use_schedule:
            loss_mean = megatron_schedule.train_step(ddp, micro_batches, positions, args)
        else:
            loss_mean = compact_step(ddp, micro_batches, positions)
        finalize_model_grads([ddp])
        grad_norm = optimizer.step()
        dist.all_reduce(loss_mean, group=ps.get_data_parallel_group())
        loss_value = loss_mean.item() / dp_size
        elapsed = time.perf_counter() - t0
        scalars = {
            "train/loss": loss_value,
            "train/lr": lr,
            "train/grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "train/iteration_time_s": elapsed,
            "train/tokens_per_s": tokens_per_iter / elapsed,
        }
        scalars.update(dm.collect(ep_group))
        history.append(scalars)
        if iteration == 0:
            # The first iteration ran Buffer's value checks on the routing (one host sync each on
            # CUDA tensors); the routing is valid by construction, so skip them from now on.
            os.environ.setdefault("DEEPEP_MEGATRON_CHECK_VALUES", "0")
        if rank == 0 and iteration == 0:
            from deepep_megatron.megatron.dispatcher import _BUFFERS

            for buffer in _BUFFERS.values():
                print(f"[pretrain] deepep Buffer: {_describe_buffer(buffer, device)}", flush=True)
        if rank == 0:
            logger.log(scalars, iteration + 1)
            if (iteration + 1) % args.log_interval == 0 or iteration + 1 == args.train_iters:
                print(fmt_line(iteration + 1, args.train_iters, scalars), flush=True)
    where = logger.finish()
    summary = summarize(history)
    if rank == 0:
        line = "[pretrain] done: loss {first:.3f} -> {last:.3f}, {tok_s:,.0f} tok/s".format(**summary)
        if not math.isnan(summary["dispatch"]):
            line += (
                " | mean over iterations 2..: dispatch {dispatch:.3f} GB/s, "
                "combine {combine:.3f} GB/s per rank; "
                "{dispatch_ms:.1f} ms dispatch + {combine_ms:.1f} ms combine per iteration (forward, all MoE "
                "layers); tokens-per-expert imbalance (max/mean) {imbalance:.2f}".format(**summary)
            )
        print(line, flush=True)
        if where:
            print(f"[pretrain] wandb offline run: {os.path.dirname(where)}", flush=True)
    dm.release_buffers()
    ps.destroy_model_parallel()
    return summary


def summarize(history: list[dict]) -> dict:
    steady = history[1:] or history

    def mean(key):
        values = [h[key] for h in steady if key in h]
        return sum(values) / len(values) if values else float("nan")

    return {
        "first": history[0]["train/loss"],
        "last": history[-1]["train/loss"],
        "dispatch": mean("deepep/dispatch_GBps"),
        "combine": mean("deepep/combine_GBps"),
        "dispatch_ms": mean("deepep/dispatch_ms"),
        "combine_ms": mean("deepep/combine_ms"),
        "imbalance": mean("deepep/expert_imbalance"),
        "tok_s": mean("train/tokens_per_s"),
    }


if __name__ == "__main__":
    main()
