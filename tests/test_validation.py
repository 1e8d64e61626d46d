"""Bad inputs raise a clear exception before any communication starts.

Each case runs on every rank of a 2-rank gloo group with all torch.distributed collectives replaced
by a tripwire: if a call reaches communication before failing, the tripwire fires (it is not an
`Exception`, so `pytest.raises` cannot swallow it) and the case fails. Also checked here: the
buffer capacity rule (`config.max_tokens_per_rank`, the inverse of `normal_region_bytes`) that
every backend enforces.
"""

from __future__ import annotations

import contextlib
import types

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st

from deepep_megatron import Buffer, Config
from deepep_megatron.config import MAX_TOPK, max_tokens_per_rank, normal_region_bytes
from deepep_megatron.fp8 import per_token_cast_to_fp8
from deepep_megatron.testing.reference import make_rank_inputs, reference_dispatch
from tests.test_buffer_portable import assert_bitwise_equal

WORLD_SIZE = 2
NUM_EXPERTS = 4
NUM_TOPK = 2
NUM_TOKENS = 5
HIDDEN = 128
LL_MAX_TOKENS = 8

# --------------------------------------------------------------------------------------------------
# the tripwire


class CommunicationStarted(BaseException):  # noqa: N818 - a tripwire, not an error to handle
    """Raised by any torch.distributed collective while `no_communication()` is active."""


_COLLECTIVES = (
    "all_to_all_single",
    "all_to_all",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_object",
    "all_reduce",
    "broadcast",
    "broadcast_object_list",
    "barrier",
    "send",
    "recv",
    "isend",
    "irecv",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "gather",
    "scatter",
    "batch_isend_irecv",
    "monitored_barrier",
)


@contextlib.contextmanager
def no_communication():
    saved = {name: getattr(dist, name) for name in _COLLECTIVES if hasattr(dist, name)}

    def make_tripwire(name):
        def tripwire(*args, **kwargs):
            raise CommunicationStarted(
                f"torch.distributed.{name} was called before the input error was raised"
            )

        return tripwire

    for name in saved:
        setattr(dist, name, make_tripwire(name))
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(dist, name, fn)


# --------------------------------------------------------------------------------------------------
# valid inputs to start from (built with communication, outside the tripwire)


def _context():
    rank = dist.get_rank()
    inputs = make_rank_inputs(40, rank, NUM_TOKENS, HIDDEN, NUM_EXPERTS, NUM_TOPK)
    buffer = Buffer(dist.group.WORLD)
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(inputs.topk_idx, NUM_EXPERTS)
    layout = {
        "num_tokens_per_rank": per_rank,
        "is_token_in_rank": in_rank,
        "num_tokens_per_expert": per_expert,
    }
    recv_x, _, recv_w, _, handle, _ = buffer.dispatch(
        inputs.x, topk_idx=inputs.topk_idx, topk_weights=inputs.topk_weights, **layout
    )
    ll_bytes = Buffer.get_low_latency_rdma_size_hint(LL_MAX_TOKENS, HIDDEN, WORLD_SIZE, NUM_EXPERTS)
    ll_buffer = Buffer(dist.group.WORLD, num_rdma_bytes=ll_bytes, low_latency_mode=True)
    ll_recv, _, ll_handle, _, _ = ll_buffer.low_latency_dispatch(
        inputs.x, inputs.topk_idx, LL_MAX_TOKENS, NUM_EXPERTS
    )
    return types.SimpleNamespace(
        rank=rank,
        x=inputs.x,
        topk_idx=inputs.topk_idx,
        topk_weights=inputs.topk_weights,
        buffer=buffer,
        layout=layout,
        recv_x=recv_x,
        recv_w=recv_w,
        handle=handle,
        ll_buffer=ll_buffer,
        ll_bytes=ll_bytes,
        ll_handle=ll_handle,
        ll_x=torch.zeros_like(ll_recv[0], dtype=torch.bfloat16),
    )


