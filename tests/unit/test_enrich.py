import os
import subprocess
import sys
import time

import pytest

from imds_tracer.enrich import Enricher, container_from_cgroup
from imds_tracer.model import Container, ProcessSnapshot

ID = "0123456789abcdef" * 4


@pytest.mark.parametrize("path,expected", [
    ("/", None),
    ("/user.slice/user-0.slice/session-1.scope", None),
    (f"/system.slice/docker-{ID}.scope", Container("docker", ID)),
    (f"/docker/{ID}", Container("docker", ID)),
    (f"/system.slice/crio-{ID}.scope", Container("cri-o", ID)),
    (f"/machine.slice/libpod-{ID}.scope/container", Container("podman", ID)),
    ("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1b2c3d4e_aaaa_bbbb_cccc_"
     f"0123456789ab.slice/cri-containerd-{ID}.scope",
     Container("containerd", ID, "1b2c3d4e-aaaa-bbbb-cccc-0123456789ab")),
    (f"/kubepods/besteffort/pod1b2c3d4e-aaaa-bbbb-cccc-0123456789ab/{ID}",
     Container("kubernetes", ID, "1b2c3d4e-aaaa-bbbb-cccc-0123456789ab")),
    ("/lxc.payload.web1", Container("lxc", "web1")),
])
def test_container_from_cgroup_path(path, expected):
    assert container_from_cgroup(path) == expected


def test_live_process_argv_and_parents():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "marker"])
    try:
        for _ in range(100):  # until the child has exec'd
            if b"marker" in open(f"/proc/{child.pid}/cmdline", "rb").read():
                break
            time.sleep(0.02)
        comm = open(f"/proc/{child.pid}/comm").read().strip()
        e = Enricher(parents=3)
        info, parents, container = e.describe(ProcessSnapshot(pid=child.pid, comm=comm))
        assert info.argv[-1] == "marker" and info.exe
        assert parents[0].pid == os.getpid()
        assert len(parents) <= 3
    finally:
        child.kill()
        child.wait()


def test_gone_process_keeps_kernel_argv_and_parent_chain():
    child = subprocess.Popen(["true"])
    child.wait()
    snap = ProcessSnapshot(pid=child.pid, comm="true", ppid=os.getpid(),
                           argv=("true", "--gone"))
    info, parents, _ = Enricher().describe(snap)
    assert info.argv == ("true", "--gone") and info.pid == child.pid
    assert parents[0].pid == os.getpid() and parents[0].argv


def test_pid_reused_by_another_program_is_not_believed():
    # our own pid, but the kernel said the sender was "curl": /proc is someone else now
    info, _, _ = Enricher().describe(ProcessSnapshot(pid=os.getpid(), comm="curl"))
    assert info.comm == "curl" and info.argv is None


def test_gone_parents_come_from_the_kernel_caches():
    gone = subprocess.Popen(["true"])
    gone.wait()
    caches = {gone.pid: (os.getpid(), ("sh", "-c", "curl ...")), }
    snap = ProcessSnapshot(pid=gone.pid + 100000, comm="curl", ppid=gone.pid,
                           argv=("curl", "http://169.254.169.254/"))
    _, parents, _ = Enricher(lookup=lambda pid: caches.get(pid, (None, None))).describe(snap)
    assert parents[0].pid == gone.pid and parents[0].argv == ("sh", "-c", "curl ...")
    assert parents[1].pid == os.getpid()


def _fake_proc(root, pid, comm, ppid, start, argv):
    d = root / str(pid)
    d.mkdir(parents=True, exist_ok=True)
    fields = ["S", str(ppid)] + ["0"] * 17 + [str(start)]
    (d / "stat").write_text(f"{pid} ({comm}) " + " ".join(fields) + "\n")
    (d / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")


class _Clock:
    def __init__(self, monkeypatch):
        self.now = 1000.0
        monkeypatch.setattr(time, "monotonic", lambda: self.now)


def test_a_cached_parent_is_read_again_after_its_ttl(tmp_path, monkeypatch):
    from imds_tracer.enrich import RECENT_TTL
    clock = _Clock(monkeypatch)
    _fake_proc(tmp_path, 100, "curl", 50, 7, ["curl", "http://169.254.169.254/"])
    _fake_proc(tmp_path, 50, "bash", 0, 5, ["-bash"])
    e = Enricher(parents=3, proc=str(tmp_path))
    snap = ProcessSnapshot(pid=100, comm="curl")
    assert [p.comm for p in e.describe(snap)[1]] == ["bash"]
    _fake_proc(tmp_path, 50, "sh", 0, 9, ["sh", "-c", "curl"])   # the pid reused meanwhile
    clock.now += RECENT_TTL / 2
    assert [p.comm for p in e.describe(snap)[1]] == ["bash"]      # cached
    clock.now += RECENT_TTL
    parent = e.describe(snap)[1][0]
    assert (parent.comm, parent.argv) == ("sh", ("sh", "-c", "curl"))


def test_the_pipeline_describes_a_sender_once_per_ttl(monkeypatch):
    from imds_tracer.config import Config
    from imds_tracer.enrich import RECENT_TTL
    from imds_tracer.model import Chunk, Direction, FlowClosed, ProcessInfo
    from imds_tracer.pipeline import Pipeline
    clock = _Clock(monkeypatch)
    calls = []

    class CountingEnricher:
        def describe(self, snap):
            calls.append(snap.pid)
            return (ProcessInfo(snap.pid, "cu\x1brl", ("curl", "-H", "Authorization: x")),
                    (ProcessInfo(1, "init", ("/sbin/init",)),), None)

        def owner(self, snap, info, container):
            return None

    records = []

    class Sink:
        def emit(self, record):
            records.append(record)

    pipeline = Pipeline(Config(), [Sink()], enricher=CountingEnricher())
    snap = ProcessSnapshot(pid=42, comm="curl", ppid=1)
    for flow in range(3):
        pipeline.take([Chunk(flow, Direction.REQUEST, b"GET /latest/x HTTP/1.1\r\n\r\n", 0.0,
                             "169.254.169.254", 80, "test", process=snap),
                       FlowClosed(flow, 0.0)])
    assert calls == [42] and len(records) == 3
    # escaped and redacted, and the same objects for every request of the sender
    assert records[0].process.comm == "cu\\x1brl"
    assert records[0].process.argv[-1] == "Authorization: <redacted>"
    assert all(r.process is records[0].process for r in records)
    clock.now += RECENT_TTL
    pipeline.take([Chunk(9, Direction.REQUEST, b"GET /latest/x HTTP/1.1\r\n\r\n", 0.0,
                         "169.254.169.254", 80, "test", process=snap), FlowClosed(9, 0.0)])
    assert calls == [42, 42]
