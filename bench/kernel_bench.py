"""The live agent's cost and limits (`imds-tracer run --backend B`, root + BPF):

- overhead: unrelated write/send-heavy workloads on loopback, without the agent and with it
  on each backend (cgroup and tracepoint), interleaved rounds, best of each, in CPU seconds
  of the workload process (user + system, where BPF programs run):
  (a) a Python TCP client sending 64-byte messages to a local server, (b) `dd bs=512` to
  /dev/null (pure syscalls: the worst case for any syscall-tracepoint tool);
- latency: sequential requests (new connection each, like curl) to the fake IMDS in a lab
  namespace, with vs. without the agent: p50/p99 per request and what the agent adds;
- capacity: (1) N concurrent clients as fast as they go against the fake IMDS: rate and the
  share logged; (2) open-loop steps of rising request rates (connect, send, close) to a
  draining listener in the namespace: the highest rate at which 100% is logged, and above it
  what was lost and whether it was counted (imds_tracer_lost_events_total);
- start-up and memory, side by side in one run: this checkout's agent, the agent of
  --before REF (default main, exported with `git archive`) and, where it can be run, the AWS
  analyzer (aws-imds-packet-analyzer's imds_snoop.py, from a copy in
  /var/cache/imds-tracer-lab/aws-analyzer; --aws-analyzer DIR): seconds from exec to ready
  (one after the other), then RSS after --idle seconds and after a flood (all at once, the same
  flood), the effective capabilities and whether libLLVM / libclang / libbcc are mapped; for
  this checkout also where the loader's time went (interpreter, bcc import, compile flags,
  compile + load, attach, hand-over).

Latency, capacity and start-up run the backend of --backend (default cgroup, the one
`--backend auto` picks where it can run).

Prints one JSON object. Traffic goes only to loopback and to the lab namespace, which is
removed afterwards; only processes this script started are stopped.

    sudo .venv/bin/python bench/kernel_bench.py [--idle 60] [--quick] [--backend cgroup]
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import platform
import resource
import secrets
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.lab.agent import AgentProcess  # noqa: E402  (needs REPO on sys.path)

PYTHON = sys.executable     # the interpreter this runs on runs the agent and the workloads
AWS_IP = "169.254.169.254"
DRAIN_PORT = 8080
BACKEND = "cgroup"          # set from --backend
OVERHEAD_BACKENDS = ("cgroup", "tracepoint")
BACKENDS = ("auto", "cgroup", "kprobe", "tracepoint")


@contextlib.contextmanager
def running_agent(tmp: Path, config: str = "", backend: str | None = None,
                  cwd: Path = REPO) -> Iterator[AgentProcess]:
    """The agent (also capturing DRAIN_PORT) while the block runs: 120 s to get ready (else
    the bench stops with its stderr), then 0.5 s to settle; SIGTERM afterwards (killed after
    30 s)."""
    agent = AgentProcess(tmp, config=f"[capture]\nports = [80, {DRAIN_PORT}]\n{config}",
                         python=PYTHON, backend=backend or BACKEND, cwd=cwd)
    try:
        agent.start(timeout=120)
    except AssertionError as exc:
        raise SystemExit(f"agent failed: {exc}") from None
    time.sleep(0.5)
    try:
        yield agent
    finally:
        with contextlib.suppress(subprocess.TimeoutExpired):
            agent.stop(timeout=30)


# -- workloads -----------------------------------------------------------------------------
TCP_WORKLOAD = """
import socket, sys
n = int(sys.argv[1])
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(1)
s = socket.create_connection(srv.getsockname())
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)   # one packet per send
c, _ = srv.accept()
msg = b"x" * 64
for i in range(n):
    s.send(msg)
    if i % 64 == 63:    # one thread drains as it goes: no scheduler in the measurement
        want = 64 * 64
        while want > 0:
            want -= len(c.recv(want))
