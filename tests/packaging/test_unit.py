"""systemd/imds-tracer.service: it verifies, its exposure score stays at the measured level,
and BCC (and the agent, once it runs here) works inside its sandbox: the capability bounding
set, NoNewPrivileges, MemoryDenyWriteExecute and SystemCallFilter, emulated without systemd
as PID 1 (tests/packaging/sandbox.py). The same emulation shows the capability set is minimal
for BPF: without CAP_BPF or CAP_PERFMON the program does not load or attach.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.packaging import sandbox
from tests.packaging.agent import Agent as _Agent, agent_command as _agent_command

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "imds-tracer.service"
# measured 2026-11-23, systemd 252: 3.0 ("OK"); 3.2 since CAP_NET_ADMIN (+0.2), which the
# cgroup backend needs to load its socket programs (see the unit): without it the agent falls
# back to syscall tracepoints, which slow every syscall of the machine. Lower is better; a
# change that raises it must say why in the unit and here.
MAX_EXPOSURE = 3.2
EXPECTED_CAPS = {"CAP_BPF", "CAP_PERFMON", "CAP_SYS_PTRACE", "CAP_DAC_READ_SEARCH",
                 "CAP_NET_ADMIN"}

needs_analyze = pytest.mark.skipif(not shutil.which("systemd-analyze"),
                                   reason="systemd-analyze not installed (apt-get install systemd)")


def _require_kernel(reason: str):
    if os.environ.get("IMDS_TRACER_REQUIRE_KERNEL") == "1":
        pytest.fail(f"{reason} (IMDS_TRACER_REQUIRE_KERNEL=1)")
    pytest.skip(reason)


@pytest.fixture
def testable_unit(tmp_path) -> Path:
    """The unit with ExecStart pointing at an executable that exists on this machine."""
    stub = tmp_path / "imds-tracer"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    unit = tmp_path / "imds-tracer.service"
    unit.write_text(UNIT.read_text().replace("/usr/bin/imds-tracer", str(stub)))
    return unit


@needs_analyze
def test_verify_clean(testable_unit):
    run = subprocess.run(["systemd-analyze", "verify", "--man=no", str(testable_unit)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "imds-tracer.service" not in run.stderr, run.stderr


@needs_analyze
def test_exposure_score():
    run = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--no-pager",
                          str(UNIT)], capture_output=True, text=True, timeout=60)
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", run.stdout + run.stderr)
    assert found, run.stdout + run.stderr
    assert float(found.group(1)) <= MAX_EXPOSURE, run.stdout


def test_contract_settings():
    s = sandbox.unit_settings(str(UNIT))
    last = {k: v[-1] for k, v in s.items()}
    assert last["Service.Type"] == "notify"
    assert last["Service.ExecStart"] == \
        "/usr/bin/imds-tracer run --config /etc/imds-tracer/config.toml"
    assert last["Service.Restart"] == "on-failure"
    assert set(last["Service.CapabilityBoundingSet"].split()) == EXPECTED_CAPS
    assert last["Service.ProtectSystem"] == "strict"
    assert last["Service.LogsDirectory"] == "imds"
    assert last["Service.LogsDirectoryMode"] == "0700"
    # a bounded fd budget (the metrics endpoint caps its own connections within it)
    assert 4096 <= int(last["Service.LimitNOFILE"]) <= 65536
    for key in ("NoNewPrivileges", "PrivateTmp", "ProtectHome", "LockPersonality",
                "MemoryDenyWriteExecute"):
        assert last[f"Service.{key}"] in ("yes", "true"), key
    assert set(last["Service.RestrictAddressFamilies"].split()) == \
        {"AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"}
    assert "network-online.target" in " ".join(s["Unit.Before"])
    # every exception to the usual hardening is explained where it is made
    text = UNIT.read_text()
    for exception in ("ProtectKernelModules", "ProtectProc", "PrivateUsers", "PrivateNetwork"):
        assert re.search(rf"^# Exception: NOT {exception}", text, re.M), exception


BCC_PROBE = r"""
import socket, sys
from bcc import BPF
text = '''
%s
struct ev { u32 pid; char comm[16]; };
TRACEPOINT_PROBE(syscalls, sys_enter_connect) {
    struct ev e = {};
    e.pid = bpf_get_current_pid_tgid() >> 32;
    bpf_get_current_comm(&e.comm, sizeof(e.comm));
    %s
    return 0;
}
'''
kind = sys.argv[1]
if kind == "perf":
    b = BPF(text=text % ("BPF_PERF_OUTPUT(events);", "events.perf_submit(args, &e, sizeof(e));"))
else:
    b = BPF(text=text % ("BPF_RINGBUF_OUTPUT(events, 16);",
                         "events.ringbuf_output(&e, sizeof(e), 0);"))
got = []
if kind == "perf":
    b["events"].open_perf_buffer(lambda c, d, s: got.append(1), page_cnt=64)
    poll = lambda: b.perf_buffer_poll(timeout=200)
else:
    b["events"].open_ring_buffer(lambda c, d, s: got.append(1))
    poll = lambda: b.ring_buffer_poll(timeout=200)
for _ in range(20):
    s = socket.socket(); s.setblocking(False)
    try: s.connect(("127.0.0.1", 9))
    except OSError: pass
    s.close()
    poll()
    if got: break
