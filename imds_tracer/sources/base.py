"""The contract every source keeps with the pipeline."""
from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from ..pipeline import Pipeline


class SourceError(Exception):
    """A source cannot run. The message is one line for the user, naming the fix."""


class Source(Protocol):
    name: str  # "kprobe" | "tracepoint" | "replay"

    def start(self) -> int:
        """Attach / open. Returns the number of probes attached; raises SourceError."""

    def poll(self, pipeline: "Pipeline", timeout_ms: int) -> None:
        """Deliver what arrived to pipeline.feed / close_flow / drop; wait at most timeout_ms."""

    def stop(self) -> None:
        """Detach and free; safe to call twice."""
