"""The one place that decides which backend serves a call, and says why in one line when the
compiled kernels cannot.

A route is decided once per `Buffer` and mode, from the group's topology, the buffer's sizes,
the user's preference and what the extension was built with:

- normal mode: the intranode kernels when the group fits one node, the internode kernels when it
  spans several;
- low-latency mode: the low-latency kernels.

Each call then goes to the routed backend if its tensors are on the GPU, and to the portable
backend otherwise. A handle goes back to the backend that made it.

Adding a compiled family: write `backends/<family>.py` with `unavailable_reason(topology, sizes)`
and `create(group, topology, sizes)`, and name the module in `FAMILIES`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch
import torch.distributed as dist

from deepep_megatron.backends.portable import PortableBackend
from deepep_megatron.backends.portable_low_latency import PortableLowLatencyBackend
from deepep_megatron.backends.protocols import (
    BackendUnavailable,
    BufferSizes,
    LowLatencyBackend,
    NormalBackend,
    Topology,
)
from deepep_megatron.handle import DispatchHandle, LowLatencyHandle

PREFERENCES = ("auto", "portable", "cuda")


@dataclass(frozen=True)
class Family:
    """A compiled kernel family: its name and the module that adapts it to a protocol. `module`
    None means the family is not part of this version; `missing` then says so."""

    name: str
    module: str | None
    missing: str = ""


FAMILIES = {
    "intranode": Family("intranode", "deepep_megatron.backends.intranode"),
    "internode": Family("internode", "deepep_megatron.backends.internode"),
    "low_latency": Family("low_latency", "deepep_megatron.backends.low_latency"),
}


@dataclass(frozen=True)
class Route:
    """Where one mode's CUDA tensors go. `family` is the compiled family serving them, or None
    when the portable backend does; `reason` then says why, in one line."""

    mode: str
    backend: object
    family: str | None
    reason: str | None

    def describe(self) -> str:
        if self.family is not None:
            return f"{self.mode}: {self.family} kernels"
        return f"{self.mode}: portable backend ({self.reason})"


def _family_for(mode: str, topology: Topology) -> Family:
    if mode == "low-latency":
        return FAMILIES["low_latency"]
    return FAMILIES["internode" if topology.spans_nodes else "intranode"]


def _compiled_unavailable_reason(family: Family, topology: Topology, sizes: BufferSizes) -> str | None:
    if family.module is None:
        return family.missing
    module = importlib.import_module(family.module)
    return module.unavailable_reason(topology, sizes)


class BackendRouter:
    """The backends of one `Buffer` and the rule that picks one per call.

    Collective: every rank of the group builds it together (compiled backends exchange memory
    handles while they are created).
    """

    def __init__(self, group: dist.ProcessGroup, topology: Topology, sizes: BufferSizes, preference: str):
        if preference not in PREFERENCES:
            raise ValueError(f"backend must be one of {PREFERENCES}, got {preference!r}")
        self.topology = topology
        self.preference = preference
        self.portable = PortableBackend(group, topology.num_ranks_per_node)
        self.portable_low_latency = PortableLowLatencyBackend(group)
        uses_normal = not sizes.low_latency_mode or sizes.num_nvl_bytes > 0
        self.normal_route = self._decide(group, "normal", sizes, required=uses_normal)
        self.low_latency_route = self._decide(group, "low-latency", sizes, required=sizes.low_latency_mode)

    def _decide(self, group, mode: str, sizes: BufferSizes, required: bool) -> Route:
        portable = self.portable if mode == "normal" else self.portable_low_latency
        if self.preference == "portable":
            return Route(mode, portable, None, "backend='portable' was asked for")
        family = _family_for(mode, self.topology)
        reason = _compiled_unavailable_reason(family, self.topology, sizes)
        if reason is None:
            module = importlib.import_module(family.module)
            try:
                return Route(mode, module.create(group, self.topology, sizes), family.name, None)
            except BackendUnavailable as error:
                reason = str(error)
        if self.preference == "cuda" and required:
            raise RuntimeError(
                f"backend='cuda' was asked for, but the {family.name} kernels cannot serve: {reason}"
            )
        return Route(mode, portable, None, reason)

    # ------------------------------------------------------------------ per call
    def normal(self, device: torch.device) -> NormalBackend:
        return self._serve(self.normal_route, self.portable, device)

    def low_latency(self, device: torch.device) -> LowLatencyBackend:
        return self._serve(self.low_latency_route, self.portable_low_latency, device)

    def _serve(self, route: Route, portable, device: torch.device):
        if device.type == "cuda":
            return route.backend
        if self.preference == "cuda":
            raise RuntimeError(f"backend='cuda' was asked for, but the tensors are on {device}")
        return portable

    @staticmethod
    def for_handle(handle: DispatchHandle | LowLatencyHandle):
        """The backend that made `handle`: combines and cached dispatches go back to it (the
        handle keeps it alive, so a handle outlives a Buffer rebuilt in between)."""
        return handle.backend

    # ------------------------------------------------------------------ reporting and teardown
    def describe(self) -> str:
        """One line: which backend serves CUDA tensors in each mode, and why not the kernels."""
        return "; ".join(route.describe() for route in (self.normal_route, self.low_latency_route))

    def destroy(self, collective: bool) -> None:
        for route in (self.normal_route, self.low_latency_route):
            if route.family is not None:
                route.backend.destroy(collective)
