"""Load, then let go (issue 12): the BPF programs are compiled and attached by a short-lived
loader child; the running agent holds only their descriptors, none of BCC / LLVM, and only
the capabilities it still needs.

- the running agent's /proc/PID/status and maps: CapEff is the documented set (caps.AGENT_KEEPS,
  plus CAP_BPF on kernels that check bpf() map calls against unprivileged_bpf_disabled), the
  bounding and ambient sets follow, no_new_privs is set, libLLVM / libclang / libbcc are not
  mapped (in every thread); with that set it still names a client of another user (its executable) and obeys
  SIGHUP and SIGTERM;
- a loader killed after attaching, before handing over, leaves nothing attached and gives
  one line;
- a SIGKILLed agent leaves no program alive (its maps are freed);
- the perf-buffer path (kernels without ring buffers) on the cgroup backend.
"""
from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from imds_tracer.config import Config
from imds_tracer.sources import bpfsys, caps
from imds_tracer.sources.base import SourceError
from tests.kernel.conftest import Recorder, live_map_ids, run_client, wait_maps_gone
from tests.lab.agent import AgentProcess
from tests.lab.clients import READ_RESPONSE

AWS_IP = "169.254.169.254"
PYTHON = sys.executable
COMPILERS = ("libLLVM", "libclang", "libbcc")

# a client that lingers after its answer, so that its /proc/PID/exe is still there
CLIENT = READ_RESPONSE + r"""
import socket, sys, time
ip, path = sys.argv[1], sys.argv[2]
s = socket.create_connection((ip, 80))
s.sendall(f"GET {path} HTTP/1.1\r\nHost: {ip}\r\nConnection: close\r\n\r\n".encode())
read_response(s.makefile("rb"))
time.sleep(3)
"""


@pytest.fixture(scope="module")
def lab(module_lab):
    return module_lab


def _status(pid: int, task: int | None = None) -> dict:
    path = f"/proc/{pid}/task/{task}/status" if task else f"/proc/{pid}/status"
    return dict(line.split(":\t", 1) for line in Path(path).read_text().splitlines()
                if ":\t" in line)


def _documented_set() -> int:
    """What the agent keeps here: caps.AGENT_KEEPS, and CAP_BPF where the kernel checks every
    bpf() command against kernel.unprivileged_bpf_disabled (mainline before 6.5; Debian's
    6.1 no longer does). Asked of the kernel another way than the loader does (which tries a
    map lookup): a command on a descriptor that is not open fails with EPERM at that gate,
    with EBADF past it."""
    before = caps.effective_caps()
    caps.set_effective(caps.AGENT_KEEPS & before)
    try:
        bpfsys.map_info(999999)
        gated = False
    except OSError as exc:
        gated = exc.errno == errno.EPERM
    finally:
        caps.set_effective(before)
    return caps.AGENT_KEEPS | (1 << caps.CAP_BPF if gated else 0)


def _fdinfo_ids(pid: int, field: str) -> set[int]:
    """The `field` ids (map_id, prog_id) of the BPF objects process `pid` holds descriptors of
    (its /proc/PID/fdinfo)."""
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fdinfo"):
        try:
            text = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
        except OSError:
            continue
        out.update(int(m) for m in re.findall(rf"^{field}:\s*(\d+)", text, re.M))
    return out


def test_running_agent_keeps_only_what_it_needs(tmp_path, lab):
    agent = AgentProcess(tmp_path, backend="cgroup").start()
    try:
        pid = agent.proc.pid
        status = _status(pid)
        want = _documented_set()
        assert int(status["CapEff"], 16) == want, agent.stderr()
        assert int(status["CapPrm"], 16) == want
        assert int(status["CapBnd"], 16) == want   # run as root: CAP_SETPCAP to cut it
        assert int(status["CapAmb"], 16) == 0 and int(status["CapInh"], 16) == 0
        assert status["NoNewPrivs"].strip() == "1"
        maps = Path(f"/proc/{pid}/maps").read_text()
        assert [lib for lib in COMPILERS if lib in maps] == []
        kept = [line for line in agent.stderr().splitlines() if "capabilities kept" in line]
        assert kept and kept[0].endswith(", ".join(caps.names(want))), agent.stderr()

        # with that set: a client of another user is named with its executable
        path = f"/latest/meta-data/{os.urandom(4).hex()}"
        proc = run_client(lab, ["setpriv", "--reuid=65534", "--regid=65534",
                                "--clear-groups", PYTHON, "-c", CLIENT, AWS_IP, path])
        rec, = agent.wait_records(path, 1)
        assert rec["uid"] == 65534 and rec["pid"] == proc.pid
        assert rec["exe"] == os.path.realpath(PYTHON), rec
        # SIGHUP reopens the trace log (renamed away: a new one is made)
        log = tmp_path / "logs" / "imds-trace.log"
        log.rename(log.with_suffix(".old"))
        agent.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while not log.exists():
            assert time.monotonic() < deadline, "no new trace log after SIGHUP"
            time.sleep(0.1)
    finally:
        assert agent.stop() == 0, agent.stderr()[-2000:]


def test_every_thread_of_the_running_agent_dropped_its_capabilities(tmp_path):
    """Capabilities are per thread: the Agent starts the metrics endpoint's thread only after
    the source dropped them, so that thread (it parses what local processes send) holds no
    more than the main one."""
    agent = AgentProcess(tmp_path, backend="cgroup").start()
    try:
        pid = agent.proc.pid
        tasks = os.listdir(f"/proc/{pid}/task")
        assert len(tasks) >= 2   # the metrics endpoint's thread
        assert {int(_status(pid, int(t))["CapEff"], 16) for t in tasks} == {_documented_set()}
        assert "keep their capabilities" not in agent.stderr()
    finally:
        agent.stop()