def _meta(t: torch.Tensor) -> torch.Tensor:
    """The same tensor on another device (the meta device stands in for a GPU here)."""
    return torch.empty_like(t, device="meta")


def _dispatch(c, x=None, **overrides):
    kwargs = dict(c.layout, topk_idx=c.topk_idx, topk_weights=c.topk_weights)
    kwargs.update(overrides)
    return c.buffer.dispatch(c.x if x is None else x, **kwargs)


def _ll_dispatch(c, x=None, topk_idx=None, **kwargs):
    return c.ll_buffer.low_latency_dispatch(
        c.x if x is None else x,
        c.topk_idx if topk_idx is None else topk_idx,
        kwargs.pop("max_tokens", LL_MAX_TOKENS),
        kwargs.pop("num_experts", NUM_EXPERTS),
        **kwargs,
    )


def _ll_combine(c, x=None, topk_idx=None, topk_weights=None, handle=None, **kwargs):
    return c.ll_buffer.low_latency_combine(
        c.ll_x if x is None else x,
        c.topk_idx if topk_idx is None else topk_idx,
        c.topk_weights if topk_weights is None else topk_weights,
        c.ll_handle if handle is None else handle,
        **kwargs,
    )


def _fp8(c, hidden=HIDDEN):
    return per_token_cast_to_fp8(torch.randn(NUM_TOKENS, hidden).to(torch.bfloat16))


def _with(t: torch.Tensor, index, value) -> torch.Tensor:
    t = t.clone()
    t[index] = value
    return t


