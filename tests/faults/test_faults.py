"""Faults while the agent runs: the log directory removed, the disk full, SIGHUP, SIGTERM, a
burst beyond the ring buffer, the metrics port taken. The agent must keep running, lose
nothing silently (imds_tracer_dropped_total / imds_tracer_lost_events_total) and recover.

The live tests run `python -m imds_tracer run --backend tracepoint` with real clients in a
throw-away network namespace (tests.lab) and need root + BPF: they skip with the reason
elsewhere and fail instead when IMDS_TRACER_REQUIRE_KERNEL=1. The replay tests exercise the
same sinks through `imds-tracer replay` and the Agent (imds_tracer.agent) (the tmpfs ones need root).

Other sessions may run metadata clients on this machine at the same time: every request a
test makes has a unique path, and only those are counted.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from imds_tracer import report
from imds_tracer.agent import Agent
from imds_tracer.config import Config
from tests.lab.agent import AgentProcess, free_port
from tests.lab.clients import READ_RESPONSE
from tests.unprivileged import NOBODY, base_python

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "tests" / "data"
PYTHON = sys.executable
AWS_IP = "169.254.169.254"
SILENT_PORT = 8080   # a listener in the lab that reads and never answers


def whole_line(line: str) -> bool:
    """A complete trace-log line: a request the report can parse, or a drop summary."""
    return bool(report._LINE.match(line) or report._DROP.match(line))


def need_root(what: str) -> None:
    if os.geteuid() != 0:
        if os.environ.get("IMDS_TRACER_REQUIRE_KERNEL") == "1":
            pytest.fail(f"{what} needs root", pytrace=False)
        pytest.skip(f"{what} needs root")


def need_kernel() -> None:
    from tests.kernel.conftest import kernel_unavailable, skip_or_fail
    reason = kernel_unavailable()
    if reason:
        skip_or_fail(reason)


@contextlib.contextmanager
def tmpfs(path: Path, size: str):
    """A small tmpfs at `path`, unmounted (lazily if still busy) afterwards."""
    need_root("mounting a tmpfs")
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs",
                    str(path)], check=True)
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(directory: Path) -> Path:
    """Fill the file system of `directory` until ENOSPC; returns the filler file."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for size in (65536, 4096, 1):
            block = b"\0" * size
            with contextlib.suppress(OSError):
                while os.write(fd, block):
                    pass
    finally:
        os.close(fd)
    return filler


def request_lines(log_dir: Path) -> list[str]:
    out = []
    for path in sorted(log_dir.glob("imds-trace.log*")):
        out += path.read_text(errors="replace").splitlines()
    return out


# -- live agent ---------------------------------------------------------------------------
@pytest.fixture
def lab():
    need_kernel()
    from tests.kernel.conftest import skip_or_fail
    from tests.lab import netns
    reason = netns.available()
    if reason:
        skip_or_fail(f"lab unavailable: {reason}")
    with netns.Lab(mode="optional") as the_lab:
        yield the_lab


@pytest.fixture
def agents(tmp_path):
    """`agents(log_dir=, config=, metrics_port=)`: an agent (not started) that also captures
    SILENT_PORT; `config` is TOML text appended to that; all are killed afterwards."""
    started: list[AgentProcess] = []

    def make(config: str = "", **kw) -> AgentProcess:
        agent = AgentProcess(tmp_path, config="[capture]\nports = [80, %d]\n%s"
                             % (SILENT_PORT, config), python=PYTHON, **kw)
        started.append(agent)
        return agent

    yield make
    for agent in started:
        agent.kill()


def curl(lab, path: str) -> None:
    """One normal-mode GET that must have been answered (else the test says so, not later as
    a missing record)."""
    lab.run(["curl", "-sS", "-m", "10", "-o", "/dev/null", f"http://{AWS_IP}{path}"],
            timeout=30, check=True)


