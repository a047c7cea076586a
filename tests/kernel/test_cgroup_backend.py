"""What the cgroup backend does that the syscall-tracepoint backend cannot, and how it cleans
up: requests sent with sendfile() or by a child on an inherited socket are logged; a killed
agent leaves no hook attached; unwatched traffic is never copied; a request longer than
capture.max_payload is logged as truncated and the cut is counted.

The shared behaviour (every client, both modes, IPv6, containers, metrics) runs on this
backend in test_e2e.py.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import uuid

import pytest

from imds_tracer.sources.cgroup import cgroup2_root
from tests.kernel.conftest import run_client
from tests.lab.agent import AgentProcess
from tests.lab.clients import READ_RESPONSE

AWS_IP = "169.254.169.254"
PYTHON = sys.executable


@pytest.fixture(scope="module")
def lab(module_lab):
    return module_lab


@pytest.fixture(scope="module")
def agent(lab, tmp_path_factory):
    the_agent = AgentProcess(tmp_path_factory.mktemp("agent"), backend="cgroup",
                             config="[capture]\nmax_payload = 512\n").start()
    try:
        yield the_agent
    finally:
        assert the_agent.stop() == 0, the_agent.stderr()[-2000:]


def run(lab, code: str, *args) -> subprocess.Popen:
    """A Python client (with read_response) in the lab, run to the end."""
    return run_client(lab, [PYTHON, "-c", READ_RESPONSE + code, *args])


SENDFILE = r"""
import os, socket, sys, tempfile
ip, path = sys.argv[1], sys.argv[2]
with tempfile.TemporaryFile() as f:
    f.write(f"GET {path} HTTP/1.1\r\nHost: {ip}\r\nConnection: close\r\n\r\n".encode())
    f.flush()
    s = socket.create_connection((ip, 80))
    os.sendfile(s.fileno(), f.fileno(), 0, f.tell())
    read_response(s.makefile("rb"))
"""

INHERITED = r"""
import os, socket, sys
ip, path = sys.argv[1], sys.argv[2]
s = socket.create_connection((ip, 80))
child = os.fork()
if child == 0:
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: {ip}\r\nConnection: close\r\n\r\n".encode())
    read_response(s.makefile("rb"))
    os._exit(0)
s.close()
_, status = os.waitpid(child, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def test_sendfile_request_is_logged(agent, lab):
    path = "/latest/meta-data/instance-id"
    proc = run(lab, SENDFILE, AWS_IP, path)
    rec, = agent.records_of(proc.pid, 1)
    assert (rec["path"], rec["mode"], rec["level"], rec["status"]) == (
        path, "normal", "WARNING", 200)


def test_request_sent_by_a_child_on_an_inherited_socket_is_logged(agent, lab):
    # the socket is the connecting process's: that is the process the line names
    path = "/latest/meta-data/hostname"
    proc = run(lab, INHERITED, AWS_IP, path)
    rec, = agent.records_of(proc.pid, 1)
    assert (rec["path"], rec["status"]) == (path, 200)
    assert rec["argv"][:2] == [PYTHON, "-c"]


def test_unwatched_destination_is_not_logged(agent, lab):
    # same namespace, port 80, but an address nobody configured
    marker = uuid.uuid4().hex
    srv = lab.popen([PYTHON, "-m", "http.server", "--bind", "127.0.0.1", "80"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(50):
            if lab.run(["curl", "-s", "-o", "/dev/null", f"http://127.0.0.1/{marker}"]
                       ).returncode == 0:
                break
            time.sleep(0.1)
        else:
            pytest.fail("the unwatched server did not come up")
        # a watched request after it: once that is logged, the unwatched one would have been
        control = run(lab, SENDFILE, AWS_IP, f"/latest/{marker}")
        agent.records_of(control.pid, 1)
        assert agent.count(marker) == 1
        assert [r["dst_ip"] for r in agent.records(marker)] == [AWS_IP]
    finally:
        srv.terminate()
        srv.wait(5)


LONG_HEAD = r"""
import socket, sys
ip = sys.argv[1]
s = socket.create_connection((ip, 80))
s.sendall(("GET /latest/meta-data/ami-id HTTP/1.1\r\nHost: x\r\nX-Padding: " + "p" * 2000
           + "\r\nConnection: close\r\n\r\n").encode())
read_response(s.makefile("rb"))
"""


def test_request_longer_than_max_payload_is_logged_truncated_and_counted(agent, lab):
    before = agent.metric("imds_tracer_dropped_total", 'kind="payload_truncated"')
    proc = run(lab, LONG_HEAD, AWS_IP)
    rec, = agent.records_of(proc.pid, 1)
    assert (rec["method"], rec["path"], rec["mode"]) == ("GET", "/latest/meta-data/ami-id", "normal")
    assert rec["truncated"] is True
    deadline = time.monotonic() + 5
    while agent.metric("imds_tracer_dropped_total", 'kind="payload_truncated"') <= before:
        assert time.monotonic() < deadline, "payload_truncated not counted"
        time.sleep(0.2)


def _our_hooks() -> dict[int, str]:
    """id -> name of the imds_* programs attached to the cgroup v2 root."""
    out = subprocess.run(["bpftool", "-j", "cgroup", "show", cgroup2_root()],
                         capture_output=True, text=True, check=True).stdout
    return {p["id"]: p["name"] for p in json.loads(out or "[]")
            if p.get("name", "").startswith("imds_")}


def test_killed_agent_leaves_no_hook_attached(tmp_path):
    before = _our_hooks()
    agent = AgentProcess(tmp_path, backend="cgroup").start()
    try:
        mine = {i: n for i, n in _our_hooks().items() if i not in before}
        assert sorted(mine.values()) == ["imds_connect4", "imds_connect6", "imds_egress",
                                         "imds_ingress"]
        agent.send_signal(signal.SIGKILL)
    finally:
        agent.kill()
    deadline = time.monotonic() + 5
    while set(mine) & set(_our_hooks()):
        assert time.monotonic() < deadline, f"still attached: {set(mine) & set(_our_hooks())}"
        time.sleep(0.1)
