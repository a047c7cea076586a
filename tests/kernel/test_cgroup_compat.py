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
