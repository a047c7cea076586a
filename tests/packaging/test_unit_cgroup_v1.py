"""systemd/imds-tracer.service on a cgroup v1 host (the EL8 / Alibaba Cloud Linux 3 default: no
cgroup v2 mounted). The sandboxed agent holds no CAP_SYS_ADMIN and may not call mount(), so
the unit's ExecStartPre (run as full root, outside the sandbox) mounts the cgroup v2 hierarchy
for the cgroup backend's hooks and its ExecStopPost unmounts it.

The v1 host is a private mount namespace (held open by a `sleep`): the host's cgroup mounts are
detached there, v1 hierarchies mounted in their place, and /run is a fresh tmpfs, so nothing
the steps mount or create reaches the rest of the machine. The unit's own ExecStartPre and
ExecStopPost lines run in it as written (with the source tree's agent in place of
/usr/bin/imds-tracer), and the agent under the unit's sandbox emulation (sandbox.py).
"""
from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.lab.agent import AgentProcess
from tests.lab.netns import V1_ONLY_CGROUPS
from tests.packaging import sandbox
from tests.packaging.agent import OS_PYTHON, agent_command
from tests.packaging.test_unit import UNIT, _bcc_usable, _require_kernel

ROOT = Path(__file__).resolve().parents[2]
V1_HOST = V1_ONLY_CGROUPS + """mount -t tmpfs run /run
echo ready
exec sleep 3600
"""
PATH_SEEN = "/latest/meta-data/iam/security-credentials/"


def unit_step(key: str) -> list[str]:
    """The unit's `key` command line (ExecStartPre=, ...), prefixes checked and dropped, the
    packaged executable replaced by the source tree's agent."""
    value, = sandbox.unit_settings(str(UNIT))[f"Service.{key}"]
    prefixes = value[:len(value) - len(value.lstrip("-+@:!"))]
    # "+": outside the sandbox (full root); "-": a failure does not stop the unit
    assert set(prefixes) == {"+", "-"}, value
    argv = value[len(prefixes):].split()
    assert argv[0] == "/usr/bin/imds-tracer", value
    return [OS_PYTHON, "-m", "imds_tracer", *argv[1:]]


class V1Host:
    """The private mount namespace; `run`/`popen` enter it with nsenter."""

    def __init__(self):
        self.holder = subprocess.Popen(["unshare", "-m", "sh", "-c", V1_HOST],
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       text=True)
        line = self.holder.stdout.readline().strip()
        if line != "ready":
            self.close()
            raise AssertionError(f"v1 host not made: {self.holder.stderr.read()}")
        self.env = dict(os.environ, PYTHONPATH=str(ROOT))

    def enter(self, argv: list[str]) -> list[str]:
        return ["nsenter", "-t", str(self.holder.pid), "-m", "--", *argv]

    def run(self, argv: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run(self.enter(argv), capture_output=True, text=True, timeout=60,
                              env=self.env, cwd="/")

    def cgroup2_mounts(self) -> list[str]:
        text = Path(f"/proc/{self.holder.pid}/mountinfo").read_text()
        return [line for line in text.splitlines() if " - cgroup2 " in line]

    def close(self) -> None:
        if self.holder.poll() is None:
            self.holder.kill()
        self.holder.wait(10)


@pytest.fixture
def v1_host():
    if reason := _bcc_usable():
        _require_kernel(reason)
    host = V1Host()
    try:
        assert host.cgroup2_mounts() == [], "the v1 host still has a cgroup2 mount"
        yield host
    finally:
        host.close()


def _sandboxed_agent(host: V1Host, tmp_path: Path) -> AgentProcess:
    argv = host.enter(sandbox.wrap(str(UNIT), agent_command(tmp_path, "auto")))
    agent = AgentProcess(tmp_path, argv=argv, cwd="/", env=host.env)
    return agent.start(timeout=120, expect_ready=False)


@pytest.mark.kernel
def test_unit_steps_give_the_sandboxed_agent_the_cgroup_backend_on_a_v1_host(
        v1_host, lab_factory, tmp_path):
    pre = v1_host.run(unit_step("ExecStartPre"))
    assert pre.returncode == 0, pre.stderr
    assert "mounted the cgroup v2 hierarchy at /run/imds-tracer/cgroup2" in pre.stderr
    mounts = v1_host.cgroup2_mounts()
    assert len(mounts) == 1 and " /run/imds-tracer/cgroup2 " in mounts[0], mounts

    lab = lab_factory()
    agent = _sandboxed_agent(v1_host, tmp_path)
    marker = uuid.uuid4().hex
    try:
        assert agent.ready_line.startswith("ready backend=cgroup "), agent.stderr()
        client = lab.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                          f"http://169.254.169.254{PATH_SEEN}{marker}"])
        assert client.returncode == 0, client.stderr
        records = agent.wait_records(marker, 1)
    finally:
        status = agent.stop(timeout=60)
    assert status == 0, agent.stderr()
    assert "Traceback" not in agent.stderr(), agent.stderr()
    record, = records
    assert (record["provider"], record["mode"], record["comm"]) == ("aws", "normal", "curl")
    assert record["argv"][0] == "curl" and record["argv"][-1].endswith(marker)
    # the agent did not mount or unmount anything itself: the stop step's mount is still there
    assert len(v1_host.cgroup2_mounts()) == 1

    post = v1_host.run(unit_step("ExecStopPost"))
    assert post.returncode == 0, post.stderr
    assert "unmounted the cgroup v2 hierarchy at /run/imds-tracer/cgroup2" in post.stderr
    assert v1_host.cgroup2_mounts() == []
    left = v1_host.run(["ls", "-A", "/run"])
    assert left.stdout.split() == [], f"left in /run: {left.stdout}"
    again = v1_host.run(unit_step("ExecStopPost"))   # e.g. a stop after a failed start
    assert again.returncode == 0 and "nothing to do" in again.stderr, again.stderr


@pytest.mark.kernel
def test_without_the_pre_start_step_the_sandboxed_agent_says_why_not_cgroup(
        v1_host, tmp_path):
    """What the unit did before it had the step: the agent cannot mount, so `auto` passes the
    cgroup backend over with a one-line reason (no mount() attempt, which the unit's syscall
    filter forbids) and runs a costlier backend."""
    agent = _sandboxed_agent(v1_host, tmp_path)
    try:
        assert agent.ready, agent.stderr()
        assert not agent.ready_line.startswith("ready backend=cgroup "), agent.stderr()
        why = [line for line in agent.stderr().splitlines()
               if "backend auto: not cgroup:" in line]
        assert len(why) == 1 and "imds-tracer cgroup2 mount" in why[0], agent.stderr()
    finally:
        assert agent.stop(timeout=60) == 0, agent.stderr()
    assert v1_host.cgroup2_mounts() == []
