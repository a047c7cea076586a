"""The cgroup backend's answers to older kernels, checked on this one: the verifier load test
that tells which helpers a program type may call, and the packet program built for kernels
whose cgroup_skb programs may not ask for the current task (Debian's 5.10 and 6.1), which
must still load and attach here."""
from __future__ import annotations

from imds_tracer.config import Config
from imds_tracer.sources import cgroup, helpers


def test_helper_probe_tells_allowed_from_refused():
    connect = (helpers.PROG_CGROUP_SOCK_ADDR, helpers.ATTACH_CGROUP_INET4_CONNECT)
    packet = (helpers.PROG_CGROUP_SKB, helpers.ATTACH_CGROUP_INET_EGRESS)
    assert helpers.helper_allowed(*connect, "get_current_pid_tgid")
    assert helpers.helper_allowed(*packet, "get_socket_cookie")
    assert helpers.helper_allowed(*packet, "skb_load_bytes")
    # a socket-address program has no packet to load bytes from, on every kernel
    assert not helpers.helper_allowed(*connect, "skb_load_bytes")
    assert not helpers.helper_allowed(*connect, "skb_cgroup_id")
    assert cgroup.hook_support().refused is None


def test_packet_program_without_current_task_helpers_loads_and_attaches(monkeypatch):
    monkeypatch.setattr(cgroup, "hook_support", lambda: cgroup.HookSupport(None, False))
    source = cgroup.CgroupSource(Config())
    assert "-DIMDS_SKB_CURRENT_TASK" not in source._cflags()
    try:
        assert source.start() == 6
    finally:
        source.stop()


def test_hooks_load_with_a_bcc_whose_load_func_takes_no_attach_type(monkeypatch):
    """BCC 0.18 (Debian 11) has no attach_type for load_func, and the kernel refuses to
    attach a cgroup/connect program loaded without its expected attach type: the backend
    loads BCC's compiled instructions itself and links each hook at the root of the cgroup v2
    hierarchy with its attach type."""
    from bcc import BPF

    real = BPF.load_func

    def load_func_0_18(self, func_name, prog_type, device=None, **kw):
        if kw:
            raise TypeError(f"load_func() got an unexpected keyword argument {next(iter(kw))!r}")
        return real(self, func_name, prog_type, device)

    monkeypatch.setattr(BPF, "load_func", load_func_0_18)
    source = cgroup.CgroupSource(Config())
    try:
        assert source.start() == 6
        linked = []
        for fd in source._links:
            info = dict(line.split(":\t", 1) for line in
                        open(f"/proc/self/fdinfo/{fd}").read().splitlines() if ":\t" in line)
            linked.append((info["link_type"], int(info["cgroup_id"]), int(info["attach_type"])))
        assert linked == [("cgroup", cgroup.ROOT_CGROUP_INO, attach)
                          for _, _, attach in cgroup.HOOKS]
    finally:
        source.stop()


def test_connection_opened_before_start_is_attributed_without_current_task_helpers(
        monkeypatch, lab):
    """Where packet programs may not ask for the current task (Debian's 5.10 and 6.1), a
    connection opened before the agent started is adopted at start (its cookie given its
    holder): its later requests carry the client's pid, in its own network namespace."""
    import subprocess
    import sys
    import time

    from tests.kernel.conftest import Recorder
    from tests.lab.clients import KEEPALIVE_CLIENT

    monkeypatch.setattr(cgroup, "hook_support", lambda: cgroup.HookSupport(None, False))
    client = lab.popen([sys.executable, "-c", KEEPALIVE_CLIENT, "169.254.169.254"],
                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    source = cgroup.CgroupSource(Config())
    rec = Recorder()
    try:
        assert client.stdout.readline().strip() == "first"
        source.start()
        client.stdin.write("go\n")
        client.stdin.flush()
        assert client.stdout.readline().strip() == "done"
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            rec.take(source.poll(100))
            sent = b"".join(c.data for c in rec.chunks
                            if c.process is not None and c.process.pid == client.pid)
            if b"/latest/meta-data/hostname" in sent:
                break
    finally:
        source.stop()
        client.kill()
        client.wait(5)
    assert b"GET /latest/meta-data/ami-id" in sent, [
        (c.process and c.process.pid, c.data[:40]) for c in rec.chunks]
    assert b"GET /latest/meta-data/hostname" in sent
