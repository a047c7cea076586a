"""The one pipeline: chunks -> flows -> parse -> classify -> enrich -> redact -> sinks.

Live capture and replay feed the same object, so a replay test exercises the agent's code.
Drops (kernel losses, truncated payloads, full tables, failed log writes) are counted here
and passed to every sink: metrics count them at once, the trace log summarises them.
"""
from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Hashable, Iterable, Protocol

from .classify import classify
from .config import Config
from .enrich import Enricher
from .flows import FlowTable
from .model import Chunk, Exchange, ProcessInfo, RequestRecord
from .redact import escape, redact_header, redact_raw, redact_text

log = logging.getLogger("imds_tracer")

DROP_REPORT_INTERVAL = 10.0  # seconds between drop summaries in the trace log


class Sink(Protocol):
    def emit(self, record: RequestRecord) -> None: ...
    def drops(self, counts: dict[str, int], ts: float) -> None: ...
    def reopen(self) -> None: ...
    def close(self) -> None: ...


def _safe_process(info: ProcessInfo | None) -> ProcessInfo | None:
    if info is None:
        return None
    argv = tuple(redact_text(a) for a in info.argv) if info.argv is not None else None
    return ProcessInfo(pid=info.pid, comm=escape(info.comm) if info.comm else info.comm,
                       argv=argv, exe=escape(info.exe) if info.exe else info.exe)


class Pipeline:
    def __init__(self, config: Config, sinks: Iterable[Sink], *, cloud: str | None = None,
                 enricher: Enricher | None = None):
        self.config = config
        self.sinks = list(sinks)
        self.cloud = cloud
        self.enricher = enricher
        self.flows = FlowTable(self._exchange, self.drop, response_wait=config.response_wait,
                               flow_idle=config.flow_idle, max_flows=config.max_flows)
        self.requests = 0
        self.drop_totals: Counter = Counter()
        self._unreported: Counter = Counter()
        self._last_drop_report = 0.0
        self._now: float | None = None  # the latest tick: capture time in replay, else wall
        self._safe: dict[ProcessInfo, ProcessInfo] = {}  # escaping, once per process seen

    # -- what sources call ------------------------------------------------------------
    def feed(self, chunk: Chunk) -> None:
        self.flows.feed(chunk)

    def close_flow(self, flow: Hashable, ts: float) -> None:
        self.flows.close(flow, ts)

    def tick(self, now: float) -> None:
        self._now = now
        self.flows.tick(now)
        if self._unreported and now - self._last_drop_report >= DROP_REPORT_INTERVAL:
            self._report_drops(now)

    def drop(self, kind: str, count: int = 1, detail: str = "") -> None:
        """Something was lost or cut: counted, told to the sinks, never silent."""
        if count <= 0:
            return
        self.drop_totals[kind] += count
        self._unreported[kind] += count
        for sink in self.sinks:
            counter = getattr(sink, "count_drop", None)
            if counter is not None:
                counter(kind, count)
        if detail:
            log.debug("dropped %d (%s): %s", count, kind, detail)

    def flush(self, now: float | None = None) -> None:
        self.flows.flush()
        if self._unreported:
            if now is None:
                now = self._now if self._now is not None else time.time()
            self._report_drops(now)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()

    def reopen(self) -> None:
        for sink in self.sinks:
            sink.reopen()

    # -- internals ---------------------------------------------------------------------
    def _safe_process(self, info: ProcessInfo | None) -> ProcessInfo | None:
        if info is None:
            return None
        safe = self._safe.get(info)
        if safe is None:
            if len(self._safe) >= 4096:
                self._safe.clear()
            safe = self._safe[info] = _safe_process(info)
        return safe

    def _report_drops(self, now: float) -> None:
        counts = dict(self._unreported)
        self._unreported.clear()
        self._last_drop_report = now
        for sink in self.sinks:
            sink.drops(counts, now)

    def _exchange(self, exchange: Exchange) -> None:
        record = self.record(exchange)
        self.requests += 1
        if record.truncated:
            self.drop("head_truncated", 1)  # a request head not wholly captured
        for sink in self.sinks:
            sink.emit(record)

    def record(self, exchange: Exchange) -> RequestRecord:
        """Classify, enrich and redact one exchange into what the sinks print."""
        verdict = classify(exchange, self.cloud)
        process, parents, container = (None, (), None)
        snap = exchange.process
        if self.enricher is not None and snap is not None:
            process, parents, container = self.enricher.describe(snap)
        elif snap is not None:
            process = ProcessInfo(snap.pid, snap.comm, snap.argv)
        head = exchange.head
        headers = {}
        if head is not None:
            for name, value in head.headers:
                key = escape(name)
                headers[key] = escape(redact_header(name, value)) if key not in headers \
                    else headers[key] + ", " + escape(redact_header(name, value))
        return RequestRecord(
            time=exchange.ts, level=verdict.level, provider=verdict.provider,
            mode=verdict.mode, problems=verdict.problems,
            method=escape(head.method) if head else None,
            path=escape(head.target) if head else None,
            version=escape(head.version) if head else None,
            headers=headers, dst_ip=exchange.dst_ip, dst_port=exchange.dst_port,
            status=exchange.status, source=exchange.source,
            process=self._safe_process(process),
            parents=tuple(self._safe_process(p) for p in parents),
            uid=snap.uid if snap else None, cgroup_id=snap.cgroup_id if snap else None,
            container=container, note=verdict.note, truncated=exchange.truncated,
            raw_excerpt=redact_raw(exchange.raw) if head is None else None)