def _our_cgroup_hooks() -> set[int]:
    from imds_tracer.sources.cgroup import cgroup2_root
    out = subprocess.run(["bpftool", "-j", "cgroup", "show", cgroup2_root()],
                         capture_output=True, text=True, check=True).stdout
    return {p["id"] for p in json.loads(out.strip() or "[]") if p.get("name", "").startswith("imds_")}




def test_loader_killed_after_attaching_leaves_nothing_attached(monkeypatch):
    """(Hooks are told apart by the loader's pid: other agents may attach meanwhile.)"""
    from imds_tracer.sources import loader
    monkeypatch.setenv("IMDS_TRACER_LOADER_HOLD", "60")
    running = loader.LoaderProcess("cgroup", loader.spec_of(Config(), use_perf=False,
                                                            keep_caps=caps.AGENT_KEEPS))
    deadline = time.monotonic() + 60
    mine: set = set()
    while len(mine) < 4:
        assert time.monotonic() < deadline, "the loader attached nothing"
        assert running._proc.poll() is None, "the loader exited"
        time.sleep(0.05)
        mine = _our_cgroup_hooks() & _fdinfo_ids(running._proc.pid, "prog_id")
    running._proc.kill()
    with pytest.raises(SourceError) as info:
        running.receive()
    message = str(info.value)
    assert "\n" not in message and "killed by signal 9" in message
    assert "nothing was attached" in message
    deadline = time.monotonic() + 5
    while mine & _our_cgroup_hooks():
        assert time.monotonic() < deadline, f"still attached: {mine & _our_cgroup_hooks()}"
        time.sleep(0.1)


def test_killed_agent_leaves_no_program_alive(tmp_path):
    """Every program (cgroup hooks, tracepoints) holds its maps: all the agent's maps freed
    after SIGKILL means nothing of it is left in the kernel."""
    agent = AgentProcess(tmp_path, backend="cgroup").start()
    try:
        ids = _fdinfo_ids(agent.proc.pid, "map_id")
        assert len(ids) >= 4 and ids <= live_map_ids()
        agent.send_signal(signal.SIGKILL)
    finally:
        agent.kill()
    wait_maps_gone(ids)


def test_cgroup_backend_through_perf_buffers(lab):
    """Kernels without BPF ring buffers get per-CPU perf buffers: forced here."""
    from imds_tracer.sources.cgroup import CgroupSource
    src = CgroupSource(Config())
    src.use_perf = True
    src.start()
    rec = Recorder()
    try:
        path = f"/latest/meta-data/{os.urandom(4).hex()}"
        proc = run_client(lab, [PYTHON, "-c", CLIENT, AWS_IP, path])
        deadline = time.monotonic() + 10
        while not any(c.process and c.process.pid == proc.pid for c in rec.chunks):
            assert time.monotonic() < deadline, "nothing arrived through the perf buffers"
            rec.take(src.poll(100))
    finally:
        src.stop()
    sent = b"".join(c.data for c in rec.chunks if c.process and c.process.pid == proc.pid
                    and c.direction.name == "REQUEST")
    assert sent.startswith(f"GET {path} HTTP/1.1".encode())


def test_ring_buffer_records_across_its_end_arrive_whole():
    """The agent maps the ring buffer's data area once (the kernel's second copy would count
    twice in its RSS): records that run past the end are read in two pieces. 3000 sends of
    varying length through a 64 KiB ring, read while they are written: each arrives intact."""
    import socket
    import threading

    from imds_tracer.sources.tracepoint import TracepointSource
    from tests.lab.agent import free_port
    port = free_port()
    src = TracepointSource(Config(perf_pages=8, ports=[port], addresses=["127.0.0.1"]))
    src.start()
    server = socket.create_server(("127.0.0.1", port))
    got, done = [], threading.Event()

    def drain():
        conn, _ = server.accept()
        while conn.recv(65536):
            pass
        conn.close()

    lost = []

    def pump():
        while not done.is_set():
            for item in src.poll(20):
                if getattr(item, "data", b""):
                    got.append(item.data)
                elif getattr(item, "kind", "") == "kernel_lost":
                    lost.append(item.count)

    threads = [threading.Thread(target=drain, daemon=True), threading.Thread(target=pump)]
    for t in threads:
        t.start()
    try:
        assert src._output.size == 65536
        client = socket.create_connection(("127.0.0.1", port))
        for i in range(3000):
            os.write(client.fileno(), b"GET /%08d " % i + b"x" * (i % 700) + b"\n")
            if i % 50 == 0:
                time.sleep(0.002)   # a reader that keeps up: nothing lost, many wraps
        client.close()
        time.sleep(1.5)   # and one more read of the loss counters
    finally:
        done.set()
        threads[1].join(10)
        src.stop()
        server.close()
    # on a busy machine the reader may fall behind: what it lost is counted, the rest whole
    assert len(got) + sum(lost) == 3000 and len(got) > 1000, (len(got), sum(lost))
    for data in got:
        match = re.fullmatch(rb"GET /(\d{8}) (x*)\n", data)
        assert match and len(match.group(2)) == int(match.group(1)) % 700, data[:40]
