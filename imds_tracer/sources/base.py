"""The contract every source keeps with the pipeline: a poll returns what was read."""
from __future__ import annotations

from typing import List, Protocol, Union

from ..model import Chunk, ClientGaveUp, Dropped, FlowClosed

SourceItem = Union[Chunk, FlowClosed, ClientGaveUp, Dropped]


class SourceError(Exception):
    """A source cannot run. The message is one line for the user, naming the fix."""


class Batch(List[SourceItem]):
    """What a source read in one poll, in order. It has the verbs the packet demultiplexer
    (sources/packets.py) writes to, so the demultiplexer fills a Batch or a Pipeline alike."""

    def feed(self, chunk: Chunk) -> None:
        self.append(chunk)

    def close_flow(self, flow, ts: float) -> None:
        self.append(FlowClosed(flow, ts))

    def client_gave_up(self, flow, ts: float) -> None:
        self.append(ClientGaveUp(flow, ts))

    def drop(self, kind: str, count: int = 1, detail: str = "") -> None:
        if count > 0:
            self.append(Dropped(kind, int(count), detail))


class Source(Protocol):
    name: str  # "cgroup" | "kprobe" | "tracepoint"

    def start(self) -> int:
        """Attach / open. Returns the number of probes attached; raises SourceError."""

    def poll(self, timeout_ms: int) -> List[SourceItem]:
        """What arrived, in order; waits at most timeout_ms for the first of it."""

    def watermark(self) -> float:
        """Wall time up to which every event has been returned by poll (what the pipeline's
        time-outs are judged by)."""

    def stop(self) -> None:
        """Detach and free; safe to call twice."""