"""


def _child_cpu(argv) -> float:
    """Run argv; the CPU seconds (user + system) it used. The kernel's work on its syscalls,
    BPF programs included, is its system time; unlike wall time this hardly moves when other
    sessions load the shared machine."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(argv, capture_output=True, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def tcp_workload(n: int) -> float:
    return _child_cpu([PYTHON, "-c", TCP_WORKLOAD, str(n)])


def dd_workload(n: int) -> float:
    return _child_cpu(["dd", "if=/dev/zero", "of=/dev/null", "bs=512", f"count={n}"])


def overhead(tmp: Path, rounds: int, n_tcp: int, n_dd: int, backends=OVERHEAD_BACKENDS) -> dict:
    """Each round runs the workload without the agent, then under each backend in turn. Best
    and median of the rounds; then, per backend, one more run with the kernel's BPF run-time
    statistics on (`program_ns`): the time spent inside our programs, measured in the kernel
    rather than inferred from a noisy difference."""
    result = {}
    for name, fn, n in (("python_tcp_send_64B", tcp_workload, n_tcp),
                        ("dd_write_512B", dd_workload, n_dd)):
        times: dict[str, list[float]] = {"without": [], **{b: [] for b in backends}}
        fn(n // 10)  # warm caches
        for i in range(rounds):
            times["without"].append(fn(n))
            for backend in backends:
                with running_agent(tmp / f"ov-{name}-{backend}-{i}", backend=backend):
                    times[backend].append(fn(n))
        base, base_median = min(times["without"]), statistics.median(times["without"])
        entry = {"syscalls": n, "cpu_without_s": round(base, 3),
                 "all_cpu_without_s": [round(x, 3) for x in times["without"]]}
        for backend in backends:
            traced, median = min(times[backend]), statistics.median(times[backend])
            entry[backend] = {"cpu_with_s": round(traced, 3),
                              "overhead_pct": round((traced / base - 1) * 100, 2),
                              "overhead_pct_median": round((median / base_median - 1) * 100, 2),
                              "ns_per_syscall_added": round((traced - base) / n * 1e9, 1),
                              "all_cpu_with_s": [round(x, 3) for x in times[backend]],
                              "program_ns": program_cost(tmp / f"st-{name}-{backend}",
                                                         backend, fn, n)}
        result[name] = entry
    return result


def overhead_bracketed(tmp: Path, rounds: int, n_tcp: int, n_dd: int, backend: str) -> dict:
    """The same workloads with one agent start (for guests under qemu/TCG, where a start is
    a minute of BCC compiling): `rounds` runs without the agent, `rounds` with it, `rounds`
    without again; the best with against the best of both brackets without."""
    workloads = (("python_tcp_send_64B", tcp_workload, n_tcp), ("dd_write_512B", dd_workload, n_dd))
    times = {name: {"without": [], "with": []} for name, _, _ in workloads}

    def measure(key: str) -> None:
        for name, fn, n in workloads:
            times[name][key] += [fn(n) for _ in range(rounds)]

    for _, fn, n in workloads:
        fn(n // 10)  # warm caches
    measure("without")
    with running_agent(tmp / "bracket", backend=backend) as agent:
        picked = agent.ready_line.split()[1].split("=")[1]
        measure("with")
    measure("without")
    result = {"backend": picked, "method": f"bracketed: {rounds} without, {rounds} with, "
                                           f"{rounds} without; best of each"}
    for name, fn, n in workloads:
        base, traced = min(times[name]["without"]), min(times[name]["with"])
        result[name] = {"syscalls": n, "cpu_without_s": round(base, 3),
                        "cpu_with_s": round(traced, 3),
                        "overhead_pct": round((traced / base - 1) * 100, 2),
                        "all_cpu_without_s": [round(x, 3) for x in times[name]["without"]],
                        "all_cpu_with_s": [round(x, 3) for x in times[name]["with"]]}
    return result


def _program_stats() -> dict[int, tuple[str, int, int]]:
    """id -> (name, run_time_ns, run_cnt) of every loaded BPF program."""
    out = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True,
                         check=True).stdout
    return {p["id"]: (p.get("name", "?"), p.get("run_time_ns", 0), p.get("run_cnt", 0))
            for p in json.loads(out)}


def program_cost(tmp: Path, backend: str, fn, n: int) -> dict:
    """Run the workload under the agent with kernel.bpf_stats_enabled=1: per program of this
    agent, runs, ns per run, and their total as a share of the workload's CPU time. (The
    statistics add two clock reads per run, so this is an upper bound; the syscall slow path
    that tracepoints force on every syscall is not inside any program and not counted.)"""
    sysctl = Path("/proc/sys/kernel/bpf_stats_enabled")
    before_ids = set(_program_stats())
    with running_agent(tmp, backend=backend):
        ours = set(_program_stats()) - before_ids
        saved = sysctl.read_text().strip()
        sysctl.write_text("1")
        try:
            start = _program_stats()
            cpu = fn(n)
            end = _program_stats()
        finally:
            sysctl.write_text(saved)
    per_program, total_ns = {}, 0
    for pid in sorted(ours & set(end)):   # the programs that came with this agent
        name, ns, cnt = end[pid]
        ns -= start.get(pid, (name, 0, 0))[1]
        cnt -= start.get(pid, (name, 0, 0))[2]
        if cnt:
            per_program[name] = {"runs": cnt, "ns_per_run": round(ns / cnt, 1)}
            total_ns += ns
    return {"programs": per_program, "total_ms": round(total_ns / 1e6, 2),
            "share_of_workload_cpu_pct": round(total_ns / 1e9 / cpu * 100, 2)}


SYS_BPF = {"x86_64": 321, "aarch64": 280}
BPF_PROG_TEST_RUN, BPF_PROG_GET_FD_BY_ID = 10, 13


def _bpf(cmd: int, attr: bytes) -> tuple[int, bytes]:
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(attr, 128)
    ret = libc.syscall(SYS_BPF[platform.machine()], cmd, buf, 128)
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret, buf.raw


def _test_run_ns(prog_fd: int, packet: bytes, repeat: int) -> int:
    """BPF_PROG_TEST_RUN: the kernel runs the program `repeat` times on `packet` and reports
    the mean ns per run (the loop's own cost included)."""
    data_in = ctypes.create_string_buffer(packet, len(packet))
    data_out = ctypes.create_string_buffer(len(packet) + 256)
    attr = struct.pack("=IIIIQQII", prog_fd, 0, len(packet), len(data_out),
                       ctypes.addressof(data_in), ctypes.addressof(data_out), repeat, 0)
    _, raw = _bpf(BPF_PROG_TEST_RUN, attr)
    return struct.unpack_from("=IIIIQQII", raw)[7]


def packet_program_cost(tmp: Path, repeat: int = 1_000_000, rounds: int = 3) -> dict:
    """The cgroup backend's per-packet cost on unrelated traffic, measured in the kernel:
    its egress and ingress programs test-run (BPF_PROG_TEST_RUN) on a 64-byte TCP packet to
    an unwatched port, next to a program that only returns (the harness's own cost). Best of
    `rounds` runs of `repeat` each."""
    from bcc import BPF  # noqa: WPS433 - root + BCC only
    eth = b"\0" * 12 + b"\x08\x00"
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40 + 64, 0, 0, 64, 6, 0,
                     bytes([127, 0, 0, 1]), bytes([127, 0, 0, 1]))
    tcp = struct.pack("!HHIIBBHHH", 40000, 5000, 1, 0, 5 << 4, 0x18, 65535, 0, 0)
    packet = eth + ip + tcp + b"x" * 64
    noop = BPF(text=b"int noop(struct __sk_buff *skb) { return 1; }")
    try:
        fn = noop.load_func(b"noop", BPF.CGROUP_SKB)
        base = min(_test_run_ns(fn.fd, packet, repeat) for _ in range(rounds))
    finally:
        noop.cleanup()
    before = set(_program_stats())
    out = {"noop_ns": base}
    with running_agent(tmp, backend="cgroup"):
        for prog_id, (name, _ns, _cnt) in _program_stats().items():
            if prog_id in before or name not in ("imds_egress", "imds_ingress"):
                continue
            fd, _ = _bpf(BPF_PROG_GET_FD_BY_ID, struct.pack("=I", prog_id))
            try:
                out[f"{name}_ns"] = min(_test_run_ns(fd, packet, repeat) for _ in range(rounds))
            finally:
                os.close(fd)
    return out


