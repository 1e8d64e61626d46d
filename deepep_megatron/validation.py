"""Input checks that run before any communication starts.

Every check raises `ValueError` (bad shape, size or value) or `TypeError` (bad dtype or device)
with a message that names the argument. Value checks on CUDA tensors cost one host sync; they can
be turned off with `DEEPEP_MEGATRON_CHECK_VALUES=0`, and are skipped inside CUDA-graph capture.
"""

from __future__ import annotations

import os
import weakref

import torch

from deepep_megatron.limits import FP8_BLOCK_SIZE, MAX_LOCAL_EXPERTS, MAX_TOPK

topk_idx_t = torch.int64
FP8_DTYPE = torch.float8_e4m3fn


def value_checks_enabled(device: torch.device) -> bool:
    if device.type != "cuda":
        return True
    if os.environ.get("DEEPEP_MEGATRON_CHECK_VALUES", "1") == "0":
        return False
    return not torch.cuda.is_current_stream_capturing()


def _require(condition: bool, message: str, error: type[Exception] = ValueError) -> None:
    if not condition:
        raise error(message)


def check_tensor(
    name: str, tensor: torch.Tensor, *, dtype: torch.dtype, ndim: int, device: torch.device | None
) -> None:
    """Type, dtype, rank and device (`None`: any device) of one tensor argument."""
    _require(
        isinstance(tensor, torch.Tensor),
        f"{name} must be a torch.Tensor, got {type(tensor).__name__}",
        TypeError,
    )
    _require(tensor.dtype == dtype, f"{name} must be {dtype}, got {tensor.dtype}", TypeError)
    _require(tensor.dim() == ndim, f"{name} must be {ndim}-D, got shape {tuple(tensor.shape)}")
    if device is not None:
        _require(
            tensor.device == device, f"{name} is on device {tensor.device}, expected {device}", TypeError
        )


def check_topk_idx(
    topk_idx: torch.Tensor, num_experts: int, num_ranks: int, device: torch.device | None = None
) -> None:
    """`topk_idx`: `[N, K]` int64, entries in [-1, num_experts), on `device` (if given)."""
    check_tensor("topk_idx", topk_idx, dtype=topk_idx_t, ndim=2, device=device)
    _require(num_experts > 0, f"num_experts must be positive, got {num_experts}")
    _require(
        num_experts % num_ranks == 0,
        f"num_experts ({num_experts}) must be divisible by the number of ranks ({num_ranks})",
    )
    _require(
        num_experts // num_ranks <= MAX_LOCAL_EXPERTS,
        f"{num_experts // num_ranks} experts per rank; at most {MAX_LOCAL_EXPERTS} are supported",
    )
    _require(0 < topk_idx.size(1) <= MAX_TOPK, f"top-k must be in [1, {MAX_TOPK}], got {topk_idx.size(1)}")
    if (
        topk_idx.numel()
        and value_checks_enabled(topk_idx.device)
        and not _checked_before(topk_idx, num_experts)
    ):
        # One reduction and one device-to-host copy (a single host sync on CUDA) for both bounds.
        low, high = torch.stack(torch.aminmax(topk_idx)).tolist()
        _require(
            low >= -1 and high < num_experts,
            f"topk_idx has expert ids in [{low}, {high}]; valid ids are -1 (none) and 0..{num_experts - 1}",
        )
        _remember_checked(topk_idx, num_experts)


# The last topk_idx whose values passed the check: `get_dispatch_layout` and the `dispatch` that
# follows it check the same, unmodified tensor, and the second check would cost another host sync.
# A tensor counts as the same only if it is the same object, unchanged since (same version counter,
# storage and shape), and was checked against the same number of experts.
_last_checked: tuple | None = None


def _identity(topk_idx: torch.Tensor, num_experts: int) -> tuple | None:
    if topk_idx.is_inference():  # no version counter to tell whether it changed
        return None
    return (topk_idx._version, topk_idx.data_ptr(), tuple(topk_idx.stride()), topk_idx.shape, num_experts)


def _checked_before(topk_idx: torch.Tensor, num_experts: int) -> bool:
    if _last_checked is None:
        return False
    ref, identity = _last_checked
    return ref() is topk_idx and identity is not None and identity == _identity(topk_idx, num_experts)


def _remember_checked(topk_idx: torch.Tensor, num_experts: int) -> None:
    global _last_checked
    _last_checked = (weakref.ref(topk_idx), _identity(topk_idx, num_experts))


def check_topk_weights(topk_weights: torch.Tensor, topk_idx: torch.Tensor) -> None:
    """`topk_weights`: `[N, K]` float32, same shape and device as `topk_idx`."""
    check_tensor("topk_weights", topk_weights, dtype=torch.float32, ndim=2, device=topk_idx.device)
    _require(
        topk_weights.shape == topk_idx.shape,
        f"topk_weights shape {tuple(topk_weights.shape)} != topk_idx shape {tuple(topk_idx.shape)}",
    )


