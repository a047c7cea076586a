"""The one pipeline: chunks -> flows -> parse -> classify -> enrich -> redact -> sinks.

Live capture and replay feed the same object, so a replay test exercises the agent's code.
Drops (kernel losses, truncated payloads, full tables, failed log writes) are counted here
and passed to every sink: metrics count them at once, the trace log summarises them.
Log files hold their lines until the end of each poll (`tick`), `flush`, `reopen` or `close`:
one write() per batch instead of one per request.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter
from typing import Iterable, Protocol

from . import clients
from .classify import classify, reads_of
from .config import Config
from .enrich import RECENT_TTL, Enricher
from .fallback import FallbackTracker
from .flows import Finished, FlowTable
from .model import DROP_KINDS, Chunk, ClientGaveUp, Exchange, FlowClosed, ProcessInfo, ProcessSnapshot, RequestHead, RequestRecord
from .redact import escape_fields, redact_argv, redact_header, redact_raw, redact_url

log = logging.getLogger("imds_tracer")

DROP_REPORT_INTERVAL = 10.0  # seconds between drop summaries in the trace log
STORY_CACHE = 4096           # senders whose escaped process story is remembered


class Sink(Protocol):
    """Optional too: `flush()` writes what the sink holds; `count_drop(kind, n)`."""
    def emit(self, record: RequestRecord) -> None: ...
    def drops(self, counts: dict[str, int], ts: float) -> None: ...
    def reopen(self) -> None: ...  # writes what it holds first
    def close(self) -> None: ...   # writes what it holds first


def _redacted_process(info: ProcessInfo | None) -> ProcessInfo | None:
    if info is None or not info.argv:
        return info
    return dataclasses.replace(info, argv=redact_argv(info.argv))


def _request_fields(head: RequestHead) -> tuple[str, str, str, dict[str, str]]:
    """Method, target, version and headers (name -> value, a repeated name's values joined),
    by the redaction rule (redact.py); escaped later with the rest of the record."""
    headers: dict[str, str] = {}
    for name, value in head.headers:
        value = redact_header(name, value)
        headers[name] = value if name not in headers else headers[name] + ", " + value
    return head.method, redact_url(head.target), head.version, headers


class Pipeline:
    def __init__(self, config: Config, sinks: Iterable[Sink], *, cloud: str | None = None,
                 enricher: Enricher | None = None):
        self.config = config
        self.sinks = list(sinks)
        self.cloud = cloud
        self.enricher = enricher
        self.flows = FlowTable(response_wait=config.response_wait, flow_idle=config.flow_idle,
                               max_flows=config.max_flows)
        self.requests = 0
        self.drop_totals: Counter = Counter()
        self._unreported: Counter = Counter()
        self._last_drop_report = 0.0
        self._now: float | None = None  # the latest tick: capture time in replay, else wall
        self._stories: dict[tuple, tuple] = {}  # sender -> (expires, escaped story)
        self._safe: dict[ProcessInfo, ProcessInfo] = {}  # escaping, once per process seen
        self.fallbacks = FallbackTracker()

    # -- what sources read ------------------------------------------------------------
    def take(self, items: Iterable) -> None:
        """What a source read, in order (see sources/base.py): the one way in."""
        flows = self.flows
        for item in items:
            kind = type(item)
            if kind is Chunk:
                done = flows.feed(item)
            elif kind is FlowClosed:
                done = flows.close(item.flow, item.ts)
            elif kind is ClientGaveUp:
                done = flows.client_gave_up(item.flow, item.ts)
            else:
                self.drop(item.kind, item.count, item.detail)
                continue
            if done:
                self._finished(done)

    def tick(self, now: float) -> None:
        """After each poll of a source (and once a second of capture time in replay)."""
        self._now = now
        self._finished(self.flows.tick(now))
        if self._unreported and now - self._last_drop_report >= DROP_REPORT_INTERVAL:
            self._report_drops(now)
        self._write_out()

    def drop(self, kind: str, count: int = 1, detail: str = "") -> None:
        """Something was lost or cut: counted, told to the sinks, never silent."""
        if kind not in DROP_KINDS:
            raise ValueError(f"unknown drop kind {kind!r} (add it to model.DROP_KINDS)")
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
        self._finished(self.flows.flush())
        self._write_out()  # a log write failing now is in the summary below
        if self._unreported:
            if now is None:
                now = self._now if self._now is not None else time.time()
            self._report_drops(now)
            self._write_out()

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()

    def reopen(self) -> None:
        for sink in self.sinks:
            sink.reopen()

    # -- internals ---------------------------------------------------------------------
    def _write_out(self) -> None:
        for sink in self.sinks:
            flush = getattr(sink, "flush", None)
            if flush is not None:
                flush()

    def _story(self, snap: ProcessSnapshot) -> tuple:
        """(process, parents nearest first, container) of a sender, enriched and redacted.
        Remembered for RECENT_TTL, the enricher's own horizon: a client making many requests
        is described and redacted once a second, not once a request (escaped with its record)."""
        key = (snap.pid, snap.comm, snap.ppid, snap.argv, snap.cgroup_id)
        now = time.monotonic()
        hit = self._stories.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]
        owner = None
        if self.enricher is not None:
            process, parents, container = self.enricher.describe(snap)
            owner = self.enricher.owner(snap, process, container)
        else:
            process, parents, container = ProcessInfo(
                snap.pid, snap.comm, snap.argv, argv_truncated=snap.argv_truncated), (), None
        story = (self._safe_process(process), tuple(map(self._safe_process, parents)),
                 container, owner)
        if len(self._stories) >= STORY_CACHE:
            self._stories.clear()
        self._stories[key] = (now + RECENT_TTL, story)
        return story

    def _safe_process(self, info: ProcessInfo | None) -> ProcessInfo | None:
        """The redacted twin of a process: once per process seen."""
        if info is None:
            return None
        safe = self._safe.get(info)
        if safe is None:
            if len(self._safe) >= STORY_CACHE:
                self._safe.clear()
            safe = self._safe[info] = _redacted_process(info)
        return safe

    def _report_drops(self, now: float) -> None:
        counts = dict(self._unreported)
        self._unreported.clear()
        self._last_drop_report = now
        for sink in self.sinks:
            sink.drops(counts, now)

    def _finished(self, done: Finished) -> None:
        """What reassembly completed: exchanges to log, drops to count."""
        for item in done:
            if type(item) is Exchange:
                self._exchange(item)
            else:
                self.drop(item.kind, item.count)

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
        snap = exchange.process
        process, parents, container, owner = (None, (), None, None) if snap is None \
            else self._story(snap)
        head = exchange.head
        method, path, version, headers = (None, None, None, {}) if head is None \
            else _request_fields(head)
        user_agent = head.header("user-agent") if head is not None else None
        if user_agent is not None:
            user_agent = user_agent[:clients.UA_MAX]
        reads = reads_of(verdict.provider, head.method, head.path) if head else None
        sender = container.id if container else snap.pid if snap else None
        fallback = self.fallbacks.observe(sender, user_agent, exchange.ts, verdict.mode, reads,
                                          exchange.status, verdict.problems)
        client = clients.finding(user_agent, process.exe if process else None,
                                 process.argv if process else None, verdict.provider,
                                 verdict.mode, fallback,
                                 clients.fingerprint(head.first) if head and user_agent is None
                                 else frozenset())
        return escape_fields(RequestRecord(
            time=exchange.ts, level=verdict.level, provider=verdict.provider,
            mode=verdict.mode, problems=verdict.problems, method=method, path=path,
            version=version, headers=headers, dst_ip=exchange.dst_ip,
            dst_port=exchange.dst_port, status=exchange.status, source=exchange.source,
            process=process, parents=parents,
            uid=snap.uid if snap else None, cgroup_id=snap.cgroup_id if snap else None,
            container=container, note=verdict.note, truncated=exchange.truncated,
            raw_excerpt=redact_raw(exchange.raw) if head is None else None,
            user_agent=user_agent, client=client, reads=reads, fallback=fallback,
            owner=owner))