LATENCY_CLIENT = """
import http.client, json, sys, time
n, marker = int(sys.argv[1]), sys.argv[2]
times = []
for i in range(n):
    t = time.perf_counter()
    c = http.client.HTTPConnection("169.254.169.254", 80, timeout=5)
    c.request("GET", f"/latest/meta-data/{marker}/{i}")
    c.getresponse().read()
    c.close()
    times.append(time.perf_counter() - t)
times.sort()
print(json.dumps({"p50": times[len(times) // 2], "p99": times[int(len(times) * 0.99)],
                  "mean": sum(times) / len(times)}))
"""


def latency(lab, tmp: Path, n: int, rounds: int) -> dict:
    def run(marker):
        out = lab.run([PYTHON, "-c", LATENCY_CLIENT, str(n), marker], timeout=300, check=True)
        return json.loads(out.stdout)
    without, with_agent, logged = [], [], []
    run("warm")
    for r in range(rounds):
        without.append(run(f"lat-off-{r}"))
        with running_agent(tmp / f"lat-{r}") as agent:
            marker = f"lat-on-{secrets.token_hex(3)}"
            with_agent.append(run(marker))
            time.sleep(3)
            logged.append(agent.count(marker))
    base = min(without, key=lambda x: x["p50"])
    traced = min(with_agent, key=lambda x: x["p50"])
    ms = lambda x: round(x * 1000, 3)  # noqa: E731
    return {"requests": n, "without_ms": {k: ms(v) for k, v in base.items()},
            "with_ms": {k: ms(v) for k, v in traced.items()},
            "added_p50_ms": ms(traced["p50"] - base["p50"]),
            "added_mean_ms": ms(traced["mean"] - base["mean"]),
            "logged": logged, "expected_each": n}


