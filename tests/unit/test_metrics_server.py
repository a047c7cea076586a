"""The metrics endpoint's bounds, over real loopback HTTP: a connection limit (the oldest
goes), a deadline per connection, a bounded request, one thread whatever the load."""
from __future__ import annotations

import socket
import threading
import time
import urllib.error
import urllib.request

import pytest

from imds_tracer.sinks.metrics import MetricsServer, MetricsSink


@pytest.fixture
def sink(monkeypatch):
    monkeypatch.setattr(MetricsServer, "CONNECTION_SECONDS", 1.0)
    monkeypatch.setattr(MetricsServer, "MAX_CONNECTIONS", 8)
    the_sink = MetricsSink(backend="replay", cloud=None)
    the_sink.serve("127.0.0.1:0")
    yield the_sink
    the_sink.close()


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=3) as resp:
        assert resp.status == 200
        return resp.read().decode()


def _closed_by_server(sock: socket.socket, within: float) -> bool:
    sock.settimeout(within)
    try:
        return sock.recv(1) == b""
    except socket.timeout:
        return False
    except ConnectionResetError:
        return True


def test_idle_connections_are_closed_at_the_deadline_and_cost_no_thread(sink):
    threads = threading.active_count()
    idle = [socket.create_connection(("127.0.0.1", sink.port)) for _ in range(5)]
    assert "imds_tracer_requests_total" in _scrape(sink.port)
    assert threading.active_count() == threads
    started = time.monotonic()
    assert all(_closed_by_server(s, 3) for s in idle)
    assert time.monotonic() - started < 2.5
    for s in idle:
        s.close()


def test_beyond_the_limit_the_oldest_connection_goes(sink):
    idle = [socket.create_connection(("127.0.0.1", sink.port)) for _ in range(20)]
    assert "imds_tracer_requests_total" in _scrape(sink.port)
    assert _closed_by_server(idle[0], 0.5)
    for s in idle:
        s.close()


def test_a_request_too_large_or_not_get_is_refused(sink):
    with socket.create_connection(("127.0.0.1", sink.port)) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 10000)
        assert _closed_by_server(s, 2)
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(urllib.request.Request(
            f"http://127.0.0.1:{sink.port}/metrics", data=b"x", method="POST"), timeout=3)
    assert err.value.code == 405
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"http://127.0.0.1:{sink.port}/nope", timeout=3)
    assert err.value.code == 404