# name -> (exception type, message pattern, call)
CASES = {
    # ---- get_dispatch_layout
    "layout/topk-int32": (
        TypeError,
        "topk_idx must be torch.int64",
        lambda c: c.buffer.get_dispatch_layout(c.topk_idx.int(), NUM_EXPERTS),
    ),
    "layout/topk-float": (
        TypeError,
        "topk_idx",
        lambda c: c.buffer.get_dispatch_layout(c.topk_weights, NUM_EXPERTS),
    ),
    "layout/topk-1d": (
        ValueError,
        "2-D",
        lambda c: c.buffer.get_dispatch_layout(c.topk_idx[:, 0], NUM_EXPERTS),
    ),
    "layout/id-too-large": (
        ValueError,
        "expert ids",
        lambda c: c.buffer.get_dispatch_layout(_with(c.topk_idx, (1, 0), NUM_EXPERTS), NUM_EXPERTS),
    ),
    "layout/id-below-minus-one": (
        ValueError,
        "expert ids",
        lambda c: c.buffer.get_dispatch_layout(_with(c.topk_idx, (0, 1), -2), NUM_EXPERTS),
    ),
    "layout/experts-not-divisible": (
        ValueError,
        "divisible",
        lambda c: c.buffer.get_dispatch_layout(c.topk_idx, 3),
    ),
    "layout/num-experts-zero": (
        ValueError,
        "num_experts",
        lambda c: c.buffer.get_dispatch_layout(c.topk_idx, 0),
    ),
    "layout/topk-too-large": (
        ValueError,
        "top-k",
        lambda c: c.buffer.get_dispatch_layout(torch.full((3, MAX_TOPK + 1), -1, dtype=torch.int64), 64),
    ),
    # ---- dispatch: payload
    "dispatch/x-float32": (TypeError, "x must be torch.bfloat16", lambda c: _dispatch(c, c.x.float())),
    "dispatch/x-float16": (TypeError, "x must be torch.bfloat16", lambda c: _dispatch(c, c.x.half())),
    "dispatch/x-3d": (ValueError, "2-D", lambda c: _dispatch(c, c.x.unsqueeze(0))),
    "dispatch/x-not-a-tensor": (TypeError, "x must be a tensor", lambda c: _dispatch(c, c.x.float().numpy())),
    "dispatch/x-three-items": (ValueError, "tuple", lambda c: _dispatch(c, (*_fp8(c), c.x))),
    "dispatch/odd-bf16-hidden": (
        ValueError,
        "even hidden",
        lambda c: _dispatch(c, torch.zeros(NUM_TOKENS, 7, dtype=torch.bfloat16)),
    ),
    "dispatch/fp8-hidden-not-128": (
        ValueError,
        "divisible by 128",
        lambda c: _dispatch(
            c, (torch.zeros(NUM_TOKENS, 64, dtype=torch.float8_e4m3fn), torch.ones(NUM_TOKENS, 1))
        ),
    ),
    "dispatch/fp8-payload-bf16": (TypeError, "float8", lambda c: _dispatch(c, (c.x, _fp8(c)[1]))),
    "dispatch/fp8-scales-dtype": (
        TypeError,
        "scales",
        lambda c: _dispatch(c, (_fp8(c)[0], _fp8(c)[1].bfloat16())),
    ),
    "dispatch/fp8-scales-shape": (
        ValueError,
        "scales",
        lambda c: _dispatch(c, (_fp8(c)[0], _fp8(c)[1][:-1])),
    ),
    "dispatch/fp8-scales-device": (
        TypeError,
        "device",
        lambda c: _dispatch(c, (_fp8(c)[0], _meta(_fp8(c)[1]))),
    ),
    # ---- dispatch: layout and routing
    "dispatch/missing-layout": (
        ValueError,
        "get_dispatch_layout",
        lambda c: _dispatch(c, num_tokens_per_rank=None),
    ),
    "dispatch/in-rank-shape": (
        ValueError,
        "is_token_in_rank",
        lambda c: _dispatch(c, is_token_in_rank=c.layout["is_token_in_rank"][:-1]),
    ),
    "dispatch/in-rank-dtype": (
        TypeError,
        "is_token_in_rank",
        lambda c: _dispatch(c, is_token_in_rank=c.layout["is_token_in_rank"].int()),
    ),
    "dispatch/per-rank-length": (
        ValueError,
        "num_tokens_per_rank",
        lambda c: _dispatch(c, num_tokens_per_rank=torch.zeros(3, dtype=torch.int32)),
    ),
    "dispatch/per-rank-dtype": (
        TypeError,
        "num_tokens_per_rank",
        lambda c: _dispatch(c, num_tokens_per_rank=c.layout["num_tokens_per_rank"].long()),
    ),
    "dispatch/experts-not-divisible": (
        ValueError,
        "num_tokens_per_expert",
        lambda c: _dispatch(
            c, num_tokens_per_expert=torch.zeros(3, dtype=torch.int32), topk_idx=None, topk_weights=None
        ),
    ),
    "dispatch/x-from-another-batch": (
        ValueError,
        "x has 4 rows but topk_idx has 5",
        lambda c: _dispatch(c, c.x[:-1]),
    ),
    "dispatch/topk-rows": (
        ValueError,
        "rows",
        lambda c: _dispatch(c, topk_idx=c.topk_idx[:-1], topk_weights=c.topk_weights[:-1]),
    ),
    "dispatch/id-too-large": (
        ValueError,
        "expert ids",
        lambda c: _dispatch(c, topk_idx=_with(c.topk_idx, (0, 0), NUM_EXPERTS + 3)),
    ),
    "dispatch/id-below-minus-one": (
        ValueError,
        "expert ids",
        lambda c: _dispatch(c, topk_idx=_with(c.topk_idx, (2, 1), -5)),
    ),
    "dispatch/topk-too-large": (
        ValueError,
        "top-k",
        lambda c: _dispatch(
            c, topk_idx=torch.full((NUM_TOKENS, 17), -1, dtype=torch.int64), topk_weights=None
        ),
    ),
    "dispatch/weights-without-idx": (ValueError, "topk_idx", lambda c: _dispatch(c, topk_idx=None)),
    "dispatch/weights-shape": (
        ValueError,
        "topk_weights",
        lambda c: _dispatch(c, topk_weights=c.topk_weights[:, :1]),
    ),
    "dispatch/weights-dtype": (
        TypeError,
        "topk_weights",
        lambda c: _dispatch(c, topk_weights=c.topk_weights.double()),
    ),
    "dispatch/alignment-zero": (ValueError, "expert_alignment", lambda c: _dispatch(c, expert_alignment=0)),
    "dispatch/alignment-float": (
        ValueError,
        "expert_alignment",
        lambda c: _dispatch(c, expert_alignment=2.0),
    ),
    "dispatch/worst-negative": (ValueError, "num_worst_tokens", lambda c: _dispatch(c, num_worst_tokens=-1)),
    "dispatch/topk-device": (
        TypeError,
        "topk_idx",
        lambda c: _dispatch(c, topk_idx=_meta(c.topk_idx), topk_weights=None),
    ),
    "dispatch/weights-device": (
        TypeError,
        "topk_weights",
        lambda c: _dispatch(c, topk_weights=_meta(c.topk_weights)),
    ),
    "dispatch/layout-device": (
        TypeError,
        "is_token_in_rank",
        lambda c: _dispatch(c, is_token_in_rank=_meta(c.layout["is_token_in_rank"])),
    ),
    # ---- cached dispatch
    "cached/with-topk": (
        ValueError,
        "cached",
        lambda c: c.buffer.dispatch(c.x, handle=c.handle, topk_idx=c.topk_idx),
    ),
    "cached/with-weights": (
        ValueError,
        "cached",
        lambda c: c.buffer.dispatch(c.x, handle=c.handle, topk_weights=c.topk_weights),
    ),
    "cached/rows": (ValueError, "rows", lambda c: c.buffer.dispatch(c.x[:-1], handle=c.handle)),
    "cached/low-latency-handle": (TypeError, "handle", lambda c: c.buffer.dispatch(c.x, handle=c.ll_handle)),
    "cached/tuple-handle": (
        TypeError,
        "handle",
        lambda c: c.buffer.dispatch(c.x, handle=(c.recv_x, c.recv_w)),
    ),
    "cached/device": (TypeError, "device", lambda c: c.buffer.dispatch(_meta(c.x), handle=c.handle)),
    "cached/odd-hidden": (
        ValueError,
        "even hidden",
        lambda c: c.buffer.dispatch(torch.zeros(NUM_TOKENS, 3, dtype=torch.bfloat16), handle=c.handle),
    ),
    # ---- combine
    "combine/rows": (ValueError, "shape", lambda c: c.buffer.combine(c.recv_x[:-1], c.handle)),
    "combine/extra-rows": (
        ValueError,
        "shape",
        lambda c: c.buffer.combine(torch.cat([c.recv_x, c.recv_x[:1]]), c.handle),
    ),
    "combine/hidden": (ValueError, "shape", lambda c: c.buffer.combine(c.recv_x[:, :-2], c.handle)),
    "combine/dtype": (
        TypeError,
        "x must be torch.bfloat16",
        lambda c: c.buffer.combine(c.recv_x.float(), c.handle),
    ),
    "combine/fp8-tuple": (TypeError, "x", lambda c: c.buffer.combine(_fp8(c), c.handle)),
    "combine/low-latency-handle": (TypeError, "handle", lambda c: c.buffer.combine(c.recv_x, c.ll_handle)),
    "combine/tuple-handle": (TypeError, "handle", lambda c: c.buffer.combine(c.recv_x, (c.recv_x,))),
    "combine/device": (TypeError, "device", lambda c: c.buffer.combine(_meta(c.recv_x), c.handle)),
    "combine/weights-rows": (
        ValueError,
        "topk_weights",
        lambda c: c.buffer.combine(c.recv_x, c.handle, topk_weights=c.recv_w[:-1]),
    ),
    "combine/weights-dtype": (
        TypeError,
        "topk_weights",
        lambda c: c.buffer.combine(c.recv_x, c.handle, topk_weights=c.recv_w.bfloat16()),
    ),
    "combine/bias-shape": (ValueError, "bias", lambda c: c.buffer.combine(c.recv_x, c.handle, bias=c.x[:-1])),
    "combine/bias-dtype": (
        TypeError,
        "bias",
        lambda c: c.buffer.combine(c.recv_x, c.handle, bias=c.x.float()),
    ),
    "combine/three-biases": (
        ValueError,
        "at most 2",
        lambda c: c.buffer.combine(c.recv_x, c.handle, bias=(c.x, c.x, c.x)),
    ),
    "combine/bias-device": (
        TypeError,
        "bias",
        lambda c: c.buffer.combine(c.recv_x, c.handle, bias=(c.x, _meta(c.x))),
    ),
    # ---- low-latency dispatch
    "ll/not-low-latency-mode": (
        RuntimeError,
        "low_latency_mode",
        lambda c: c.buffer.low_latency_dispatch(c.x, c.topk_idx, LL_MAX_TOKENS, NUM_EXPERTS),
    ),
    "ll/too-many-tokens": (
        ValueError,
        "num_max_dispatch_tokens_per_rank",
        lambda c: _ll_dispatch(c, max_tokens=NUM_TOKENS - 1),
    ),
    "ll/rdma-too-small": (
        ValueError,
        "num_rdma_bytes",
        lambda c: Buffer(
            dist.group.WORLD, num_rdma_bytes=c.ll_bytes - 1, low_latency_mode=True
        ).low_latency_dispatch(c.x, c.topk_idx, LL_MAX_TOKENS, NUM_EXPERTS),
    ),
    "ll/rdma-too-small-for-more-tokens": (
        ValueError,
        "num_rdma_bytes",
        lambda c: _ll_dispatch(c, max_tokens=2 * LL_MAX_TOKENS),
    ),
    "ll/fp8-hidden-not-128": (
        ValueError,
        "hidden",
        lambda c: _ll_dispatch(c, x=torch.zeros(NUM_TOKENS, 64, dtype=torch.bfloat16)),
    ),
    "ll/ue8m0-without-fp8": (
        ValueError,
        "use_ue8m0",
        lambda c: _ll_dispatch(c, use_fp8=False, use_ue8m0=True),
    ),
    "ll/x-dtype": (TypeError, "x must be torch.bfloat16", lambda c: _ll_dispatch(c, x=c.x.float())),
    "ll/x-fp8-tuple": (TypeError, "x", lambda c: _ll_dispatch(c, x=_fp8(c))),
    "ll/topk-rows": (ValueError, "rows", lambda c: _ll_dispatch(c, topk_idx=c.topk_idx[:-1])),
    "ll/topk-dtype": (TypeError, "topk_idx", lambda c: _ll_dispatch(c, topk_idx=c.topk_idx.int())),
    "ll/experts-not-divisible": (
        ValueError,
        "divisible",
        lambda c: _ll_dispatch(c, num_experts=NUM_EXPERTS + 1),
    ),
    "ll/id-too-large": (
        ValueError,
        "expert ids",
        lambda c: _ll_dispatch(c, topk_idx=_with(c.topk_idx, (0, 0), 99)),
    ),
    "ll/id-below-minus-one": (
        ValueError,
        "expert ids",
        lambda c: _ll_dispatch(c, topk_idx=_with(c.topk_idx, (0, 0), -3)),
    ),
    "ll/topk-too-large": (
        ValueError,
        "top-k",
        lambda c: _ll_dispatch(c, topk_idx=torch.full((NUM_TOKENS, 17), -1, dtype=torch.int64)),
    ),
    "ll/topk-device": (TypeError, "topk_idx", lambda c: _ll_dispatch(c, topk_idx=_meta(c.topk_idx))),
    "ll/stats-dtype": (
        TypeError,
        "cumulative_local_expert_recv_stats",
        lambda c: _ll_dispatch(c, cumulative_local_expert_recv_stats=torch.zeros(2, dtype=torch.float32)),
    ),
    "ll/stats-shape": (
        ValueError,
        "cumulative_local_expert_recv_stats",
        lambda c: _ll_dispatch(c, cumulative_local_expert_recv_stats=torch.zeros(3, dtype=torch.int32)),
    ),
    # ---- low-latency combine
    "llc/x-shape": (ValueError, "shape", lambda c: _ll_combine(c, x=c.ll_x[:, :-1])),
    "llc/x-dtype": (TypeError, "x must be torch.bfloat16", lambda c: _ll_combine(c, x=c.ll_x.float())),
    "llc/normal-handle": (TypeError, "handle", lambda c: _ll_combine(c, handle=c.handle)),
    "llc/tuple-handle": (TypeError, "handle", lambda c: _ll_combine(c, handle=(c.ll_x,))),
    "llc/out-shape": (
        ValueError,
        "out",
        lambda c: _ll_combine(c, out=torch.empty(NUM_TOKENS + 1, HIDDEN, dtype=torch.bfloat16)),
    ),
    "llc/out-dtype": (TypeError, "out", lambda c: _ll_combine(c, out=torch.empty(NUM_TOKENS, HIDDEN))),
    "llc/weights-shape": (
        ValueError,
        "topk_weights",
        lambda c: _ll_combine(c, topk_weights=c.topk_weights[:, :1]),
    ),
    "llc/topk-rows": (
        ValueError,
        "tokens",
        lambda c: _ll_combine(c, topk_idx=c.topk_idx[:-1], topk_weights=c.topk_weights[:-1]),
    ),
    "llc/x-device": (TypeError, "device", lambda c: _ll_combine(c, x=_meta(c.ll_x))),
    # ---- Buffer construction
    "buffer/negative-nvl-bytes": (
        ValueError,
        "non-negative",
        lambda c: Buffer(dist.group.WORLD, num_nvl_bytes=-1),
    ),
    "buffer/negative-rdma-bytes": (
        ValueError,
        "non-negative",
        lambda c: Buffer(dist.group.WORLD, num_rdma_bytes=-8),
    ),
    "buffer/ranks-per-node": (
        ValueError,
        "num_ranks_per_node",
        lambda c: Buffer(dist.group.WORLD, num_ranks_per_node=3),
    ),
    "buffer/backend-name": (ValueError, "backend", lambda c: Buffer(dist.group.WORLD, backend="nccl")),
}


