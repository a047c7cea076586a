"""Prometheus metrics (prometheus-client), served over HTTP, 127.0.0.1:9796 by default.

Names: one prefix `imds_tracer_`, `_total` on counters, base units, `_info` for metadata.
Known label sets are created at start-up so that series exist before the first event;
label values from the wire (methods, executables) are capped so cardinality stays bounded.
"""
from __future__ import annotations

import os
import platform

import socket
import threading
from http.server import ThreadingHTTPServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Info
from prometheus_client.exposition import MetricsHandler
from prometheus_client.process_collector import ProcessCollector

from .. import __version__
from ..classify import PROVIDER_NAMES
from ..model import RequestRecord

PROVIDERS = PROVIDER_NAMES  # one label set per provider of the table in classify.py
MODES = ("normal", "hardened", "n/a", "unknown")
METHODS = ("GET", "PUT", "POST", "HEAD", "DELETE", "OPTIONS", "PATCH")
PROBLEMS = ("ttl_out_of_range", "ttl_missing", "x_forwarded_for", "empty_token",
            "invalid_token", "missing_metadata_header", "missing_api_version",
            "missing_metadata_flavor", "missing_bearer", "unparsed")
OTHER = "other"


def _outcome(status: int | None) -> str:
    if status is None:
        return "unanswered"
    if status in (401, 403):
        return "refused"
    return "succeeded" if 200 <= status < 400 else "failed"


class MetricsError(Exception):
    pass


class MetricsSink:
    def __init__(self, *, backend: str, cloud: str | None, max_exe_labels: int = 100,
                 registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        ProcessCollector(registry=self.registry)
        r = self.registry
        self.requests = Counter("imds_tracer_requests", "Requests to a metadata service",
                                ["provider", "mode", "method"], registry=r)
        self.normal = Counter("imds_tracer_normal_mode_requests",
                              "Normal-mode (token-less) requests by executable",
                              ["executable", "provider"], registry=r)
        self.outcomes = Counter("imds_tracer_normal_mode_outcomes",
                                "Normal-mode requests by how the service answered: succeeded "
                                "(2xx/3xx: breaks when hardened-only is enforced), refused "
                                "(401/403), failed (other status), unanswered",
                                ["outcome"], registry=r)
        self.problems = Counter("imds_tracer_problems", "Requests with a problem, by kind",
                                ["problem"], registry=r)
        self.lost = Counter("imds_tracer_lost_events", "Events lost before user space read them",
                            ["stage"], registry=r)
        self.dropped = Counter("imds_tracer_dropped", "Things dropped or cut, by kind",
                               ["kind"], registry=r)
        self.unparsed = Counter("imds_tracer_unparsed_requests",
                                "Requests whose HTTP head could not be read", registry=r)
        self.last_normal = Gauge("imds_tracer_last_normal_mode_request_timestamp_seconds",
                                 "When the last normal-mode request was seen (0: never)",
                                 registry=r)
        self.info = Info("imds_tracer", "The agent", registry=r)
        self._info = {"version": __version__, "backend": backend,
                      "kernel": platform.release(), "cloud": cloud or "unknown"}
        self.info.info(self._info)
        self.max_exe_labels = max_exe_labels
        self._exes: set[str] = set()
        self._children: dict = {}
        for provider in PROVIDERS:
            for mode in MODES:
                self.requests.labels(provider, mode, "GET")
        for problem in PROBLEMS:
            self.problems.labels(problem)
        for outcome in ("succeeded", "refused", "failed", "unanswered"):
            self.outcomes.labels(outcome)
        for stage in ("kernel", "user"):
            self.lost.labels(stage)
        for kind in ("payload_truncated", "head_truncated", "log_write", "flow_table_full"):
            self.dropped.labels(kind)
        self._server = None

    def set_backend(self, backend: str) -> None:
        """The backend `auto` chose, once it is known."""
        self._info["backend"] = backend
        self.info.info(self._info)

    def serve(self, addr: str) -> None:
        host, _, port = addr.rpartition(":")
        host = host.strip("[]")
        # our own server (not start_http_server): its port and shutdown are ours on every
        # prometheus-client version, Debian 12's 0.16 included
        server_class = type("MetricsServer", (ThreadingHTTPServer,), {
            "daemon_threads": True,
            "address_family": socket.AF_INET6 if ":" in host else socket.AF_INET})
        try:
            self._server = server_class((host, int(port)), MetricsHandler.factory(self.registry))
        except (OSError, OverflowError) as exc:
            reason = getattr(exc, "strerror", None) or exc
            raise MetricsError(f"metrics address {addr}: {reason} "
                               "(change --metrics-addr or metrics.addr, \"\" turns it off)") \
                from None
        threading.Thread(target=self._server.serve_forever, name="metrics",
                         daemon=True).start()

    @property
    def port(self) -> int | None:
        return self._server.server_port if self._server else None

    def _executable(self, record: RequestRecord) -> str:
        p = record.process
        exe = (p.exe if p and p.exe else None) or (p.argv[0] if p and p.argv else None) \
            or (p.comm if p else None) or "unknown"
        exe = os.path.basename(exe) if "/" in exe and not exe.endswith("/") else exe
        if exe in self._exes:
            return exe
        if len(self._exes) >= self.max_exe_labels:
            return OTHER
        self._exes.add(exe)
        return exe

    def emit(self, record: RequestRecord) -> None:
        provider = record.provider if record.provider in PROVIDERS else "unknown"
        method = record.method if record.method in METHODS else \
            (OTHER if record.method else "none")
        self._child(self.requests, provider, record.mode, method).inc()
        for problem in record.problems:
            self._child(self.problems, problem if problem in PROBLEMS else OTHER).inc()
        if record.method is None:
            self.unparsed.inc()
        if record.mode == "normal" and record.level == "WARNING":
            self._child(self.normal, self._executable(record), provider).inc()
            self._child(self.outcomes, _outcome(record.status)).inc()
            self.last_normal.set(record.time)

    def _child(self, metric, *labels):
        """metric.labels(*labels), remembered: labels() validates and locks on every call,
        which cost more than the rest of emit(). The label sets are bounded (capped above)."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def count_drop(self, kind: str, count: int) -> None:
        if kind == "kernel_lost":
            self.lost.labels("kernel").inc(count)
        elif kind == "user_lost":
            self.lost.labels("user").inc(count)
        else:
            self.dropped.labels(kind).inc(count)

    def drops(self, counts: dict[str, int], ts: float) -> None:
        pass  # counted as they happen, in count_drop

    def reopen(self) -> None:
        pass

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