DRAIN_SERVER = f"""
import socket, threading
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("{AWS_IP}", {DRAIN_PORT})); srv.listen(4096)
print("READY", flush=True)
def drain(c):
    try:
        while c.recv(65536):
            pass
    except OSError:
        pass  # the load generator closes with RST on purpose
    finally:
        c.close()
while True:
    c, _ = srv.accept()
    threading.Thread(target=drain, args=(c,), daemon=True).start()
"""

OPEN_LOOP = f"""
import socket, struct, sys, time
rate, seconds, marker = float(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
failed = 0
req = ("GET /latest/meta-data/%s/%d HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n")
sent, start = 0, time.perf_counter()
while True:
    now = time.perf_counter() - start
    if now >= seconds:
        break
    due = int(now * rate) + 1
    while sent < due:
        s = socket.socket()
        # close with RST: no TIME_WAIT, so thousands of connections a second do not run
        # out of local ports
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        try:
            s.connect(("{AWS_IP}", {DRAIN_PORT}))
            s.sendall((req % (marker, sent)).encode())
            sent += 1
        except OSError:
            failed += 1
            due -= 1
        finally:
            s.close()
    time.sleep(0.0005)
print(sent, time.perf_counter() - start, failed)
"""

CLOSED_LOOP = """
import http.client, sys, time
seconds, marker = float(sys.argv[1]), sys.argv[2]
n, start = 0, time.perf_counter()
while time.perf_counter() - start < seconds:
    c = http.client.HTTPConnection("169.254.169.254", 80, timeout=5)
    c.request("GET", f"/latest/meta-data/{marker}/{n}")
    c.getresponse().read()
    c.close()
    n += 1
print(n)
"""