def _expect_error(name: str) -> str:
    error, pattern, call = CASES[name]
    context = _context()
    with no_communication(), pytest.raises(error, match=pattern) as info:
        call(context)
    return str(info.value)


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_raises_before_communication(cpu_pools, name):
    messages = cpu_pools(WORLD_SIZE).run(_expect_error, name, timeout=120)
    assert all(messages)


# --------------------------------------------------------------------------------------------------
# cases that need their own setup


def _combine_before_hook_case():
    rank = dist.get_rank()
    inputs = make_rank_inputs(41, rank, NUM_TOKENS, HIDDEN, NUM_EXPERTS, NUM_TOPK)
    ll_bytes = Buffer.get_low_latency_rdma_size_hint(LL_MAX_TOKENS, HIDDEN, WORLD_SIZE, NUM_EXPERTS)
    buffer = Buffer(dist.group.WORLD, num_rdma_bytes=ll_bytes, low_latency_mode=True)
    recv_x, _, handle, _, hook = buffer.low_latency_dispatch(
        inputs.x, inputs.topk_idx, LL_MAX_TOKENS, NUM_EXPERTS, return_recv_hook=True
    )
    expert_out = torch.zeros(recv_x[0].shape, dtype=torch.bfloat16)
    with no_communication(), pytest.raises(RuntimeError, match="hook"):
        buffer.low_latency_combine(expert_out, inputs.topk_idx, inputs.topk_weights, handle)
    hook()  # completes the receive; the handle then combines normally
    combined, _, _ = buffer.low_latency_combine(expert_out, inputs.topk_idx, inputs.topk_weights, handle)
    assert (combined == 0).all()
    return True


