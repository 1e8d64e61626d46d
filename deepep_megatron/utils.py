"""`deep_ep.utils` for programs that import it: `EventHandle` and `EventOverlap`.

DeepEP's `EventHandle()` records a CUDA event on the current stream when it is made; wrapping it
in `EventOverlap` gives the `previous_event` a communication call waits for. Megatron-LM's `flex`
dispatcher does exactly that (`EventOverlap(EventHandle())`).
"""

from __future__ import annotations

import torch

from deepep_megatron.event import EventOverlap


class EventHandle:
    """A CUDA event recorded on the current stream at construction (no event on a machine
    without CUDA, where every call completes before it returns)."""

    def __init__(self) -> None:
        self.event: torch.cuda.Event | None = None
        if torch.cuda.is_available():
            self.event = torch.cuda.Event()
            self.event.record(torch.cuda.current_stream())

    def current_stream_wait(self) -> None:
        """Make the current stream wait for the recorded point."""
        if self.event is not None:
            torch.cuda.current_stream().wait_event(self.event)


__all__ = ["EventHandle", "EventOverlap"]
