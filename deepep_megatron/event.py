"""`EventOverlap`: the handle a communication call returns so compute can overlap with it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


class EventOverlap:
    """A CUDA event recorded on the communication stream, plus tensors that must stay alive
    until the event has completed.

    On the CPU (portable backend over gloo) every call completes before it returns, so the event
    is `None` and waiting is a no-op; the object behaves the same otherwise.

    Use either `event.current_stream_wait()` or, to run code on the current stream while the
    communication is in flight::

        with event:
            other_compute()   # overlaps; the current stream waits for the event at exit
    """

    def __init__(self, event: torch.cuda.Event | None = None, extra_tensors: Sequence[Any] | None = None):
        # DeepEP programs pass a `utils.EventHandle`; keep the CUDA event it holds.
        self.event = getattr(event, "event", event)
        self.extra_tensors = tuple(extra_tensors) if extra_tensors is not None else None

    def current_stream_wait(self) -> None:
        """Make the current CUDA stream wait for the communication to finish."""
        if self.event is not None:
            torch.cuda.current_stream().wait_event(self.event)

    def __enter__(self) -> EventOverlap:
        return self

    def __exit__(self, exc_type, exc_value, traceback) -> None:
        self.current_stream_wait()

    def __repr__(self) -> str:
        state = "cpu (complete)" if self.event is None else ("done" if self.event.query() else "pending")
        return f"EventOverlap({state})"