def test_low_latency_combine_before_hook(cpu_pools):
    assert cpu_pools(WORLD_SIZE).run(_combine_before_hook_case, timeout=120) == [True, True]


def _destroyed_case():
    rank = dist.get_rank()
    inputs = make_rank_inputs(42, rank, NUM_TOKENS, HIDDEN, NUM_EXPERTS, NUM_TOPK)
    buffer = Buffer(dist.group.WORLD, explicitly_destroy=True)
    buffer.destroy()
    with no_communication():
        with pytest.raises(RuntimeError, match="destroyed"):
            buffer.get_dispatch_layout(inputs.topk_idx, NUM_EXPERTS)
        with pytest.raises(RuntimeError, match="destroyed"):
            buffer.dispatch(inputs.x)
        with pytest.raises(RuntimeError, match="destroyed"):
            buffer.low_latency_dispatch(inputs.x, inputs.topk_idx, LL_MAX_TOKENS, NUM_EXPERTS)
    implicit = Buffer(dist.group.WORLD)
    with pytest.raises(RuntimeError, match="explicitly_destroy"):
        implicit.destroy()
    # Still usable after the refused destroy().
    implicit.get_dispatch_layout(inputs.topk_idx, NUM_EXPERTS)
    return True


def test_destroyed_buffer_refuses_calls(cpu_pools):
    assert cpu_pools(WORLD_SIZE).run(_destroyed_case, timeout=120) == [True, True]


