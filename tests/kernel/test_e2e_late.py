"""End to end: the agent started after the client's connection was opened (its later
requests on that connection are still logged), for each backend of IMDS_TRACER_E2E_LATE
(default: those of test_e2e). A module of its own so that test_e2e's agents are stopped
before these start (under qemu an agent left running slows the next BCC compile a lot).
"""
from __future__ import annotations

import os
import subprocess

import pytest

from tests.kernel.test_e2e import AWS_IP, AWS_IP6, BACKENDS, PYTHON
from tests.lab.agent import AgentProcess
from tests.lab.clients import KEEPALIVE_CLIENT

LATE_BACKENDS = os.environ.get("IMDS_TRACER_E2E_LATE", ",".join(BACKENDS)).split(",")


@pytest.fixture
def lab(module_lab):
    return module_lab


@pytest.mark.parametrize("backend_name", LATE_BACKENDS)
def test_agent_started_after_the_connection_opened(lab, tmp_path, backend_name):
    """Connections (IPv4 and IPv6) opened before the agent started: their later requests are
    logged. One agent for both: under qemu every agent start is a slow BCC compile."""
    clients = {}
    try:
        for ip in (AWS_IP, AWS_IP6):
            clients[ip] = lab.popen([PYTHON, "-c", KEEPALIVE_CLIENT, ip], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, text=True)
            assert clients[ip].stdout.readline().strip() == "first"
        late = AgentProcess(tmp_path, backend=backend_name).start()
        try:
            recs = {}
            for ip, client in clients.items():
                client.stdin.write("go\n")
                client.stdin.flush()
                assert client.stdout.readline().strip() == "done"
                recs[ip] = late.records_of(client.pid, 2)
            logged = [(r.get("pid"), r.get("comm"), r.get("dst_ip"), r.get("path"))
                      for r in late.records()]
        finally:
            assert late.stop() == 0
    finally:
        for client in clients.values():
            client.kill()
            client.wait(5)
    client_pids = {ip: c.pid for ip, c in clients.items()}
    for ip in (AWS_IP, AWS_IP6):
        assert [r["path"] for r in recs[ip]] == [
            "/latest/meta-data/ami-id", "/latest/meta-data/hostname"], \
            (ip, client_pids, "all records (pid, comm, dst, path):", logged)
        assert all(r["dst_ip"] == ip and r["status"] == 200 for r in recs[ip]), \
            (ip, [(r["dst_ip"], r["status"], r.get("truncated"), r.get("pid")) for r in recs[ip]])
