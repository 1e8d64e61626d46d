"""The compiled extension builds wherever the toolchain allows, even on machines without a GPU, so
CI catches breakage in csrc/ although it cannot run the kernels; and where it cannot serve, the
reason is one clear line and the portable backend serves instead."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
import torch.distributed as dist

from deepep_megatron import Buffer, limits
from deepep_megatron.backends import extension, intranode
from deepep_megatron.backends.protocols import BufferSizes, Topology


def _toolchain_present() -> bool:
    if os.environ.get("DEEPEP_MEGATRON_BUILD_EXT") == "0" or torch.version.cuda is None:
        return False
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    return shutil.which("nvcc") is not None or os.path.exists(os.path.join(cuda_home, "bin", "nvcc"))


@pytest.mark.skipif(not _toolchain_present(), reason="no CUDA toolchain: the extension is not built here")
def test_extension_is_built_and_importable():
    assert extension.extension_available(), (
        f"nvcc and a CUDA torch are present, so setup.py must build _C: {extension.unavailable_reason}"
    )
    module = extension.module
    for name in ("FP8_BLOCK_SIZE", "MAX_TOPK", "MAX_RANKS_PER_NODE", "MAX_LOCAL_EXPERTS", "REGION_ALIGNMENT"):
        assert getattr(module, name) == getattr(limits, name), name
    assert module.DeviceTimeout is TimeoutError


def test_intranode_reasons_name_what_is_missing():
    sizes = BufferSizes(num_nvl_bytes=1 << 20, num_rdma_bytes=0, low_latency_mode=False)
    reason = intranode.unavailable_reason(Topology(4, 4), sizes)
    if not torch.cuda.is_available():
        assert reason is not None and ("CUDA" in reason or "extension" in reason)
    if extension.extension_available() and torch.cuda.is_available():
        assert reason is None
        too_many = intranode.unavailable_reason(Topology(16, 16), sizes)
        assert too_many is not None and str(limits.MAX_RANKS_PER_NODE) in too_many
        no_bytes = intranode.unavailable_reason(Topology(4, 4), BufferSizes(0, 0, False))
        assert no_bytes == "num_nvl_bytes is 0"


def _buffer_summary_on_one_rank() -> dict:
    """A real Buffer on a one-rank gloo group, as a CPU-only user builds it."""
    buffer = Buffer(dist.group.WORLD, num_nvl_bytes=1 << 20, num_rdma_bytes=1 << 20, low_latency_mode=True)
    x = torch.randn(3, 8).bfloat16()
    topk_idx = torch.tensor([[0], [1], [-1]])
    layout = buffer.get_dispatch_layout(topk_idx, 2)
    recv_x, _, _, _, handle, _ = buffer.dispatch(
        x,
        num_tokens_per_rank=layout[0],
        is_token_in_rank=layout[3],
        num_tokens_per_expert=layout[2],
        topk_idx=topk_idx,
    )
    return {
        "summary": buffer.backend_summary,
        "name": buffer.backend_name,
        "handle_backend": handle.backend.name,
        "rows": recv_x.size(0),
    }


def test_buffer_serves_cpu_tensors_with_the_portable_backend(cpu_pools):
    (result,) = cpu_pools(1).run(_buffer_summary_on_one_rank)
    assert result["handle_backend"] == "portable"
    assert result["rows"] == 2  # the token with no expert stays home
    # The summary covers both modes; where the kernels do not serve it says why in the same line.
    assert result["summary"].startswith("normal: ") and "; low-latency: " in result["summary"]
    if not torch.cuda.is_available():
        assert result["name"] == "portable"
        assert "normal: portable backend (" in result["summary"]


@pytest.mark.skipif(not extension.extension_available(), reason="the extension is not built here")
def test_intranode_argument_classes_take_the_fields_the_adapter_sets():
    """backends/intranode.py builds these by field name; a misspelt or missing field must fail
    here, on the CPU, rather than on the first GPU dispatch."""
    module = extension.module
    x = torch.zeros(4, 8, dtype=torch.bfloat16)
    fields = {
        module.FreshDispatchArgs: dict(
            x=x,
            scales=None,
            topk_idx=torch.zeros(4, 2, dtype=torch.long),
            topk_weights=None,
            is_token_in_rank=torch.ones(4, 2, dtype=torch.bool),
            num_tokens_per_expert=torch.zeros(4, dtype=torch.int),
            num_worst_tokens=0,
            expert_alignment=1,
            num_sms=20,
        ),
        module.CachedDispatchArgs: dict(
            x=x, scales=None, count_matrix=x, send_slot=x, num_recv_rows=3, num_worst_tokens=0, num_sms=20
        ),
        module.CombineArgs: dict(
            x=x, topk_weights=None, bias0=x, bias1=None, send_slot=x, count_matrix=x, num_tokens=4, num_sms=20
        ),
    }
    for cls, values in fields.items():
        args = extension.fill_args(cls, **values)
        for name, value in values.items():
            got = getattr(args, name)
            assert torch.equal(got, value) if isinstance(value, torch.Tensor) else got == value, name
        with pytest.raises(AttributeError):
            args.not_a_field = 1
    for name in ("dispatch_fresh", "dispatch_cached", "combine", "layout", "open_peers", "ipc_handle"):
        assert hasattr(module.IntranodeRuntime, name), name
    assert not hasattr(module.IntranodeRuntime, "check_health")  # an internal check, not an API


# ------------------------------------------------------------------------------------ internode
def test_internode_is_routed_only_where_its_kernels_are(monkeypatch):
    """Groups spanning nodes go to the internode family; without its kernels (no NVSHMEM module, or
    a module built before the family existed, or a stale one) the reason is one line and the router
    keeps the portable backend."""
    from types import SimpleNamespace

    from deepep_megatron.backends import internode, nvshmem, selection

    spanning = Topology(8, 4)
    sizes = BufferSizes(num_nvl_bytes=0, num_rdma_bytes=1 << 30, low_latency_mode=False)
    family = selection._family_for("normal", spanning)
    assert family.name == "internode" and family.module == "deepep_megatron.backends.internode"
    assert selection._family_for("normal", Topology(8, 8)).name == "intranode"

    monkeypatch.setattr(nvshmem, "module", None)
    monkeypatch.setattr(nvshmem, "_import_error", "the NVSHMEM kernels are not built (test)")
    assert (
        selection._compiled_unavailable_reason(family, spanning, sizes)
        == "the NVSHMEM kernels are not built (test)"
    )
    assert internode.rdma_size_hint(64, 256, 8, 4, 4) == 0

    if torch.cuda.is_available():
        old_module = SimpleNamespace(LowLatencyRuntime=object)  # an _nvshmem without the family
        monkeypatch.setattr(nvshmem, "module", old_module)
        reason = internode.unavailable_reason(spanning, sizes)
        assert reason is not None and "without the internode kernels" in reason
        stale = SimpleNamespace(InternodeRuntime=object, MAX_NODES=limits.MAX_NODES + 1)
        monkeypatch.setattr(nvshmem, "module", stale)
        assert "stale" in internode.unavailable_reason(spanning, sizes)


def _spanning_buffer_on_cpu() -> dict:
    buffer = Buffer(dist.group.WORLD, num_rdma_bytes=1 << 20, num_ranks_per_node=1)
    topk_idx = torch.tensor([[0, 1], [1, -1]])
    layout = buffer.get_dispatch_layout(topk_idx, 2)
    return {"summary": buffer.backend_summary, "per_node": layout[1].tolist()}


def test_a_group_spanning_nodes_falls_back_to_portable_with_the_reason(cpu_pools):
    results = cpu_pools(2).run(_spanning_buffer_on_cpu)
    for result in results:
        if not torch.cuda.is_available():
            assert result["summary"].startswith("normal: portable backend ("), result["summary"]
    # Tokens per node (= per rank here): both tokens reach node 1, one reaches node 0.
    assert [r["per_node"] for r in results] == [[1, 2], [1, 2]]


def test_internode_argument_classes_take_the_fields_the_adapter_sets():
    """backends/internode.py builds these by field name: a misspelt field fails here, on the CPU."""
    from deepep_megatron.backends import internode, nvshmem

    if internode._kernels() is None:
        pytest.skip("the internode kernels are not built here")
    module = nvshmem.module
    t = torch.zeros(4, 2, dtype=torch.int)
    fields = {
        module.InternodeDispatchArgs: dict(
            x=torch.zeros(4, 8, dtype=torch.bfloat16),
            scales=None,
            topk_idx=None,
            topk_weights=None,
            send_slot=t,
            node_slot=t,
            count_matrix=t,
            own_node_tokens=t[0],
            records_from_node=[1, 2],
            max_tokens=4,
            max_recv_rows=8,
            num_recv_rows=6,
            num_recv_tokens=5,
            experts_per_rank=0,
            num_sms=20,
        ),
        module.InternodeCombineArgs: dict(
            x=torch.zeros(4, 8, dtype=torch.bfloat16),
            topk_weights=None,
            bias0=None,
            bias1=None,
            forward_rows=t,
            node_slot=t,
            records_from_node=[1, 2],
            tokens_to_node=[3, 0],
            max_tokens=4,
            max_recv_rows=8,
            num_recv_tokens=5,
            num_tokens=4,
            num_sms=20,
        ),
    }
    for cls, values in fields.items():
        args = extension.fill_args(cls, **values)
        for name, value in values.items():
            got = getattr(args, name)
            assert torch.equal(got, value) if isinstance(value, torch.Tensor) else got == value, name
        with pytest.raises(AttributeError):
            args.not_a_field = 1
    assert module.MAX_NODES == limits.MAX_NODES
    assert module.DeviceTimeout is TimeoutError
    hint = internode.rdma_size_hint(4096, 7168, 8, 4, 8)
    assert module.InternodeRuntime.required_bytes(4096, 7168, 8, 8, 4, 8 * 4096) == hint
    assert 0.5e9 < hint < 1.5e9  # csrc/internode/README.md: about 0.94 GB per rank


def test_config_rdma_hint_is_the_internode_hint_for_groups_larger_than_a_node():
    """DeepEP programs size num_rdma_bytes with Config.get_rdma_buffer_size_hint: one node needs
    none; 16 ranks (two nodes of 8) get the internode kernels' hint (0 where they are not built)."""
    from deepep_megatron import Config
    from deepep_megatron.backends import internode

    config = Config(24, num_max_tokens_per_rank=512)
    assert config.get_rdma_buffer_size_hint(7168 * 2, 8) == 0
    want = internode.rdma_size_hint(512, 7168, 16, 8, limits.MAX_TOPK)
    assert config.get_rdma_buffer_size_hint(7168 * 2, 16) == want
    if internode._kernels() is not None:
        assert want > 0