def split_payload(x) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Accept `x` as `[N, H]` bf16, or `(x_fp8 [N, H] e4m3, scales [N, H/128] float32)`.

    Returns `(payload, scales or None)` after checking dtypes, shapes and the hidden size the
    kernels take: even for BF16, a multiple of 128 for FP8.
    """
    if isinstance(x, (tuple, list)):
        _require(len(x) == 2, f"x as a tuple must be (x_fp8, scales), got {len(x)} items")
        payload, scales = x
        check_tensor("x[0]", payload, dtype=FP8_DTYPE, ndim=2, device=None)
        _require(
            payload.size(1) % FP8_BLOCK_SIZE == 0,
            f"FP8 dispatch needs a hidden size divisible by {FP8_BLOCK_SIZE}, got {payload.size(1)}",
        )
        _require(isinstance(scales, torch.Tensor), "x[1] (scales) must be a tensor", TypeError)
        _require(
            scales.dtype == torch.float32, f"x[1] (scales) must be float32, got {scales.dtype}", TypeError
        )
        expected = (payload.size(0), payload.size(1) // FP8_BLOCK_SIZE)
        _require(
            tuple(scales.shape) == expected,
            f"x[1] (scales) must have shape {expected}, got {tuple(scales.shape)}",
        )
        _require(scales.device == payload.device, "x[0] and x[1] must be on one device", TypeError)
        return payload, scales
    _require(
        isinstance(x, torch.Tensor),
        f"x must be a tensor or an (x_fp8, scales) tuple, got {type(x).__name__}",
        TypeError,
    )
    check_tensor("x", x, dtype=torch.bfloat16, ndim=2, device=x.device)
    _require(
        x.size(1) > 0 and x.size(1) % 2 == 0, f"BF16 dispatch needs an even hidden size, got {x.size(1)}"
    )
    return x, None


def check_same_rows(num_tokens: int, **tensors: torch.Tensor | None) -> None:
    """Every given tensor has one row per token of `x` (`num_tokens` rows)."""
    for name, tensor in tensors.items():
        if isinstance(tensor, torch.Tensor) and tensor.dim() >= 1 and tensor.size(0) != num_tokens:
            raise ValueError(
                f"x has {num_tokens} rows but {name} has {tensor.size(0)}: one row per token is needed "
                "(were they made for different batches?)"
            )


def check_layout_inputs(
    num_tokens: int,
    num_ranks: int,
    num_experts: int | None,
    device: torch.device,
    num_tokens_per_rank: torch.Tensor | None,
    is_token_in_rank: torch.Tensor | None,
    num_tokens_per_expert: torch.Tensor | None,
) -> None:
    """The outputs of `get_dispatch_layout` as passed to a fresh (non-cached) dispatch."""
    _require(
        num_tokens_per_rank is not None
        and is_token_in_rank is not None
        and num_tokens_per_expert is not None,
        "a dispatch without a handle needs num_tokens_per_rank, is_token_in_rank and num_tokens_per_expert "
        "(from get_dispatch_layout)",
    )
    check_tensor("num_tokens_per_rank", num_tokens_per_rank, dtype=torch.int32, ndim=1, device=device)
    _require(num_tokens_per_rank.numel() == num_ranks, f"num_tokens_per_rank must have {num_ranks} entries")
    check_tensor("is_token_in_rank", is_token_in_rank, dtype=torch.bool, ndim=2, device=device)
    _require(
        tuple(is_token_in_rank.shape) == (num_tokens, num_ranks),
        f"is_token_in_rank must have shape {(num_tokens, num_ranks)}, got {tuple(is_token_in_rank.shape)}",
    )
    check_tensor("num_tokens_per_expert", num_tokens_per_expert, dtype=torch.int32, ndim=1, device=device)
    _require(
        num_tokens_per_expert.numel() % num_ranks == 0,
        f"num_tokens_per_expert has {num_tokens_per_expert.numel()} entries, "
        f"not a multiple of {num_ranks} ranks",
    )
    if num_experts is not None:
        _require(
            num_tokens_per_expert.numel() == num_experts,
            "num_tokens_per_expert must have one entry per expert",
        )


def check_recv_stats(stats: torch.Tensor | None, num_local_experts: int, device: torch.device) -> None:
    """`cumulative_local_expert_recv_stats`: None or `[E_local]` int32 on `device`."""
    if stats is None:
        return
    check_tensor("cumulative_local_expert_recv_stats", stats, dtype=torch.int32, ndim=1, device=device)
    _require(
        stats.numel() == num_local_experts,
        f"cumulative_local_expert_recv_stats must have {num_local_experts} entries (one per local expert), "
        f"got {stats.numel()}",
    )


def check_wait_cost_stats(
    name: str, stats: torch.Tensor | None, num_ranks: int, device: torch.device
) -> None:
    """`dispatch_wait_recv_cost_stats` / `combine_wait_recv_cost_stats`: None or `[R]` int64."""
    if stats is None:
        return
    check_tensor(name, stats, dtype=torch.int64, ndim=1, device=device)
    _require(
        stats.numel() == num_ranks,
        f"{name} must have {num_ranks} entries (one per rank), got {stats.numel()}",
    )


def check_expert_alignment(expert_alignment: int) -> None:
    _require(
        isinstance(expert_alignment, int) and expert_alignment >= 1,
        f"expert_alignment must be a positive int, got {expert_alignment!r}",
    )


def normalize_bias(bias, num_tokens: int, hidden: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """`bias`: None, one `[N, H]` tensor, or a tuple of up to two. Returns a tuple of tensors."""
    if bias is None:
        return ()
    biases = tuple(b for b in bias if b is not None) if isinstance(bias, (tuple, list)) else (bias,)
    _require(len(biases) <= 2, f"combine takes at most 2 bias tensors, got {len(biases)}")
    for i, b in enumerate(biases):
        check_tensor(f"bias[{i}]", b, dtype=torch.bfloat16, ndim=2, device=device)
        _require(
            tuple(b.shape) == (num_tokens, hidden),
            f"bias[{i}] must have shape {(num_tokens, hidden)}, got {tuple(b.shape)}",
        )
    return biases
