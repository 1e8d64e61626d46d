"""The public API against DESIGN.md §2 (DeepEP V1 `deep_ep.Buffer`): signatures and defaults
(written out plainly here, checked with `inspect`), return-tuple arity, the class helpers for any
rank count, `Config` size hints, `capture()`, `destroy()` and the `deep_ep` module surface."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st

import deepep_megatron as deep_ep
from deepep_megatron import Buffer, Config, EventOverlap

_REQUIRED = inspect.Parameter.empty

# Positional-or-keyword parameters in DeepEP's order, with DeepEP's defaults (`_REQUIRED`: none).
# Anything a method adds beyond these must come after them and be keyword-only with a default.
EXPECTED_SIGNATURES = {
    "__init__": [
        ("group", _REQUIRED),
        ("num_nvl_bytes", 0),
        ("num_rdma_bytes", 0),
        ("low_latency_mode", False),
        ("num_qps_per_rank", 24),
        ("allow_nvlink_for_low_latency_mode", True),
        ("allow_mnnvl", False),
        ("use_fabric", False),
        ("explicitly_destroy", False),
        ("enable_shrink", False),
        ("comm", None),
    ],
    "get_dispatch_layout": [
        ("topk_idx", _REQUIRED),
        ("num_experts", _REQUIRED),
        ("previous_event", None),
        ("async_finish", False),
        ("allocate_on_comm_stream", False),
    ],
    "dispatch": [
        ("x", _REQUIRED),
        ("handle", None),
        ("num_tokens_per_rank", None),
        ("num_tokens_per_rdma_rank", None),
        ("is_token_in_rank", None),
        ("num_tokens_per_expert", None),
        ("topk_idx", None),
        ("topk_weights", None),
        ("expert_alignment", 1),
        ("num_worst_tokens", 0),
        ("config", None),
        ("previous_event", None),
        ("async_finish", False),
        ("allocate_on_comm_stream", False),
    ],
    "combine": [
        ("x", _REQUIRED),
        ("handle", _REQUIRED),
        ("topk_weights", None),
        ("bias", None),
        ("config", None),
        ("previous_event", None),
        ("async_finish", False),
        ("allocate_on_comm_stream", False),
    ],
    "low_latency_dispatch": [
        ("x", _REQUIRED),
        ("topk_idx", _REQUIRED),
        ("num_max_dispatch_tokens_per_rank", _REQUIRED),
        ("num_experts", _REQUIRED),
        ("cumulative_local_expert_recv_stats", None),
        ("dispatch_wait_recv_cost_stats", None),
        ("use_fp8", True),
        ("round_scale", False),
        ("use_ue8m0", False),
        ("async_finish", False),
        ("return_recv_hook", False),
    ],
    "low_latency_combine": [
        ("x", _REQUIRED),
        ("topk_idx", _REQUIRED),
        ("topk_weights", _REQUIRED),
        ("handle", _REQUIRED),
        ("use_logfmt", False),
        ("zero_copy", False),
        ("async_finish", False),
        ("return_recv_hook", False),
        ("out", None),
        ("combine_wait_recv_cost_stats", None),
    ],
    "get_next_low_latency_combine_buffer": [("handle", _REQUIRED)],
    "clean_low_latency_buffer": [
        ("num_max_dispatch_tokens_per_rank", _REQUIRED),
        ("hidden", _REQUIRED),
        ("num_experts", _REQUIRED),
    ],
    "destroy": [],
}

EXPECTED_STATIC = {
    "capture": [],  # static in DeepEP: `Buffer.capture()` and `buffer.capture()` both work
    "set_num_sms": [("new_num_sms", _REQUIRED)],
    "get_dispatch_config": [("num_ranks", _REQUIRED)],
    "get_combine_config": [("num_ranks", _REQUIRED)],
    "get_low_latency_rdma_size_hint": [
        ("num_max_dispatch_tokens_per_rank", _REQUIRED),
        ("hidden", _REQUIRED),
        ("num_ranks", _REQUIRED),
        ("num_experts", _REQUIRED),
    ],
}

EXPECTED_CONFIG_INIT = [
    ("num_sms", 20),
    ("num_max_nvl_chunked_send_tokens", 6),
    ("num_max_nvl_chunked_recv_tokens", 256),
    ("num_max_rdma_chunked_send_tokens", 6),
    ("num_max_rdma_chunked_recv_tokens", 256),
]


def _check_parameters(fn, expected, *, skip_self: bool) -> None:
    params = list(inspect.signature(fn).parameters.values())
    if skip_self:
        assert params and params[0].name == "self", f"{fn.__qualname__} is not an instance method"
        params = params[1:]
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    got = [(p.name, p.default) for p in positional[: len(expected)]]
    assert got == expected, f"{fn.__qualname__}: positional parameters {got} != {expected}"
    for p in params[len(expected) :]:
        assert p.kind == p.KEYWORD_ONLY and p.default is not p.empty, (
            f"{fn.__qualname__}: extra parameter {p.name!r} must be keyword-only with a default"
        )


@pytest.mark.parametrize("name", list(EXPECTED_SIGNATURES))
def test_buffer_method_signature(name):
    _check_parameters(getattr(Buffer, name), EXPECTED_SIGNATURES[name], skip_self=True)


@pytest.mark.parametrize("name", list(EXPECTED_STATIC))
def test_buffer_static_signature(name):
    assert isinstance(inspect.getattr_static(Buffer, name), (staticmethod, classmethod)), (
        f"{name} must be static"
    )
    _check_parameters(getattr(Buffer, name), EXPECTED_STATIC[name], skip_self=False)


def test_config_signature_and_hints():
    _check_parameters(Config.__init__, EXPECTED_CONFIG_INIT, skip_self=True)
    config = Config(24, 6, 256, 6, 128)  # positional, as DeepEP's tables build it
    assert (
        config.num_sms,
        config.num_max_nvl_chunked_recv_tokens,
        config.num_max_rdma_chunked_recv_tokens,
    ) == (
        24,
        256,
        128,
    )
    _check_parameters(
        Config.get_nvl_buffer_size_hint,
        [("hidden_bytes", _REQUIRED), ("num_ranks", _REQUIRED)],
        skip_self=True,
    )
    params = list(inspect.signature(Config.get_rdma_buffer_size_hint).parameters)
    assert params[:3] == ["self", "hidden_bytes", "num_ranks"]
    with pytest.raises(ValueError):
        Config(0)


def test_event_overlap_api():
    _check_parameters(EventOverlap.__init__, [("event", None), ("extra_tensors", None)], skip_self=True)
    _check_parameters(EventOverlap.current_stream_wait, [], skip_self=True)
    event = EventOverlap()
    event.current_stream_wait()  # nothing to wait for: a no-op
    with event as entered:
        assert entered is event
    assert "EventOverlap" in repr(event)


def test_deep_ep_module_surface():
    assert deep_ep.Buffer is Buffer
    assert deep_ep.Config is Config
    assert deep_ep.EventOverlap is EventOverlap
    assert deep_ep.topk_idx_t is torch.int64
    for name in ("Buffer", "Config", "EventOverlap", "topk_idx_t"):
        assert name in deep_ep.__all__
    assert Buffer.num_sms == 20  # DeepEP's class default


# --------------------------------------------------------------------------------------------------
# class helpers without a process group


def test_configs_for_any_rank_count():
    saved = Buffer.num_sms
    try:
        for num_sms in (20, 24, 2):
            Buffer.set_num_sms(num_sms)
            assert Buffer.num_sms == num_sms
            for num_ranks in range(1, 161):
                for config in (Buffer.get_dispatch_config(num_ranks), Buffer.get_combine_config(num_ranks)):
                    assert isinstance(config, Config)
                    assert config.num_sms == num_sms
                    assert config.get_nvl_buffer_size_hint(7168 * 2, num_ranks) > 0
        for bad in (0, -2):
            with pytest.raises(ValueError):
                Buffer.set_num_sms(bad)
        assert Buffer.num_sms == 2, "a refused set_num_sms must not change the setting"
        for bad in (0, -1):
            with pytest.raises(ValueError):
                Buffer.get_dispatch_config(bad)
            with pytest.raises(ValueError):
                Buffer.get_combine_config(bad)
    finally:
        Buffer.num_sms = saved


@settings(max_examples=60, deadline=None)
@given(
    tokens=st.integers(1, 8192),
    hidden=st.integers(1, 8192),
    num_ranks=st.integers(1, 160),
    step=st.integers(1, 512),
)
def test_size_hints_monotone(tokens, hidden, num_ranks, step):
    def nvl(t, h, r):
        return Config(num_max_tokens_per_rank=t).get_nvl_buffer_size_hint(h * 2, r)

    # Non-decreasing everywhere (sizes are rounded up to 256 bytes); strictly larger once the
    # growth passes the rounding (two more rows of at least 202 bytes each).
    base = nvl(tokens, hidden, num_ranks)
    assert base > 0
    assert nvl(tokens + step, hidden, num_ranks) >= base
    assert nvl(tokens + 2, hidden, num_ranks) > base
    assert nvl(tokens, hidden + step, num_ranks) >= base
    assert nvl(tokens, hidden + 128 * step, num_ranks) > base
    assert nvl(tokens, hidden, num_ranks + 1) >= base
    assert nvl(tokens, hidden, num_ranks + 2) > base
    assert Config().get_rdma_buffer_size_hint(hidden * 2, num_ranks) >= 0

    def ll(t, h, r, e):
        return Buffer.get_low_latency_rdma_size_hint(t, h, r, e)

    experts = num_ranks * 2
    base = ll(tokens, hidden, num_ranks, experts)
    assert base > 0
    assert ll(tokens + step, hidden, num_ranks, experts) >= base
    assert ll(tokens + 2, hidden, num_ranks, experts) > base
    assert ll(tokens, hidden + step, num_ranks, experts) >= base
    assert ll(tokens, hidden + 128 * step, num_ranks, experts) > base
    assert ll(tokens, hidden, num_ranks, experts + num_ranks) >= base
    assert ll(tokens, hidden, num_ranks, experts + 4 * num_ranks) > base


# --------------------------------------------------------------------------------------------------
# return tuples, capture() and destroy() on a live group


def _return_arity_case():
    rank, num_ranks = dist.get_rank(), dist.get_world_size()
    num_experts, hidden = 2 * num_ranks, 128
    topk_idx = (torch.arange(6, dtype=torch.int64).view(3, 2) + rank) % num_experts
    topk_weights = torch.ones(3, 2)
    x = torch.randn(3, hidden).to(torch.bfloat16)
    arity = {}
    buffer = deep_ep.Buffer(dist.group.WORLD, int(1e6), 0)  # positional, as DeepEP programs call it
    layout = buffer.get_dispatch_layout(topk_idx, num_experts)
    arity["get_dispatch_layout"] = len(layout)
    per_rank, per_rdma_rank, per_expert, in_rank, event = layout
    assert per_rdma_rank is None and isinstance(event, EventOverlap)
    assert per_rank.dtype == per_expert.dtype == torch.int32 and in_rank.dtype == torch.bool
    assert tuple(per_rank.shape) == (num_ranks,) and tuple(per_expert.shape) == (num_experts,)
    assert tuple(in_rank.shape) == (3, num_ranks)
    out = buffer.dispatch(x, None, per_rank, None, in_rank, per_expert, topk_idx, topk_weights)
    arity["dispatch"] = len(out)
    recv_x, recv_idx, recv_w, per_expert_list, handle, event = out
    assert (
        recv_idx.dtype == torch.int64 and recv_w.dtype == torch.float32 and isinstance(per_expert_list, list)
    )
    arity["dispatch(cached)"] = len(buffer.dispatch(x, handle))
    combined = buffer.combine(recv_x, handle, recv_w)
    arity["combine"] = len(combined)
    assert combined[0].dtype == torch.bfloat16 and tuple(combined[0].shape) == (3, hidden)

    ll_bytes = Buffer.get_low_latency_rdma_size_hint(4, hidden, num_ranks, num_experts)
    ll_buffer = deep_ep.Buffer(
        dist.group.WORLD, 0, ll_bytes, low_latency_mode=True, num_qps_per_rank=num_experts
    )
    ll_out = ll_buffer.low_latency_dispatch(x, topk_idx, 4, num_experts)
    arity["low_latency_dispatch"] = len(ll_out)
    (recv_fp8, recv_scales), recv_count, ll_handle, _, hook = ll_out
    assert hook is None and recv_count.dtype == torch.int32
    ll_combined = ll_buffer.low_latency_combine(
        recv_fp8.to(torch.bfloat16), topk_idx, topk_weights, ll_handle
    )
    arity["low_latency_combine"] = len(ll_combined)

    captured = buffer.capture()
    assert isinstance(captured, EventOverlap)
    buffer.get_dispatch_layout(topk_idx, num_experts, previous_event=captured)
    return arity


def test_return_tuple_arity(cpu_pools):
    for arity in cpu_pools(2).run(_return_arity_case):
        assert arity == {
            "get_dispatch_layout": 5,
            "dispatch": 6,
            "dispatch(cached)": 6,
            "combine": 3,
            "low_latency_dispatch": 5,
            "low_latency_combine": 3,
        }


def _destroy_case():
    rank = dist.get_rank()
    topk_idx = torch.tensor([[rank]], dtype=torch.int64)
    buffer = Buffer(dist.group.WORLD, explicitly_destroy=True)
    buffer.get_dispatch_layout(topk_idx, dist.get_world_size())
    assert buffer.destroy() is None
    with pytest.raises(RuntimeError):
        buffer.get_dispatch_layout(topk_idx, dist.get_world_size())
    implicit = Buffer(dist.group.WORLD)
    with pytest.raises(RuntimeError, match="explicitly_destroy"):
        implicit.destroy()
    implicit.get_dispatch_layout(topk_idx, dist.get_world_size())  # still alive
    del implicit  # released by garbage collection without explicitly_destroy
    return True


def test_destroy_semantics(cpu_pools):
    assert cpu_pools(2).run(_destroy_case) == [True, True]


# --------------------------------------------------------------------------------------------------
# what programs written for DeepEP (Megatron-LM's flex dispatcher among them) reach for


def test_deep_ep_utils_and_install_as_deep_ep():
    """`deep_ep.utils.EventHandle/EventOverlap` and `install_as_deep_ep`, in a fresh interpreter so
    the module table of this one stays clean."""
    code = """