def capacity(lab, tmp: Path, clients: int, rates: list[int], seconds: float) -> dict:
    out = {}
    with running_agent(tmp / "cap") as agent:
        # (1) closed loop against the fake IMDS
        marker = "cap-fake-" + secrets.token_hex(3)
        procs = [lab.popen([PYTHON, "-c", CLOSED_LOOP, str(seconds), f"{marker}-{i}"],
                           stdout=subprocess.PIPE, text=True) for i in range(clients)]
        sent = sum(int(p.communicate(timeout=seconds + 60)[0]) for p in procs)
        time.sleep(4)
        got = agent.count(marker)
        out["fake_imds_closed_loop"] = {"clients": clients, "seconds": seconds,
                                        "requests": sent, "rate_per_s": round(sent / seconds),
                                        "logged": got,
                                        "logged_pct": round(100 * got / max(1, sent), 2)}
        # (2) open loop steps to a draining listener
        server = lab.popen([PYTHON, "-c", DRAIN_SERVER], stdout=subprocess.PIPE, text=True)
        assert server.stdout.readline().strip() == "READY"
        steps = []
        try:
            for rate in rates:
                marker = f"cap-{rate}-{secrets.token_hex(3)}"
                lost_before = agent.metric("imds_tracer_lost_events_total", 'stage="kernel"')
                per = rate / 2
                procs = [lab.popen([PYTHON, "-c", OPEN_LOOP, str(per), str(seconds),
                                    f"{marker}-{i}"], stdout=subprocess.PIPE, text=True)
                         for i in range(2)]
                results = [p.communicate(timeout=seconds + 120)[0].split() for p in procs]
                if not all(results):
                    steps.append({"target_per_s": rate, "error": "load generator failed"})
                    break
                sent = sum(int(r[0]) for r in results)
                took = max(float(r[1]) for r in results)
                deadline = time.monotonic() + 30
                got, last = 0, -1
                while time.monotonic() < deadline:
                    got = agent.count(marker)
                    if got >= sent or got == last:
                        if got >= sent:
                            break
                        time.sleep(3)
                        if agent.count(marker) == got:
                            break
                    last = got
                    time.sleep(1)
                lost = agent.metric("imds_tracer_lost_events_total", 'stage="kernel"') - \
                    lost_before
                steps.append({"target_per_s": rate, "achieved_per_s": round(sent / took),
                              "sent": sent, "logged": got,
                              "logged_pct": round(100 * got / max(1, sent), 2),
                              "kernel_events_lost_counted": int(lost),
                              "agent_alive": agent.proc.poll() is None})
                if got < sent and sent / took < rate * 0.7:
                    break  # the load generator itself is saturated
        finally:
            server.kill()
            server.wait()
        full = [s["achieved_per_s"] for s in steps
                if "error" not in s and s["logged"] >= s["sent"]]
        out["open_loop_steps"] = steps
        out["max_rate_fully_logged_per_s"] = max(full) if full else None
    return out


AWS_ANALYZER = Path("/var/cache/imds-tracer-lab/aws-analyzer/src")
MAPPED_COMPILERS = ("libLLVM", "libclang", "libbcc")


def process_facts(pid: int) -> dict:
    """RSS, effective capabilities (of every thread) and compiler libraries mapped."""
    status = Path(f"/proc/{pid}/status").read_text()
    field = lambda name: next(line.split()[1] for line in status.splitlines()  # noqa: E731
                              if line.startswith(name + ":"))
    threads = sorted({Path(f"/proc/{pid}/task/{t}/status").read_text().split("CapEff:")[1]
                      .split()[0] for t in os.listdir(f"/proc/{pid}/task")})
    maps = Path(f"/proc/{pid}/maps").read_text()
    return {"rss_mib": round(int(field("VmRSS")) / 1024, 1),
            "rss_anon_file_shmem_mib": [round(int(field(f)) / 1024, 1)
                                        for f in ("RssAnon", "RssFile", "RssShmem")],
            "cap_eff": field("CapEff"),
            "cap_eff_threads": threads,
            "compiler_libs_mapped": sorted({lib for lib in MAPPED_COMPILERS if lib in maps})}


