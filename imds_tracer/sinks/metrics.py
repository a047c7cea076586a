"""Prometheus metrics (prometheus-client), served over HTTP, 127.0.0.1:9796 by default.

Names: one prefix `imds_tracer_`, `_total` on counters, base units, `_info` for metadata.
Known label sets are created at start-up so that series exist before the first event;
label values from the wire (methods, executables) are capped so cardinality stays bounded.

The endpoint is one thread with one selector (`MetricsServer`): any local user can connect,
so it holds at most MAX_CONNECTIONS connections (a new one closes the oldest), gives each
CONNECTION_SECONDS to send its request and read the answer, and reads at most MAX_REQUEST
bytes. Idle connections cost one fd each, never a thread, and cannot starve the agent.
"""
from __future__ import annotations

import errno
import os
import platform
import selectors
import socket
import threading
import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Info, \
    generate_latest
from prometheus_client.process_collector import ProcessCollector

from .. import __version__
from ..classify import PROVIDER_NAMES
from ..config import ConfigError
from ..model import DROP_KINDS, LOST_STAGES, RequestRecord

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


class MetricsError(ConfigError):
    """The metrics address cannot be served: a setting to change, said in one line."""


class MetricsServer:
    """HTTP/1.0-style GET /metrics on one thread: accept, read a head, answer, close."""
    MAX_CONNECTIONS = 64
    CONNECTION_SECONDS = 10.0   # Prometheus' default scrape timeout
    MAX_REQUEST = 8192
    BACKLOG = 128

    def __init__(self, host: str, port: int, registry: CollectorRegistry):
        self.registry = registry
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.bind((host, port))
            self.sock.listen(self.BACKLOG)
        except BaseException:
            self.sock.close()
            raise
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]
        self._selector = selectors.DefaultSelector()
        self._selector.register(self.sock, selectors.EVENT_READ, "accept")
        self._wake_r, self._wake_w = socket.socketpair()
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._conns: dict[socket.socket, list] = {}   # conn -> [deadline, bytes in, bytes out]
        self._stop = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="metrics", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while not self._stop:
            now = time.monotonic()
            wait = min((c[0] for c in self._conns.values()), default=now + 1.0) - now
            for key, events in self._selector.select(max(wait, 0.0)):
                if key.data == "accept":
                    self._accept()
                elif key.data == "wake":
                    return
                else:
                    self._service(key.fileobj, events)
            now = time.monotonic()
            for conn in [c for c, state in self._conns.items() if state[0] <= now]:
                self._close(conn)

    def _accept(self) -> None:
        for _ in range(self.BACKLOG):
            try:
                conn, _addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:   # EMFILE, ENOBUFS...: give the fds back, retry later
                if exc.errno in (errno.EMFILE, errno.ENFILE) and self._conns:
                    self._close(next(iter(self._conns)))
                    continue
                time.sleep(0.05)
                return
            if len(self._conns) >= self.MAX_CONNECTIONS:
                self._close(next(iter(self._conns)))   # the oldest goes
            conn.setblocking(False)
            self._conns[conn] = [time.monotonic() + self.CONNECTION_SECONDS, b"", b""]
            self._selector.register(conn, selectors.EVENT_READ, "conn")

    def _service(self, conn: socket.socket, events: int) -> None:
        state = self._conns.get(conn)
        if state is None:
            return
        try:
            if events & selectors.EVENT_READ and not state[2]:
                data = conn.recv(4096)
                state[1] += data
                if not data or len(state[1]) > self.MAX_REQUEST:
                    self._close(conn)
                    return
                if b"\r\n\r\n" not in state[1] and b"\n\n" not in state[1]:
                    return
                state[2] = self._answer(state[1])
                self._selector.modify(conn, selectors.EVENT_WRITE, "conn")
            if state[2]:
                state[2] = state[2][conn.send(state[2]):]
                if not state[2]:
                    self._close(conn)
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self._close(conn)

    def _answer(self, head: bytes) -> bytes:
        method, _, rest = head.partition(b" ")
        path = rest.split(b" ", 1)[0].split(b"?", 1)[0]
        if method not in (b"GET", b"HEAD"):
            return self._response(b"405 Method Not Allowed", b"text/plain", b"GET only\n")
        if path not in (b"/metrics", b"/"):
            return self._response(b"404 Not Found", b"text/plain", b"try /metrics\n")
        body = generate_latest(self.registry)
        return self._response(b"200 OK", CONTENT_TYPE_LATEST.encode(),
                              body if method == b"GET" else b"", len(body))

    @staticmethod
    def _response(status: bytes, ctype: bytes, body: bytes, length: int | None = None) -> bytes:
        return (b"HTTP/1.1 " + status + b"\r\nContent-Type: " + ctype +
                b"\r\nContent-Length: " + str(len(body) if length is None else length).encode()
                + b"\r\nConnection: close\r\n\r\n" + body)

    def _close(self, conn: socket.socket) -> None:
        self._conns.pop(conn, None)
        try:
            self._selector.unregister(conn)
        except (KeyError, ValueError):
            pass
        conn.close()

    def close(self) -> None:
        self._stop = True
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        if self._thread is not None:
            self._thread.join(5)
        for conn in list(self._conns):
            self._close(conn)
        self._selector.close()
        for sock in (self.sock, self._wake_r, self._wake_w):
            sock.close()


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
        # every drop kind is a series from the start, and the only ones (model.DROP_KINDS)
        self._drop_counters = {
            kind: self.lost.labels(LOST_STAGES[kind]) if kind in LOST_STAGES
            else self.dropped.labels(kind) for kind in DROP_KINDS}
        self._server = None

    def set_backend(self, backend: str) -> None:
        """The backend `auto` chose, once it is known."""
        self._info["backend"] = backend
        self.info.info(self._info)

    def serve(self, addr: str) -> None:
        self.bind(addr)
        self.start()

    def bind(self, addr: str) -> None:
        """Take the address (a taken port fails here, in one line); nothing is answered
        before `start`."""
        host, _, port = addr.rpartition(":")
        host = host.strip("[]")
        try:
            self._server = MetricsServer(host, int(port), self.registry)
        except (OSError, OverflowError) as exc:
            reason = getattr(exc, "strerror", None) or exc
            raise MetricsError(f"metrics address {addr}: {reason} "
                               "(change --metrics-addr or metrics.addr, \"\" turns it off)") \
                from None

    def start(self) -> None:
        """Answer on the bound address, from a thread of its own (none when not bound)."""
        if self._server is not None:
            self._server.start()

    @property
    def port(self) -> int | None:
        return self._server.port if self._server else None

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
        self._drop_counters[kind].inc(count)

    def drops(self, counts: dict[str, int], ts: float) -> None:
        pass  # counted as they happen, in count_drop

    def reopen(self) -> None:
        pass

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
