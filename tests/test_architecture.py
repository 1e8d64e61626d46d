"""The seam between `Buffer` and the backends stays what docs/architecture.md says it is: every
communication call of `Buffer` is served by exactly one protocol method, every backend implements
its whole protocol, and the document's table lists the same calls."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from deepep_megatron import Buffer
from deepep_megatron.backends import internode, intranode, selection
from deepep_megatron.backends.portable import PortableBackend
from deepep_megatron.backends.portable_low_latency import PortableLowLatencyBackend
from deepep_megatron.backends.protocols import BUFFER_CALLS, LowLatencyBackend, NormalBackend

ROOT = Path(__file__).resolve().parents[1]

# Public Buffer methods that do not communicate (sizes, configs, streams, introspection, teardown).
LOCAL_METHODS = {
    "capture",
    "destroy",
    "get_combine_config",
    "get_comm_stream",
    "get_dispatch_config",
    "get_local_device_id",
    "get_low_latency_rdma_size_hint",
    "get_num_rdma_ranks",
    "get_rdma_rank",
    "get_local_buffer_tensor",
    "get_root_rdma_rank",
    "is_sm90_compiled",
    "set_num_sms",
}

BACKENDS = {
    NormalBackend: [PortableBackend, intranode.IntranodeBackend, internode.InternodeBackend],
    LowLatencyBackend: [PortableLowLatencyBackend],
}


def _protocol_methods(protocol: type) -> set[str]:
    return {name for name, value in vars(protocol).items() if callable(value) and not name.startswith("_")}


def test_every_buffer_call_is_served_by_one_protocol_method():
    public = {
        name
        for name, value in vars(Buffer).items()
        if not name.startswith("_") and callable(getattr(Buffer, name)) and not isinstance(value, property)
    }
    assert public - LOCAL_METHODS == set(BUFFER_CALLS), "a Buffer call was added or removed without the seam"
    for call, (protocol, method) in BUFFER_CALLS.items():
        assert method in _protocol_methods(protocol), f"{protocol.__name__} lacks {method}"
        source = inspect.getsource(getattr(Buffer, call))
        assert f".{method}(" in source, f"Buffer.{call} does not go through {protocol.__name__}.{method}"


@pytest.mark.parametrize(
    "protocol,backend", [(protocol, backend) for protocol, classes in BACKENDS.items() for backend in classes]
)
def test_backends_implement_their_whole_protocol(protocol, backend):
    for method in _protocol_methods(protocol):
        implementation = getattr(backend, method, None)
        assert callable(implementation), f"{backend.__name__} lacks {protocol.__name__}.{method}"
        wanted = list(inspect.signature(getattr(protocol, method)).parameters)
        got = list(inspect.signature(implementation).parameters)
        assert got == wanted, f"{backend.__name__}.{method}{got} != {protocol.__name__}.{method}{wanted}"
    assert isinstance(getattr(backend, "name", None), str)


def test_every_compiled_family_module_has_the_family_interface():
    for family in selection.FAMILIES.values():
        if family.module is None:
            assert family.missing, f"{family.name} names no module and no reason"
            continue
        module = __import__(family.module, fromlist=["unavailable_reason"])
        assert callable(module.unavailable_reason) and callable(module.create), family.module
        assert (ROOT / "csrc" / family.name).is_dir(), f"csrc/{family.name}/ holds the {family.name} kernels"


def test_architecture_document_lists_the_seam():
    text = (ROOT / "docs" / "architecture.md").read_text()
    rows = re.findall(r"^\| `(\w+)` \| `(\w+)\.(\w+)` \|", text, flags=re.MULTILINE)
    documented = {call: (protocol, method) for call, protocol, method in rows}
    actual = {call: (protocol.__name__, method) for call, (protocol, method) in BUFFER_CALLS.items()}
    assert documented == actual, "docs/architecture.md's table of Buffer calls is out of date"