@contextlib.contextmanager
def aws_analyzer(where: Path) -> Iterator[dict]:
    """The AWS analyzer (imds_snoop.py, BCC kprobes on sock_sendmsg, Python 3 with BCC) in a
    private mount namespace whose /var/log is a tmpfs (it writes /var/log/imds), while the
    block runs: {"pid", "ready_seconds"} or {"error"}. On a kernel without kprobes it attaches
    nothing (it logs that and keeps running): its start-up and memory are still its own."""
    if not (where / "imds_snoop.py").is_file():
        yield {"error": f"not found: {where}/imds_snoop.py (git archive of "
                        "github.com/aws/aws-imds-packet-analyzer's src/)"}
        return
    started = time.monotonic()
    proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                             "mount -t tmpfs none /var/log && exec /usr/bin/python3 -u "
                             "imds_snoop.py"], cwd=where, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    out = {"pid": proc.pid}
    try:
        for line in proc.stdout:
            if "Starting ImdsPacketAnalyzer" in line:
                out["ready_seconds"] = round(time.monotonic() - started, 2)
                break
        else:
            out["error"] = f"exited with {proc.wait()} before it was ready"
        yield out
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def export_ref(ref: str, into: Path) -> Path:
    """`git archive REF` of this repository unpacked into `into` (an agent runs from it)."""
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", ref], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def startup_and_memory(lab, tmp: Path, idle: float, before: str,
                       analyzer: Path = AWS_ANALYZER, starts: int = 3) -> dict:
    runs = {"after": REPO, f"before ({before})": export_ref(before, tmp / "before")}
    out: dict = {label: {"ready_seconds_runs": []} for label in runs}
    for i in range(starts):   # alternating, one at a time: the machine's noise hits both
        for label, cwd in runs.items():
            with running_agent(tmp / f"start-{label[:6]}-{i}", cwd=cwd) as agent:
                out[label]["ready_seconds_runs"].append(round(agent.ready_seconds, 2))
    for label in runs:
        times = out[label]["ready_seconds_runs"]
        if times:
            out[label]["ready_seconds_min"] = min(times)
            out[label]["ready_seconds_median"] = statistics.median(times)
    with contextlib.ExitStack() as stack:
        agents = {}
        for label, cwd in runs.items():   # one after the other: ready times not contended
            agent = stack.enter_context(running_agent(tmp / f"mem-{label[:6]}", cwd=cwd))
            agents[label] = agent.proc.pid
            loaded = [line for line in agent.stderr().splitlines() if "loaded in" in line]
            out[label].update({"ready_seconds": round(agent.ready_seconds, 2),
                               "at_ready": process_facts(agent.proc.pid)})
            if loaded:
                out[label]["loader"] = loaded[0].split("INFO: ", 1)[-1]
        aws = stack.enter_context(aws_analyzer(analyzer))
        if "error" in aws:
            out["aws_analyzer"] = {"error": aws["error"]}
        else:
            agents["aws_analyzer"] = aws["pid"]
            out["aws_analyzer"] = {"ready_seconds": aws["ready_seconds"],
                                   "at_ready": process_facts(aws["pid"]),
                                   "note": "kprobes on sock_sendmsg: attaches nothing on a "
                                           "kernel without CONFIG_KPROBES, sees no request"}
        time.sleep(idle)
        for label, pid in agents.items():
            out[label]["idle"] = process_facts(pid)
        out["idle_seconds"] = idle
        marker = "mem-flood-" + secrets.token_hex(3)
        server = lab.popen([PYTHON, "-c", DRAIN_SERVER], stdout=subprocess.PIPE, text=True)
        try:
            assert server.stdout.readline().strip() == "READY"
            procs = [lab.popen([PYTHON, "-c", OPEN_LOOP, "3000", "10", f"{marker}-{i}"],
                               stdout=subprocess.PIPE, text=True) for i in range(2)]
            out["flood_requests"] = sum(int(p.communicate(timeout=180)[0].split()[0])
                                        for p in procs)
        finally:
            server.kill()
            server.wait()
        time.sleep(5)
        for label, pid in agents.items():
            out[label]["after_flood"] = process_facts(pid)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--idle", type=float, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="smaller workloads (smoke run)")
    parser.add_argument("--only", choices=("overhead", "latency", "capacity", "startup"),
                        action="append")
    parser.add_argument("--backend", choices=BACKENDS, default="cgroup",
                        help="backend for latency, capacity and start-up (default cgroup)")
    parser.add_argument("--before", default="main",
                        help="git ref whose agent start-up and memory are shown beside this one's")
    parser.add_argument("--starts", type=int, default=3,
                        help="agent starts per side for the ready time (alternating)")
    parser.add_argument("--aws-analyzer", type=Path, default=AWS_ANALYZER,
                        help="directory holding the AWS analyzer's imds_snoop.py and bpf.c")
    parser.add_argument("--bracket", action="store_true",
                        help="overhead of --backend only, with one agent start (qemu guests)")
    args = parser.parse_args(argv)
    global BACKEND
    BACKEND = args.backend
    if os.geteuid() != 0:
        print(json.dumps({"bench": "kernel", "skipped": "needs root and BPF"}))
        return 0
    from tests.lab import netns
    only = set(args.only or ("overhead", "latency", "capacity", "startup"))
    quick = args.quick
    tmp = Path(tempfile.mkdtemp(prefix="imds-kernel-bench-"))
    result: dict = {"bench": "kernel", "kernel": os.uname().release,
                    "cpus": os.cpu_count(), "backend": BACKEND}
    try:
        if "overhead" in only and args.bracket:
            result["overhead"] = overhead_bracketed(tmp, args.rounds, 20_000 if quick else 400_000,
                                                    100_000 if quick else 2_000_000, BACKEND)
        elif "overhead" in only:
            result["overhead"] = overhead(tmp, args.rounds, 50_000 if quick else 400_000,
                                          200_000 if quick else 2_000_000)
            cost = packet_program_cost(tmp / "test-run")
            tcp = result["overhead"]["python_tcp_send_64B"]
            per_send_ns = tcp["cpu_without_s"] / tcp["syscalls"] * 1e9
            # each 64-byte send is one packet out and one in: both programs run once
            both = cost.get("imds_egress_ns", 0) + cost.get("imds_ingress_ns", 0)
            cost["workload_ns_per_send"] = round(per_send_ns, 1)
            cost["share_of_a_send_pct"] = round(both / per_send_ns * 100, 2)
            cost["share_of_a_send_pct_minus_harness"] = round(
                (both - 2 * cost["noop_ns"]) / per_send_ns * 100, 2)
            result["overhead"]["cgroup_packet_programs"] = cost
        if only & {"latency", "capacity", "startup"}:
            with netns.Lab(mode="optional") as lab:
                if "latency" in only:
                    result["latency"] = latency(lab, tmp, 100 if quick else 500, args.rounds)
                if "capacity" in only:
                    result["capacity"] = capacity(
                        lab, tmp, clients=8, seconds=3 if quick else 5,
                        rates=[250, 1000] if quick else [250, 500, 1000, 2000, 4000, 8000])
                if "startup" in only:
                    result["startup_memory"] = startup_and_memory(
                        lab, tmp, 5 if quick else args.idle, args.before, args.aws_analyzer,
                        1 if quick else args.starts)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
