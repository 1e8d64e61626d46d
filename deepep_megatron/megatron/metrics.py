"""Per-layer timing and bandwidth of dispatch and combine, and the tokens-per-expert imbalance.

The dispatcher records every communication call here; :func:`collect` turns one iteration's
records into scalars for the training log / wandb and starts the next iteration.

Timing:
- CUDA tensors: two CUDA events on the compute stream around each call (the start event
  completes when the work queued before the call is done, the end event after the compute
  stream has waited for the communication), so the elapsed time is the communication as the
  compute stream sees it. The events are read only in :func:`collect`, after the iteration, so
  timing adds no synchronisation to the step.
- CPU tensors: ``time.perf_counter`` around the (synchronous) call.

Bytes follow DESIGN.md §4: received rows x hidden x 2 for BF16, x (1 + 4/128) for FP8 (payload
plus scales); combine counts the same rows at BF16. Rows include the rank's own tokens.

Network bytes (groups spanning nodes): the bytes that cross nodes
(:mod:`deepep_megatron.network_bytes`: per token, once per destination node other than its own)
may be set on a timer as ``timer.network_bytes`` (a number or a 0-dim tensor, read only in
:func:`collect`); they are reported as ``deepep/{kind}_rdma_GBps``.

Kinds: ``dispatch`` and ``combine`` are the forward calls; ``dispatch_bwd`` is the cached dispatch
that is the gradient of combine, ``combine_bwd`` the combine that is the gradient of dispatch.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.distributed as dist

from deepep_megatron.network_bytes import RowFormat, remote_pairs_from_routing

KINDS = ("dispatch", "combine", "dispatch_bwd", "combine_bwd")
_DISPATCH_KINDS = ("dispatch", "dispatch_bwd")
PREFIX = "deepep"


@dataclass
class _Record:
    layer: int
    kind: str
    num_bytes: float
    network_bytes: float | torch.Tensor = 0.0
    seconds: float | None = None
    start: torch.cuda.Event | None = None
    end: torch.cuda.Event | None = None

    def elapsed(self) -> float:
        if self.seconds is None:
            self.end.synchronize()
            self.seconds = self.start.elapsed_time(self.end) / 1e3
        return self.seconds


class _Timer:
    """Context manager returned by :meth:`CommMetrics.time`."""

    def __init__(self, metrics: CommMetrics, layer: int, kind: str, device: torch.device):
        self.metrics, self.layer, self.kind, self.device = metrics, layer, kind, device
        self.num_bytes = 0.0
        self.network_bytes: float | torch.Tensor = 0.0

    def __enter__(self) -> _Timer:
        if self.device.type == "cuda":
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._t0 = time.perf_counter()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            return
        record = _Record(self.layer, self.kind, float(self.num_bytes), self.network_bytes)
        if self.device.type == "cuda":
            record.start, record.end = self._start, torch.cuda.Event(enable_timing=True)
            record.end.record()
        else:
            record.seconds = time.perf_counter() - self._t0
        self.metrics._records.append(record)


class _NullTimer:
    num_bytes = 0.0
    network_bytes = 0.0

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


class CommMetrics:
    """Process-wide recorder (one per process: :data:`METRICS`)."""

    def __init__(self) -> None:
        self.enabled = True
        self._records: list[_Record] = []
        self._expert_counts: dict[int, torch.Tensor] = {}
        self._next_anonymous_layer = 1000

    def anonymous_layer_id(self) -> int:
        """A label for a dispatcher that is not inside an MoELayer."""
        self._next_anonymous_layer += 1
        return self._next_anonymous_layer

    def time(self, layer: int | None, kind: str, device: torch.device):
        """``with metrics.time(layer, kind, device) as t: ...; t.num_bytes = ...`` (a no-op when
        disabled or ``layer`` is None)."""
        if not self.enabled or layer is None:
            return _NullTimer()
        return _Timer(self, layer, kind, device)

    def add_expert_counts(self, layer: int | None, num_tokens_per_expert: torch.Tensor) -> None:
        """Accumulate this rank's tokens per (global) expert for ``layer`` (stays on device)."""
        if not self.enabled or layer is None:
            return
        counts = num_tokens_per_expert.detach().to(torch.float64)
        previous = self._expert_counts.get(layer)
        self._expert_counts[layer] = counts if previous is None else previous + counts

    def reset(self) -> None:
        self._records.clear()
        self._expert_counts.clear()

    def collect(self, group: dist.ProcessGroup | None = None) -> dict[str, float]:
        """Scalars for the iteration recorded since the last call, then reset.

        With ``group``, times and bytes are summed over its ranks (so GB/s is the per-rank
        bandwidth, total bytes over total time, and ms the mean time per rank) and expert counts
        are summed (so the imbalance is global); every rank of the group must call this
        together. Keys (``L`` is the layer number):

        - ``deepep/{kind}_GBps/layer_L``, ``deepep/{kind}_ms/layer_L``: bandwidth and time summed over
          the iteration's micro-batches; ``deepep/{kind}_GBps`` and ``deepep/{kind}_ms`` are the
          mean over layers (time: total over layers);
        - ``deepep/{kind}_rdma_GBps/layer_L`` and ``deepep/{kind}_rdma_GBps`` (mean over layers):
          network bytes over the same time, where network bytes were recorded;
        - ``deepep/expert_imbalance/layer_L`` = max / mean of the tokens per expert, and
          ``deepep/expert_imbalance`` the mean over layers.
        """
        sums: dict[tuple[int, str], list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])
        for record in self._records:
            entry = sums[(record.layer, record.kind)]
            entry[0] += record.elapsed()
            entry[1] += record.num_bytes
            entry[2] += float(record.network_bytes)
        keys = sorted(sums)
        layers = sorted(self._expert_counts)
        use_group = group is not None and dist.is_initialized() and dist.get_world_size(group) > 1
        device = (
            next(iter(self._expert_counts.values())).device if self._expert_counts else torch.device("cpu")
        )
        if use_group and dist.get_backend(group) == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        if use_group:
            flat = torch.tensor([v for k in keys for v in sums[k]], dtype=torch.float64, device=device)
            if flat.numel():
                dist.all_reduce(flat, group=group)
                for i, key in enumerate(keys):
                    sums[key] = flat[3 * i : 3 * i + 3].tolist()
        num_ranks = dist.get_world_size(group) if use_group else 1
        out: dict[str, float] = {}
        per_kind: dict[str, list[tuple[float, float, float | None]]] = defaultdict(list)
        for layer, kind in keys:
            seconds, num_bytes, network_bytes = sums[(layer, kind)]
            gbps = num_bytes / seconds / 1e9 if seconds > 0 else 0.0
            out[f"{PREFIX}/{kind}_GBps/layer_{layer}"] = gbps
            out[f"{PREFIX}/{kind}_ms/layer_{layer}"] = seconds / num_ranks * 1e3
            rdma_gbps = None
            if network_bytes > 0:
                rdma_gbps = network_bytes / seconds / 1e9 if seconds > 0 else 0.0
                out[f"{PREFIX}/{kind}_rdma_GBps/layer_{layer}"] = rdma_gbps
            per_kind[kind].append((gbps, seconds / num_ranks, rdma_gbps))
        for kind, values in per_kind.items():
            out[f"{PREFIX}/{kind}_GBps"] = sum(v[0] for v in values) / len(values)
            out[f"{PREFIX}/{kind}_ms"] = sum(v[1] for v in values) * 1e3
            rdma = [v[2] for v in values if v[2] is not None]
            if rdma:
                out[f"{PREFIX}/{kind}_rdma_GBps"] = sum(rdma) / len(rdma)
        imbalances = []
        for layer in layers:
            counts = self._expert_counts[layer]
            if use_group:
                counts = counts.to(device)
                dist.all_reduce(counts, group=group)
            mean = counts.mean().item()
            imbalance = counts.max().item() / mean if mean > 0 else 0.0
            out[f"{PREFIX}/expert_imbalance/layer_{layer}"] = imbalance
            imbalances.append(imbalance)
        if imbalances:
            out[f"{PREFIX}/expert_imbalance"] = sum(imbalances) / len(imbalances)
        self.reset()
        return out


METRICS = CommMetrics()


def call_network_bytes(
    kind: str, is_token_in_rank: torch.Tensor, rank: int, num_ranks_per_node: int, row: RowFormat
) -> torch.Tensor:
    """Network bytes of one call of `kind` (0-dim tensor, no host sync) for `timer.network_bytes`:
    the (token, remote node) pairs of the layout times the bytes a dispatch row (dispatch kinds) or
    a combine partial sum (combine kinds) of format `row` carries."""
    pairs = remote_pairs_from_routing(is_token_in_rank, rank, num_ranks_per_node)
    return pairs * (row.dispatch_bytes() if kind in _DISPATCH_KINDS else row.combine_bytes())


def collect(group: dist.ProcessGroup | None = None) -> dict[str, float]:
    """:meth:`CommMetrics.collect` on the process-wide recorder."""
    return METRICS.collect(group)