class _FakeRuntime:
    """Stands in for an NVSHMEM family's runtime: `check_health` raises once a wait timed out."""

    def __init__(self, timed_out: bool):
        self.timed_out, self.destroyed = timed_out, False

    def check_health(self):
        if self.timed_out:
            raise TimeoutError("rank 0 timed out")

    def destroy(self):
        self.destroyed = True


@pytest.mark.parametrize("timed_out", [False, True])
def test_a_failed_runtime_keeps_its_symmetric_block_out_of_the_pool(timed_out):
    """After a timeout, peers may still write the block: garbage collection of the Buffer must
    not hand it to the next one. A healthy runtime's block goes back to the pool."""
    from deepep_megatron.backends import nvshmem

    runtime, block = (
        _FakeRuntime(timed_out),
        nvshmem.SymmetricBlock(block_id=0, address=1 << 20, num_bytes=64),
    )
    nvshmem.release_runtime(runtime, block, group=None, collective=False)
    assert runtime.destroyed
    assert block.in_use is timed_out


_THROW_EVERY_TIMEOUT = """
from deepep_megatron.backends import extension, nvshmem
modules = [extension.module] + ([nvshmem.module] if nvshmem.module is not None else [])
for module in modules + modules[::-1]:  # both orders: each module translates only its own throws
    cases = [(2, 1, 2, "timed out after 3 s in "), (0, -1, 3, "gave up at the start of ")]
    for rank, peer, culprit, words in cases:
        try:
            module._throw_timeout(rank, peer, (1 << 16) | 2, culprit, 3.0)
        except TimeoutError as error:
            text = str(error)
            assert type(error) is TimeoutError, repr(error)
            assert text.startswith(f"deepep_megatron: rank {rank} {words}"), text
            assert (f"waiting for rank {peer} (expected epoch 5, saw 4)" in text) == (peer >= 0), text
            assert (f"because rank {culprit} timed out after 3 s" in text) == (culprit != rank), text
        else:
            raise AssertionError(f"{module.__name__}._throw_timeout did not raise")
print(len(modules), "modules ok")
"""


@pytest.mark.skipif(not _toolchain_present(), reason="no CUDA toolchain: the extension is not built here")
def test_every_module_timeout_reaches_python_as_timeout_error():
    """A timeout thrown in C++ becomes the builtin TimeoutError with its message, from either
    module, with both loaded (on the GPU machine the translation once crashed the process; a
    child process, so that such a crash fails this test instead of ending pytest)."""
    import subprocess
    import sys

    assert extension.extension_available(), extension.unavailable_reason
    run = subprocess.run(
        [sys.executable, "-c", _THROW_EVERY_TIMEOUT], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, f"exit code {run.returncode}\n{run.stdout}\n{run.stderr[-3000:]}"
    assert run.stdout.strip().endswith("ok"), run.stdout