# --------------------------------------------------------------------------------------------------
# capacity: a Buffer(num_nvl_bytes > 0) takes no more tokens per rank than it was sized for


def _capacity_case(sized_tokens: int, hidden: int, use_fp8: bool):
    rank, num_ranks = dist.get_rank(), dist.get_world_size()
    num_experts = 2 * num_ranks
    num_nvl_bytes = Config(num_max_tokens_per_rank=sized_tokens).get_nvl_buffer_size_hint(
        hidden * 2, num_ranks
    )
    buffer = Buffer(dist.group.WORLD, num_nvl_bytes=num_nvl_bytes)
    hidden_bytes, num_scales = (hidden, hidden // 128) if use_fp8 else (hidden * 2, 0)
    limit = max_tokens_per_rank(num_nvl_bytes, hidden_bytes, num_scales, num_ranks)
    assert limit >= sized_tokens, "a buffer sized by the hint must take the tokens it was sized for"

    def attempt(num_tokens, seed, handle=None):
        inputs = make_rank_inputs(seed, rank, num_tokens, hidden, num_experts, 2)
        x = per_token_cast_to_fp8(inputs.x) if use_fp8 else inputs.x
        if handle is not None:
            return buffer.dispatch(x, handle=handle)
        per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(inputs.topk_idx, num_experts)
        return buffer.dispatch(
            x,
            num_tokens_per_rank=per_rank,
            is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert,
            topk_idx=inputs.topk_idx,
            topk_weights=inputs.topk_weights,
        )

    # At the limit: works, and gives the reference result.
    result = attempt(limit, 43)
    all_inputs = [make_rank_inputs(43, r, limit, hidden, num_experts, 2) for r in range(num_ranks)]
    ref = reference_dispatch(all_inputs, rank, num_experts)
    recv_x = result[0][0] if use_fp8 else result[0]
    assert recv_x.size(0) == ref.recv_x.size(0)
    assert_bitwise_equal(result[1], ref.recv_topk_idx, "recv_topk_idx at the capacity limit")
    # One more token: refused before any communication, also as a cached dispatch.
    with no_communication(), pytest.raises(ValueError, match="num_nvl_bytes"):
        attempt(limit + 1, 44)
    big = Buffer(dist.group.WORLD)  # unlimited portable buffer makes a handle for limit + 1 tokens
    inputs = make_rank_inputs(45, rank, limit + 1, hidden, num_experts, 2)
    per_rank, _, per_expert, in_rank, _ = big.get_dispatch_layout(inputs.topk_idx, num_experts)
    x = per_token_cast_to_fp8(inputs.x) if use_fp8 else inputs.x
    handle = big.dispatch(
        x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert
    )[4]
    with no_communication(), pytest.raises(ValueError, match="num_nvl_bytes"):
        buffer.dispatch(x, handle=handle)
    # A worst-case size past what the receive area holds: refused before any communication too.
    inputs = make_rank_inputs(46, rank, limit, hidden, num_experts, 2)
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(inputs.topk_idx, num_experts)
    x = per_token_cast_to_fp8(inputs.x) if use_fp8 else inputs.x
    with no_communication(), pytest.raises(ValueError, match="num_worst_tokens"):
        buffer.dispatch(
            x,
            num_tokens_per_rank=per_rank,
            is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert,
            num_worst_tokens=limit * num_ranks + 1,
        )
    return limit


@pytest.mark.parametrize(
    "world_size,sized_tokens,hidden,use_fp8",
    [(1, 3, 6, False), (2, 4, 130, False), (2, 5, 256, True), (3, 2, 128, True)],
)
def test_capacity_limit(cpu_pools, world_size, sized_tokens, hidden, use_fp8):
    limits = cpu_pools(world_size).run(_capacity_case, sized_tokens, hidden, use_fp8, timeout=120)
    assert len(set(limits)) == 1


def _region_bytes_for_rows(num_rows: int, hidden: int, hidden_bytes: int, num_scales: int) -> int:
    """The region `normal_region_bytes` describes, written out plainly: a fixed 8 * 256-byte
    overhead plus `num_rows` rows, each as large as the largest of a provisioned BF16 dispatch
    row (payload, max(1, H/128) scales, 16 int64 ids + 16 float32 weights, int32 source index),
    a BF16 combine row (payload + 16 float32 weights) and this dispatch's own row; rounded up
    to 256 bytes."""
    bf16_row = 2 * hidden + 4 * max(1, hidden // 128) + MAX_TOPK * 12 + 4
    combine_row = 2 * hidden + MAX_TOPK * 4
    own_row = hidden_bytes + 4 * num_scales + MAX_TOPK * 12 + 4
    raw = num_rows * max(bf16_row, combine_row, own_row) + 8 * 256
    return -(-raw // 256) * 256


@settings(max_examples=200, deadline=None)
@given(
    tokens=st.integers(0, 10_000),
    hidden=st.integers(1, 80).map(lambda h: 128 * h) | st.integers(1, 300).map(lambda h: 2 * h),
    num_ranks=st.integers(1, 160),
    slack=st.integers(0, 1 << 20),
    use_fp8=st.booleans(),
)
def test_max_tokens_per_rank_inverts_region_size(tokens, hidden, num_ranks, slack, use_fp8):
    use_fp8 = use_fp8 and hidden % 128 == 0
    hidden_bytes, num_scales = (hidden, hidden // 128) if use_fp8 else (2 * hidden, 0)
    sized = normal_region_bytes(tokens, 2 * hidden, num_ranks)
    if tokens > 0:
        assert sized == Config(num_max_tokens_per_rank=tokens).get_nvl_buffer_size_hint(2 * hidden, num_ranks)
    for num_nvl_bytes in (sized, sized + slack):
        limit = max_tokens_per_rank(num_nvl_bytes, hidden_bytes, num_scales, num_ranks)
        assert limit >= (tokens if num_nvl_bytes >= sized else 0)
        # The largest count whose region fits: limit fits, limit + 1 does not.
        assert _region_bytes_for_rows(num_ranks * limit, hidden, hidden_bytes, num_scales) <= num_nvl_bytes
        assert (
            _region_bytes_for_rows(num_ranks * (limit + 1), hidden, hidden_bytes, num_scales) > num_nvl_bytes
        )
    assert max_tokens_per_rank(0, hidden_bytes, num_scales, num_ranks) == 0


@pytest.mark.parametrize("args", [(1 << 20, 0, 0, 2), (1 << 20, 256, -1, 2), (1 << 20, 256, 0, 0)])
def test_max_tokens_per_rank_rejects_bad_sizes(args):
    with pytest.raises(ValueError):
        max_tokens_per_rank(*args)