import sys, types
import deepep_megatron
deepep_megatron.install_as_deep_ep()
from deep_ep import Buffer, Config
from deep_ep.utils import EventHandle, EventOverlap
assert Buffer is deepep_megatron.Buffer and Config is deepep_megatron.Config
event = EventOverlap(EventHandle())
event.current_stream_wait()
deepep_megatron.install_as_deep_ep()  # twice is fine
deepep_megatron.uninstall_as_deep_ep()
assert "deep_ep" not in sys.modules
sys.modules["deep_ep"] = types.ModuleType("deep_ep")  # DeepEP itself, imported first
try:
    deepep_megatron.install_as_deep_ep()
except RuntimeError as error:
    assert "different deep_ep" in str(error)
else:
    raise AssertionError("install_as_deep_ep replaced another deep_ep")
print("ok")
"""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_static_helpers_deepep_programs_call():
    assert isinstance(inspect.getattr_static(Buffer, "is_sm90_compiled"), staticmethod)
    assert isinstance(Buffer.is_sm90_compiled(), bool)
    assert isinstance(Buffer.capture(), EventOverlap)  # static, as DeepEP's


def _handles_index_like_deepep_case():
    rank, num_ranks = dist.get_rank(), dist.get_world_size()
    num_experts, hidden = 2 * num_ranks, 128
    generator = torch.Generator().manual_seed(rank)
    topk_idx = torch.randint(-1, num_experts, (5, 2), generator=generator)
    x = torch.randn(5, hidden, generator=generator).bfloat16()
    ll_bytes = Buffer.get_low_latency_rdma_size_hint(8, hidden, num_ranks, num_experts)
    buffer = Buffer(dist.group.WORLD, num_rdma_bytes=ll_bytes, low_latency_mode=True)
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, num_experts)
    recv = buffer.dispatch(
        x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert
    )
    handle = recv[4]
    rank_prefix, channel_prefix, recv_channel_prefix, recv_src_idx, is_token_in_rank, send_head = handle
    assert len(handle) == 6 and channel_prefix is None and recv_channel_prefix is None
    assert handle[3] is handle.recv_src_idx and is_token_in_rank is in_rank and send_head is handle.send_slot
    # rank_prefix_matrix[s, d]: tokens that ranks 0..s send to rank d; its last row is what d receives.
    received = [torch.zeros(1, dtype=torch.int32) for _ in range(num_ranks)]
    dist.all_gather(received, torch.tensor([recv[0].size(0)], dtype=torch.int32))
    assert rank_prefix[-1].tolist() == [int(r) for r in received]
    assert recv_src_idx.numel() == recv[0].size(0)

    _, _, ll_handle, _, _ = buffer.low_latency_dispatch(x, topk_idx, 8, num_experts, use_fp8=False)
    src_info, layout_range, max_tokens, ll_hidden, ll_experts = ll_handle
    assert src_info is ll_handle.recv_src_info and layout_range is ll_handle.recv_layout_range
    assert (max_tokens, ll_hidden, ll_experts) == (8, hidden, num_experts) and len(ll_handle) == 5
    return True


def test_handles_index_like_deepep_tuples(cpu_pools):
    assert cpu_pools(2).run(_handles_index_like_deepep_case) == [True, True]


def _local_buffer_tensor_case():
    buffer = Buffer(dist.group.WORLD, num_nvl_bytes=1024, num_rdma_bytes=256)
    whole = buffer.get_local_buffer_tensor(torch.bfloat16)
    assert whole.dtype == torch.bfloat16 and whole.numel() == 512
    part = buffer.get_local_buffer_tensor(torch.float32, (4, 8), offset=512)
    part.fill_(1.0)
    assert buffer.get_local_buffer_tensor(torch.float32)[128:160].sum().item() == 32  # same memory
    assert buffer.get_local_buffer_tensor(torch.int64, use_rdma_buffer=True).numel() == 32
    with pytest.raises(ValueError):
        buffer.get_local_buffer_tensor(torch.float32, (300,))
    with pytest.raises(ValueError):
        buffer.get_local_buffer_tensor(torch.float32, offset=2)
    return True


def test_get_local_buffer_tensor(cpu_pools):
    assert cpu_pools(1).run(_local_buffer_tensor_case) == [True]