print("events", len(got))
sys.exit(0 if got else 3)
"""


def _bcc_usable() -> str | None:
    probe = subprocess.run(["/usr/bin/python3", "-c", "import bcc"], capture_output=True)
    if probe.returncode != 0:
        return "BCC (python3-bpfcc) not importable from /usr/bin/python3"
    return sandbox.available()


@pytest.mark.kernel
@pytest.mark.parametrize("kind", ["perf", "ring"])
def test_bcc_tracepoint_loads_in_unit_sandbox(kind, tmp_path):
    if reason := _bcc_usable():
        _require_kernel(reason)
    unit = str(UNIT)
    run = subprocess.run(sandbox.wrap(unit, ["/usr/bin/python3", "-c", BCC_PROBE, kind]),
                         capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stdout + run.stderr


@pytest.mark.kernel
@pytest.mark.parametrize("drop", ["CAP_BPF", "CAP_PERFMON"])
def test_capability_set_is_minimal_for_bpf(drop, tmp_path):
    if reason := _bcc_usable():
        _require_kernel(reason)
    unit = tmp_path / "imds-tracer.service"
    unit.write_text(re.sub(rf"^(CapabilityBoundingSet=.*?){drop}\b", r"\1", UNIT.read_text(),
                           flags=re.M))
    run = subprocess.run(sandbox.wrap(str(unit), ["/usr/bin/python3", "-c", BCC_PROBE, "perf"]),
                         capture_output=True, text=True, timeout=180)
    assert run.returncode != 0, f"BCC still works without {drop}: drop it from the unit"


@pytest.fixture(scope="module")
def agent_usable(tmp_path_factory):
    """Skip while the agent cannot get ready here even without the sandbox."""
    if reason := _bcc_usable():
        _require_kernel(reason)
    workdir = tmp_path_factory.mktemp("plain")
    plain = _Agent(_agent_command(workdir))
    status, err = plain.stop()
    if not plain.ready:
        pytest.skip("the agent does not get ready here even without the sandbox: "
                    f"{(err.strip().splitlines() or [str(status)])[-1]}")


CLIENT = ("import time, urllib.request; "
          "urllib.request.urlopen('http://169.254.169.254/latest/meta-data/instance-id', "
          "timeout=5).read(); time.sleep(1.5)")


@pytest.mark.kernel
@pytest.mark.parametrize("without,backend", [(None, "auto"), ("CAP_SYS_PTRACE", "auto"),
                                             ("CAP_NET_ADMIN", "auto"), (None, "tracepoint")])
def test_agent_runs_in_unit_sandbox(without, backend, agent_usable, tmp_path, lab_factory):
    """The real agent (as the unit runs it: --backend auto, which picks cgroup here; and the
    tracepoint backend) inside the unit's sandbox gets ready, records a
    normal-mode request of another user's process with argv, parents and executable, and
    exits 0 on SIGTERM. Without CAP_SYS_PTRACE it still runs but cannot read the executable
    of other users' processes (/proc/PID/exe): the reason that capability is in the set."""
    unit = tmp_path / "imds-tracer.service"
    text = UNIT.read_text()
    if without:
        text = re.sub(rf"^(CapabilityBoundingSet=.*?){without}\b", r"\1", text, flags=re.M)
    unit.write_text(text)
    lab = lab_factory()
    boxed = _Agent(sandbox.wrap(str(unit), _agent_command(tmp_path, backend)))
    records = []
    try:
        assert boxed.ready, "".join(boxed.err)
        # without CAP_NET_ADMIN the cgroup programs do not load: the reason it is in the set
        want = "tracepoint" if backend == "tracepoint" or without == "CAP_NET_ADMIN" \
            else "cgroup"
        assert f"ready backend={want} " in "".join(boxed.err)
        # after the load the agent keeps CAP_SYS_PTRACE (and CAP_BPF where the kernel checks
        # bpf() map calls): not the rest of the unit's set, which only the loader used
        status = dict(line.split(":\t", 1) for line in
                      open(f"/proc/{boxed.proc.pid}/status").read().splitlines() if ":\t" in line)
        kept = int(status["CapEff"], 16)
        assert kept == int(status["CapPrm"], 16) and status["NoNewPrivs"].strip() == "1"
        assert kept & ~(1 << 19 | 1 << 39) == 0, status["CapEff"]   # CAP_SYS_PTRACE, CAP_BPF
        assert bool(kept >> 19 & 1) == (without != "CAP_SYS_PTRACE")
        client = lab.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                          "sh", "-c", f'/usr/bin/python3 -c "{CLIENT}"; sleep 0.3'])
        assert client.returncode == 0, client.stderr
        deadline = time.monotonic() + 15
        jsonl = tmp_path / "requests.jsonl"
        while time.monotonic() < deadline and not records:
            time.sleep(0.3)
            if jsonl.exists():
                records = [r for r in (json.loads(line) for line in
                                       jsonl.read_text().splitlines() if line.strip())
                           if r.get("comm", "").startswith("python")]
    finally:
        status, err = boxed.stop()
    assert status == 0, err
    assert "Traceback" not in err, err
    assert records, err
    record = records[0]
    assert record["mode"] == "normal" and record["provider"] == "aws"
    assert record["uid"] == 65534
    assert record["argv"][:2] == ["/usr/bin/python3", "-c"]
    assert record["parents"] and record["parents"][0]["comm"] == "sh"
    assert "WARNING" in (tmp_path / "logs" / "imds-trace.log").read_text()
    if without == "CAP_SYS_PTRACE":
        assert record["exe"] is None
    else:
        assert record["exe"] and record["exe"].startswith("/usr/bin/python3")