SILENT_SERVER = f"""
import socket, sys, threading
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("{AWS_IP}", {SILENT_PORT})); srv.listen(64)
print("READY", flush=True)
def drain(conn):
    while conn.recv(65536):
        pass
while True:
    conn, _ = srv.accept()
    threading.Thread(target=drain, args=(conn,), daemon=True).start()
"""


@contextlib.contextmanager
def silent_server(lab):
    proc = lab.popen([PYTHON, "-c", SILENT_SERVER], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "READY"
        yield proc
    finally:
        proc.kill()
        proc.wait(5)


def test_log_dir_removed_while_running_is_recreated(lab, agents):
    agent = agents().start()
    marker = "fault-rmdir-" + secrets.token_hex(4)
    curl(lab, f"/latest/meta-data/{marker}/before")
    assert agent.wait_records(marker, 1)
    shutil.rmtree(agent.log_dir)
    curl(lab, f"/latest/meta-data/{marker}/after")
    assert len(agent.wait_records(marker, 2)) == 2
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not any(
            f"{marker}/after" in line for line in request_lines(agent.log_dir)):
        time.sleep(0.1)
    assert any(f"{marker}/after" in line for line in request_lines(agent.log_dir))
    assert (agent.log_dir.stat().st_mode & 0o777) == 0o700
    assert ((agent.log_dir / "imds-trace.log").stat().st_mode & 0o777) == 0o600
    assert agent.alive()
    assert agent.stop() == 0


def test_disk_full_counts_dropped_lines_and_recovers(lab, agents, tmp_path):
    with tmpfs(tmp_path / "small", "64k") as small:
        # a log smaller than the disk: once space returns, other sessions' metadata
        # traffic (the agent sees the whole machine) cannot fill it up again
        agent = agents(log_dir=small / "logs",
                       config="[log]\nmax_bytes = 8192\nbackups = 1\n").start()
        marker = "fault-full-" + secrets.token_hex(4)
        curl(lab, f"/latest/meta-data/{marker}/first")
        assert agent.wait_records(marker, 1)
        filler = fill(small)
        # more than the free rest of the log's last page: some lines cannot be written
        for i in range(30):
            curl(lab, f"/latest/meta-data/{marker}/full-{i}")
        assert len(agent.wait_records(marker, 31)) == 31   # JSON lives elsewhere: all seen
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and \
                agent.metric("imds_tracer_dropped_total", 'kind="log_write"') < 1:
            time.sleep(0.2)
        dropped = agent.metric("imds_tracer_dropped_total", 'kind="log_write"')
        assert dropped >= 1, agent.stderr()[-2000:]
        assert agent.alive()
        # space returns: writing resumes, and the loss is summarised in the log itself
        filler.unlink()
        deadline = time.monotonic() + 25
        lines: list[str] = []
        while time.monotonic() < deadline:
            curl(lab, f"/latest/meta-data/{marker}/recovered")
            time.sleep(0.5)
            lines = request_lines(agent.log_dir)
            if any(f"{marker}/recovered" in line for line in lines) and \
                    any("agent dropped" in line and "log_write=" in line for line in lines):
                break
        assert any(f"{marker}/recovered" in line for line in lines), lines[-5:]
        assert any("agent dropped" in line and "log_write=" in line for line in lines)
        # no half-written line glued to the next one: every line parses
        for line in lines:
            assert whole_line(line), line
        assert agent.stop() == 0


def test_sighup_reopens_the_log(lab, agents):
    agent = agents().start()
    marker = "fault-hup-" + secrets.token_hex(4)
    curl(lab, f"/latest/meta-data/{marker}/before")
    assert agent.wait_records(marker, 1)
    log = agent.log_dir / "imds-trace.log"
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and marker not in log.read_text():
        time.sleep(0.1)
    rotated = agent.log_dir / "rotated-by-test.log"
    log.rename(rotated)                      # what logrotate does before its postrotate HUP
    agent.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not log.exists():
        time.sleep(0.05)
    assert log.exists(), agent.stderr()[-2000:]
    curl(lab, f"/latest/meta-data/{marker}/after")
    assert len(agent.wait_records(marker, 2)) == 2
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and f"{marker}/after" not in log.read_text():
        time.sleep(0.1)
    assert f"{marker}/after" in log.read_text()
    assert f"{marker}/after" not in rotated.read_text()
    assert (log.stat().st_mode & 0o777) == 0o600
    assert agent.alive()
    assert agent.stop() == 0


def test_sigterm_flushes_pending_requests_and_exits_zero(lab, agents):
    # a long response wait: the request is still pending (no answer yet) when SIGTERM comes
    agent = agents(config="[flows]\nresponse_wait = 30.0\n").start()
    marker = "fault-term-" + secrets.token_hex(4)
    client = (f"import socket, time; s = socket.create_connection(('{AWS_IP}', {SILENT_PORT}));"
              f"s.sendall(b'GET /latest/meta-data/{marker} HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n');"
              "print('SENT', flush=True); time.sleep(30)")
    with silent_server(lab):
        proc = lab.popen([PYTHON, "-c", client], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "SENT"
        time.sleep(1.0)                      # the agent has read it; no response will come
        assert agent.records(marker) == []   # still waiting for the status
        started = time.monotonic()
        assert agent.stop() == 0, agent.stderr()[-2000:]
        took = time.monotonic() - started
        proc.kill()
        proc.wait(5)
    records = agent.records(marker)
    assert len(records) == 1, agent.stderr()[-2000:]
    assert records[0]["status"] is None and records[0]["mode"] == "normal"
    assert any(marker in line for line in request_lines(agent.log_dir))
    assert took < 10


def test_burst_beyond_the_ring_buffer_is_counted_and_survived(lab, agents):
    # the smallest ring buffer the config allows, then ~100 MB of sends as fast as possible
    agent = agents(config="perf_pages = 8\n").start()
    flood = (f"import socket; s = socket.create_connection(('{AWS_IP}', {SILENT_PORT}));"
             "req = b'GET /latest/meta-data/flood HTTP/1.1\\r\\nX-Pad: ' + b'a' * 3000 "
             "+ b'\\r\\n\\r\\n'\n"
             "for _ in range(30000):\n    s.sendall(req)\n"
             "s.close(); print('DONE', flush=True)")
    with silent_server(lab):
        proc = lab.popen([PYTHON, "-c", flood], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "DONE"
        proc.wait(30)
        deadline = time.monotonic() + 20
        lost = 0.0
        while time.monotonic() < deadline:
            lost = agent.metric("imds_tracer_lost_events_total", 'stage="kernel"')
            if lost > 0:
                break
            time.sleep(0.5)
    assert lost > 0, agent.stderr()[-2000:]
    assert agent.alive()
    # still working after the flood
    marker = "fault-burst-" + secrets.token_hex(4)
    time.sleep(2)
    curl(lab, f"/latest/meta-data/{marker}")
    assert len(agent.wait_records(marker, 1, timeout=30)) == 1
    # the loss is also in the trace log, where operators look
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and not any(
            "agent dropped" in line and "kernel_lost=" in line
            for line in request_lines(agent.log_dir)):
        time.sleep(0.5)
    assert any("agent dropped" in line and "kernel_lost=" in line
               for line in request_lines(agent.log_dir))
    assert agent.stop() == 0


@pytest.mark.parametrize("backend", ["cgroup", "tracepoint"])
def test_a_connection_that_overflowed_the_ring_buffer_is_still_watched(lab, agents, backend):
    # issue 10: a burst on one keep-alive connection overflows the smallest ring buffer; the
    # normal-mode requests the same connection sends seconds later must still be logged
    agent = agents(config="perf_pages = 8\n", backend=backend).start()
    marker = "fault-resync-" + secrets.token_hex(4)
    client = (f"import socket, time; s = socket.create_connection(('{AWS_IP}', {SILENT_PORT}))\n"
              "req = b'GET /latest/meta-data/flood HTTP/1.1\\r\\nX-Pad: ' + b'a' * 3000 "
              "+ b'\\r\\n\\r\\n'\n"
              "for _ in range(30000):\n    s.sendall(req)\n"
              "print('FLOODED', flush=True); time.sleep(4)\n"
              "for i in range(3):\n"
              f"    s.sendall(b'GET /latest/meta-data/{marker}-%d HTTP/1.1\\r\\nHost: x"
              "\\r\\n\\r\\n' % i); time.sleep(0.5)\n"
              "print('DONE', flush=True); time.sleep(30)")
    with silent_server(lab):
        # the agent stopped while the burst is sent: the ring overflows however fast the
        # reader is (on a quiet machine it could keep up, and the test would prove nothing)
        agent.proc.send_signal(signal.SIGSTOP)
        proc = lab.popen([PYTHON, "-c", client], stdout=subprocess.PIPE, text=True)
        try:
            try:
                assert proc.stdout.readline().strip() == "FLOODED"
            finally:
                agent.proc.send_signal(signal.SIGCONT)
            assert proc.stdout.readline().strip() == "DONE"
            records = agent.wait_records(marker, 3, timeout=30)
        finally:
            proc.kill()
            proc.wait(5)
    lost = agent.metric("imds_tracer_lost_events_total", 'stage="kernel"')
    assert lost > 0, "the burst did not overflow the ring buffer: the test proves nothing"
    assert sorted(r["path"] for r in records) == \
        [f"/latest/meta-data/{marker}-{i}" for i in range(3)], agent.stderr()[-2000:]
    assert all(r["mode"] == "normal" for r in records)
    assert agent.stop() == 0


HARDENED_BUSY = """
import http.client
c = http.client.HTTPConnection("169.254.169.254", 80, timeout=5)
c.request("PUT", "/latest/api/token", headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"})
r = c.getresponse(); token = r.read().decode()
for i in range(60):
    c.request("GET", "/latest/meta-data/instance-id",
              headers={"X-aws-ec2-metadata-token": token})
    c.getresponse().read()
"""


def test_evidence_outlives_rotation_a_kill_and_a_restart(lab, agents, tmp_path):
    # issue 10: the offender's line rotates away and the agent is SIGKILLed; the evidence
    # file beside the logs still has the offender and the watch, and report finds it
    log_dir = tmp_path / "logs"
    small = "[log]\nmax_bytes = 4096\nbackups = 0\n"
    agent = agents(log_dir=log_dir, config=small).start()
    marker = "fault-evidence-" + secrets.token_hex(4)
    # a curl of its own name: report's rows are per program, and an agent sees every
    # normal-mode curl on the machine (another test run's too)
    own_curl = tmp_path / f"curl-{marker}"
    own_curl.symlink_to(shutil.which("curl"))
    lab.run([str(own_curl), "-s", "-m", "5", "-o", "/dev/null",
             f"http://{AWS_IP}/latest/meta-data/{marker}"], timeout=20)
    assert len(agent.wait_records(marker, 1, timeout=30)) == 1
    lab.run([PYTHON, "-c", HARDENED_BUSY], timeout=60, check=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(marker in line
                                              for line in request_lines(log_dir)):
        time.sleep(0.5)
    assert not any(marker in line for line in request_lines(log_dir))  # rotated away
    time.sleep(6)                     # one evidence heartbeat after the offender
    agent.proc.kill()                 # SIGKILL: no clean stop, no final write
    agent.proc.wait(10)
    again = agents(log_dir=log_dir, config=small).start()
    time.sleep(1)
    assert again.stop() == 0, again.stderr()[-2000:]
    doc = json.loads((log_dir / "imds-evidence.json").read_text())
    assert [i["stopped"] for i in doc["intervals"][-2:]] == [False, True]
    proc = subprocess.run([PYTHON, "-m", "imds_tracer", "report", "--log-dir", str(log_dir),
                           "--since", "1h", "--json"], capture_output=True, text=True,
                          cwd=REPO, timeout=60)
    data = json.loads(proc.stdout)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert [o["count"] for o in data["offenders"] if o["executable"] == own_curl.name] == [1], \
        data["offenders"]
    assert data["coverage"]["agent_starts"] >= 2


def test_metrics_port_taken_is_a_one_line_error_at_start(agents):
    need_kernel()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        agent = agents(metrics_port=taken.getsockname()[1])
        agent.start(expect_ready=False)
        code = agent.proc.wait(60)
    stderr = agent.stderr()
    assert code != 0
    assert "ready backend=" not in stderr
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("imds-tracer: error:")]
    assert len(errors) == 1 and "metrics" in errors[0], stderr


# -- the same faults through replay ---------------------------------------------------------
def _replay(agent: Agent, pcaps):
    for pcap in pcaps:
        agent.replay_file(str(pcap))
    agent.pipeline.flush(time.time())


def _dropped_log_writes(agent: Agent) -> float:
    return agent.metrics.registry.get_sample_value("imds_tracer_dropped_total",
                                                   {"kind": "log_write"})


def test_replay_metrics_port_taken_is_a_one_line_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        proc = subprocess.run([PYTHON, "-m", "imds_tracer", "replay", str(DATA / "aws.pcap"),
                               "--log-dir", "/tmp/unused-imds-fault-logs",
                               "--metrics-addr", f"127.0.0.1:{port}"],
                              capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("imds-tracer: error: metrics"), proc.stderr
    assert not os.path.exists("/tmp/unused-imds-fault-logs/imds-trace.log")


def test_replay_log_dir_removed_between_files_is_recreated(tmp_path):
    config = Config(log_dir=str(tmp_path / "logs"), metrics_addr=None, console=False)
    agent = Agent(config, metrics=True)
    _replay(agent, [DATA / "aws.pcap"])
    before = len(request_lines(tmp_path / "logs"))
    assert before > 0
    shutil.rmtree(tmp_path / "logs")
    _replay(agent, [DATA / "aliyun.pcap"])
    agent.close()
    assert len(request_lines(tmp_path / "logs")) > 0
    assert (os.stat(tmp_path / "logs").st_mode & 0o777) == 0o700
    assert _dropped_log_writes(agent) == 0


def test_replay_into_a_full_disk_counts_and_recovers(tmp_path):
    with tmpfs(tmp_path / "small", "64k") as small:
        config = Config(log_dir=str(small / "logs"), metrics_addr=None, console=False)
        agent = Agent(config, metrics=True)
        pipeline = agent.pipeline
        # some lines first: the log's last page is partly used, so the disk fills up in the
        # middle of a line (a short write), not only between lines
        _replay(agent, [DATA / "aws.pcap"])
        before = pipeline.requests
        filler = fill(small)
        _replay(agent, [DATA / "aws.pcap", DATA / "aliyun.pcap"])
        assert pipeline.requests > before
        assert _dropped_log_writes(agent) >= 1
        assert pipeline.drop_totals["log_write"] >= 1
        filler.unlink()
        _replay(agent, [DATA / "azure_gcp.pcap"])
        pipeline.flush(time.time() + 60)
        pipeline.close()
        lines = request_lines(small / "logs")
        assert any("azure" in line for line in lines)
        assert any("agent dropped" in line and "log_write=" in line for line in lines)
        # no half-written line glued to the next one: every line is whole
        for line in lines:
            assert whole_line(line), line


# -- the metrics endpoint under a local flood ---------------------------------------------
IDLE_CLIENTS = 1000
IDLE_OPENER = """
import socket, sys, time
port, count = int(sys.argv[1]), int(sys.argv[2])
held = []
deadline = time.monotonic() + 30
while len(held) < count and time.monotonic() < deadline:
    s = socket.socket()
    s.settimeout(2)
    try:
        s.connect(("127.0.0.1", port))  # and never sends a byte
    except OSError:
        s.close()
        continue
    held.append(s)
print("OPEN", len(held), flush=True)
sys.stdin.read()                        # held until the test closes stdin
"""


@contextlib.contextmanager
def idle_connections(port: int, count: int = IDLE_CLIENTS):
    """`count` connections to the metrics port that send nothing, opened by uid 65534 (any
    local user can), held while the block runs; yields how many it could open in 30 s."""
    need_root("switching to uid 65534")
    # the OS interpreter, from /: the checkout and its venv may be closed to other users
    proc = subprocess.Popen([*NOBODY, base_python(), "-c", IDLE_OPENER, str(port), str(count)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd="/")
    try:
        word, opened = proc.stdout.readline().split()
        yield int(opened)
    finally:
        proc.stdin.close()
        proc.wait(10)


def scrape(port: int, timeout: float = 5) -> str:
    import urllib.request
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as resp:
        return resp.read().decode()


def test_idle_connections_do_not_stall_the_replay_metrics_endpoint(tmp_path):
    """No kernel needed: `replay --linger` serves the same endpoint, here with the 1,024-fd
    limit a default unit would have."""
    port = free_port()
    proc = subprocess.Popen(["prlimit", "--nofile=1024:1024", "--", PYTHON, "-m",
                             "imds_tracer", "replay", str(DATA / "aws.pcap"), "--log-dir",
                             str(tmp_path / "logs"), "--metrics-addr", f"127.0.0.1:{port}",
                             "--linger"], stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        for line in proc.stderr:
            if "serving metrics" in line:
                break
        with idle_connections(port) as opened:
            started = time.monotonic()
            text = scrape(port)
            assert time.monotonic() - started < 5
            assert "imds_tracer_requests_total" in text
            assert opened == IDLE_CLIENTS
            assert proc.poll() is None
    finally:
        proc.terminate()
        assert proc.wait(30) == 0


def test_idle_connections_leave_scrapes_and_capture_working(lab, agents):
    agent = agents()
    agent.argv = ["prlimit", "--nofile=1024:1024", "--", *agent.argv]
    agent.start()
    marker = "fault-flood-" + secrets.token_hex(4)
    with idle_connections(agent.port) as opened:
        started = time.monotonic()
        assert "imds_tracer_requests_total" in scrape(agent.port)
        assert time.monotonic() - started < 5
        assert opened == IDLE_CLIENTS
        curl(lab, f"/latest/meta-data/{marker}")
        (record,) = agent.wait_records(marker, 1)
        assert record["pid"] and record["argv"], record   # process lookups still work
    assert agent.alive()
    assert agent.stop() == 0



def test_sighup_with_a_symlink_planted_as_the_log_writes_nothing_through_it(lab, agents,
                                                                           tmp_path):
    agent = agents().start()
    marker = "fault-symlink-" + secrets.token_hex(4)
    curl(lab, f"/latest/meta-data/{marker}/before")
    assert agent.wait_records(marker, 1)
    target = tmp_path / "not-a-log"
    target.write_text("precious\n")
    target.chmod(0o644)
    log = agent.log_dir / "imds-trace.log"
    log.unlink()
    log.symlink_to(target)                   # planted where the agent's log was
    agent.send_signal(signal.SIGHUP)
    time.sleep(0.5)
    curl(lab, f"/latest/meta-data/{marker}/after")
    assert len(agent.wait_records(marker, 2)) == 2
    time.sleep(0.5)                          # a poll or two: the line would be written now
    assert target.read_text() == "precious\n"
    assert (target.stat().st_mode & 0o777) == 0o644
    assert log.is_symlink()
    assert agent.metric("imds_tracer_dropped_total", 'kind="log_write"') >= 1
    assert agent.alive()
    assert agent.stop() == 0


@contextlib.contextmanager
def cpu_starved(pid: int, quota_us: int = 1000, period_us: int = 1_000_000):
    """`pid`, all its threads, gets `quota_us` of CPU time per `period_us`: a host too busy
    to give the agent its share. Its cgroup is a cpu controller's (v1 or v2) of its own,
    removed afterwards (the process goes back where it was)."""
    from imds_tracer.sources.cgroup import cgroup2_root
    mounts = [line.split() for line in Path("/proc/mounts").read_text().splitlines()]
    v1 = next((m[1] for m in mounts if m[2] == "cgroup" and "cpu" in m[3].split(",")), None)
    v2 = cgroup2_root()
    name = f"imds-starved-{secrets.token_hex(4)}"
    if v1 is not None:
        home, group = Path(v1), Path(v1) / name
        limits = {"cpu.cfs_period_us": str(period_us), "cpu.cfs_quota_us": str(quota_us)}
    elif v2 is not None and "cpu" in (Path(v2) / "cgroup.subtree_control").read_text().split():
        home, group = Path(v2), Path(v2) / name
        limits = {"cpu.max": f"{quota_us} {period_us}"}
    else:
        pytest.fail("no cpu controller to starve the agent with")
    line = next(x for x in Path(f"/proc/{pid}/cgroup").read_text().splitlines()
                if (v1 is None and x.startswith("0::"))
                or (v1 is not None and "cpu" in x.split(":")[1].split(",")))
    was = home / line.split(":", 2)[2].lstrip("/")
    group.mkdir()
    try:
        for knob, value in limits.items():
            (group / knob).write_text(value)
        (group / "cgroup.procs").write_text(str(pid))
        yield
    finally:
        with contextlib.suppress(OSError):   # the process may be gone
            (was / "cgroup.procs").write_text(str(pid))
        group.rmdir()


SLOW_SERVER = f"""
import socket, threading, time
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("{AWS_IP}", {SILENT_PORT})); srv.listen(64)
print("READY", flush=True)
def serve(conn):
    f = conn.makefile("rb")
    while True:
        while f.readline() not in (b"\\r\\n", b""):
            pass
        time.sleep(0.5)   # a slow answer, well inside the agent's response_wait
        conn.sendall(b"HTTP/1.1 200 OK\\r\\nContent-Length: 2\\r\\n\\r\\nok")
while True:
    conn, _ = srv.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""


@pytest.mark.parametrize("backend", ["cgroup", "tracepoint"])
def test_an_agent_that_falls_behind_calls_no_answered_request_unanswered(lab, agents,
                                                                       backend):
    # a starved agent reads responses seconds after their requests were sent: each answered
    # in 0.5 s, no request may be logged without its status (a wrong "never answered" is
    # what the fallback finding and the report build on)
    agent = agents(backend=backend).start()
    marker = "fault-starved-" + secrets.token_hex(4)
    client = READ_RESPONSE + (
        "import socket\n"
        f"s = socket.create_connection(('{AWS_IP}', {SILENT_PORT})); f = s.makefile('rb')\n"
        "for i in range(8):\n"
        f"    s.sendall(b'GET /latest/meta-data/{marker}-%02d HTTP/1.1\\r\\nHost: x"
        "\\r\\n\\r\\n' % i)\n"
        "    read_response(f)\n")
    proc = lab.popen([PYTHON, "-c", SLOW_SERVER], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "READY"
        with cpu_starved(agent.proc.pid):
            lab.run([PYTHON, "-c", client], timeout=60, check=True)
            time.sleep(3)   # still starved while the last answers wait in the buffer
    finally:
        proc.kill()
        proc.wait(5)
    records = agent.wait_records(marker, 8, timeout=60)
    assert [(r["path"].rsplit("-", 1)[1], r["status"]) for r in records] == \
        [(f"{i:02d}", 200) for i in range(8)], agent.stderr()[-2000:]
    assert agent.stop() == 0
