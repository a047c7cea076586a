"""The cgroup backend on a host with cgroup v1 only (the EL8 / Alibaba Cloud Linux 3
default: no cgroup2 mounted), and with the net_cls / net_prio v1 controllers tagging the
client's socket (they once disabled cgroup2 socket matching for the sockets they tag).

The v1-only host is made in a private mount namespace of the agent: the host's cgroup mounts
are detached there and v1 hierarchies mounted in their place; the rest of the machine keeps
its own. The agent must mount a private cgroup2 hierarchy, say so in one line, log the
requests, and leave nothing mounted behind.
"""
from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

import pytest

from imds_tracer.sources.cgroup import PRIVATE_CGROUP2
from tests.kernel.conftest import run_client
from tests.lab.agent import AgentProcess, free_port
from tests.lab.clients import READ_RESPONSE
from tests.lab.netns import V1_ONLY_CGROUPS

AWS_IP = "169.254.169.254"
PYTHON = sys.executable

V1_ONLY = V1_ONLY_CGROUPS + 'exec "$@"\n'

# the client in a net_cls + net_prio v1 cgroup with a class id and a priority map set (what
# turns socket tagging on); the cgroup is removed after the client ran
NET_CLS_CLIENT = r"""
set -e
mount --make-rprivate /
d=$(mktemp -d)
mount -t cgroup -o net_cls,net_prio cgroup "$d" 2>/dev/null || mount -t cgroup -o net_cls cgroup "$d"
g="$d/imds-test-$$"
mkdir "$g"
echo 0x100001 > "$g/net_cls.classid"
if [ -e "$g/net_prio.ifpriomap" ]; then echo "lo 5" > "$g/net_prio.ifpriomap"; fi
echo $$ > "$g/cgroup.procs"
status=0
"$@" || status=$?
echo $$ > "$d/cgroup.procs"
rmdir "$g"
umount "$d"
rmdir "$d"
exit $status
"""

CLIENT = READ_RESPONSE + r"""
import socket, sys
ip, path = sys.argv[1], sys.argv[2]
s = socket.create_connection((ip, 80))
s.sendall(f"GET {path} HTTP/1.1\r\nHost: {ip}\r\nConnection: close\r\n\r\n".encode())
read_response(s.makefile("rb"))
"""


@pytest.fixture(scope="module")
def lab(module_lab):
    return module_lab


@pytest.fixture(scope="module")
def v1_agent(lab, tmp_path_factory):
    if os.path.ismount(PRIVATE_CGROUP2):
        pytest.skip(f"{PRIVATE_CGROUP2} is mounted already (another agent on a v1 host?)")
    tmp = tmp_path_factory.mktemp("v1agent")
    port = free_port()
    argv = AgentProcess(tmp, backend="auto", metrics_port=port).argv
    agent = AgentProcess(tmp, metrics_port=port,
                         argv=["unshare", "-m", "sh", "-c", V1_ONLY, "sh", *argv]).start()
    try:
        yield agent
    finally:
        assert agent.stop() == 0, agent.stderr()[-2000:]
        assert not os.path.exists(PRIVATE_CGROUP2), "the private cgroup2 mount point was left"


def test_v1_only_host_gets_the_cgroup_backend_on_a_private_cgroup2_mount(v1_agent, lab):
    assert v1_agent.ready_line.startswith("ready backend=cgroup "), v1_agent.stderr()
    said = [line for line in v1_agent.stderr().splitlines() if str(PRIVATE_CGROUP2) in line]
    assert len(said) == 1 and "cgroup v1 host" in said[0], v1_agent.stderr()
    # the loader unmounted it again once the hooks were attached (they hold the hierarchy's
    # root cgroup, not the mount): the agent needs no CAP_SYS_ADMIN at stop, and the hooks
    # still see the requests below
    mounts = Path(f"/proc/{v1_agent.proc.pid}/mountinfo").read_text()
    assert " cgroup2 " not in mounts and str(PRIVATE_CGROUP2) not in mounts
    path = "/latest/meta-data/instance-id"
    proc = run_client(lab, [PYTHON, "-c", CLIENT, AWS_IP, path])
    rec, = v1_agent.records_of(proc.pid, 1)
    assert (rec["path"], rec["mode"], rec["status"]) == (path, "normal", 200)


def test_request_from_a_net_cls_net_prio_tagged_socket_is_logged(v1_agent, lab):
    path = f"/latest/meta-data/{uuid.uuid4().hex}"
    run_client(lab, ["unshare", "-m", "sh", "-c", NET_CLS_CLIENT, "sh",
                     PYTHON, "-c", CLIENT, AWS_IP, path])
    rec, = v1_agent.wait_records(path, 1)
    # the fake server's answer to a path it does not serve: the response was seen too
    assert (rec["path"], rec["mode"], rec["status"]) == (path, "normal", 404)
    assert rec["argv"][:2] == [PYTHON, "-c"] and rec["pid"] > 0
