"""The shipped logrotate config (packaging/logrotate/imds-tracer) against a live writer.

The writer is the agent's real log writer (imds_tracer.sinks.tracelog.RotatingFile) in its own
process, reopening on SIGHUP as `imds-tracer run` does. logrotate -f runs the shipped config
with only the paths and the signal target changed, so the rotation directives (create, dateext,
sharedscripts) are the ones that ship. Checked: every line written is in exactly one file, and
every line written after the writer handled SIGHUP is in the new imds-trace.log.
The shipped postrotate's process pattern is checked separately, read-only (pgrep), so no
real agent on this machine is signalled.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from imds_tracer.sinks.tracelog import LOG_NAME

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "packaging" / "logrotate" / "imds-tracer"
LOGROTATE = shutil.which("logrotate") or "/usr/sbin/logrotate"

pytestmark = pytest.mark.skipif(not os.path.exists(LOGROTATE),
                                reason="logrotate not installed (apt-get install logrotate)")

WRITER = r"""
import os, signal, sys, time
sys.path.insert(0, sys.argv[2])
from imds_tracer.sinks.files import RotatingFile
out = RotatingFile(sys.argv[1], "imds-trace.log", max_bytes=1 << 30, backups=5)
state = {"hup": 0}
def on_hup(signum, frame):
    out.reopen()
    state["hup"] += 1
signal.signal(signal.SIGHUP, on_hup)
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
n = 0
try:
    while True:
        hup = state["hup"]
        n += 1
        out.write(f"[2026-11-23T00:00:00+00:00] [WARNING] line={n} hup={hup}")
        time.sleep(0.002)
finally:
    out.close()
"""


def _test_config(shipped: str, log_dir: Path, pid: int) -> str:
    text = shipped.replace("/var/log/imds/", f"{log_dir}/")
    body = re.search(r"postrotate\n(.*?)\n\s*endscript", text, re.S)
    assert body, "postrotate ... endscript missing"
    return text.replace(body.group(1), f"\t\tkill -HUP {pid}")


def _lines(log_dir: Path) -> dict[str, list[tuple[int, int]]]:
    found = {}
    for path in sorted(log_dir.iterdir()):
        found[path.name] = [(int(m.group(1)), int(m.group(2))) for m in
                            re.finditer(r"line=(\d+) hup=(\d+)", path.read_text())]
    return found


def test_rotation_loses_nothing_and_new_lines_land_in_new_file(tmp_path):
    log_dir = tmp_path / "imds"
    log_dir.mkdir(mode=0o700)
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(log_dir), str(ROOT)])
    try:
        deadline = time.monotonic() + 10
        while not (log_dir / "imds-trace.log").exists() or \
                (log_dir / "imds-trace.log").stat().st_size < 2000:
            assert writer.poll() is None, "writer died"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        conf = tmp_path / "logrotate.conf"
        conf.write_text(_test_config(SHIPPED.read_text(), log_dir, writer.pid))
        conf.chmod(0o644)
        run = subprocess.run([LOGROTATE, "-f", "-v", "-s", str(tmp_path / "state"), str(conf)],
                             capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stderr
        time.sleep(0.5)          # the writer keeps writing after the rotation
    finally:
        writer.send_signal(signal.SIGTERM)
        writer.wait(timeout=10)
    assert writer.returncode == 0

    files = _lines(log_dir)
    rotated = [name for name in files if name.startswith("imds-trace.log-")]
    assert len(rotated) == 1, files.keys()
    assert re.fullmatch(r"imds-trace\.log-\d{8}-\d+", rotated[0])
    new, old = files["imds-trace.log"], files[rotated[0]]
    assert old and new
    # nothing lost, nothing duplicated, across both files
    numbers = sorted(n for n, _ in old + new)
    assert numbers == list(range(1, numbers[-1] + 1))
    # after the writer handled SIGHUP, every line went to the new file
    assert all(hup == 0 for _, hup in old)
    assert any(hup == 1 for _, hup in new)
    assert max(n for n, _ in old) < min(n for n, hup in new if hup == 1)
    # `create 0600` and the agent's own mode
    for path in log_dir.iterdir():
        assert path.stat().st_mode & 0o777 == 0o600, path


def test_postrotate_pattern_matches_agent_not_itself():
    """The pkill fallback finds `imds-tracer run` (entry point and `python3 -m`), never the
    shell that logrotate runs the script in, whose own command line holds the pattern."""
    found = re.search(r"pkill -HUP -f '([^']+)'", SHIPPED.read_text())
    assert found
    pattern = found.group(1)
    sleeper = "import time; time.sleep(30)"
    # what ps shows for the installed entry point and for the module form
    fakes = [subprocess.Popen([sys.executable, "-c", sleeper, "/usr/bin/imds-tracer", "run",
                               "--config", "/etc/imds-tracer/config.toml"]),
             subprocess.Popen([sys.executable, "-c", sleeper, "-m", "imds_tracer", "run"])]
    try:
        time.sleep(0.3)
        probe = subprocess.run(["sh", "-c", f"echo $$; pgrep -f '{pattern}'"],
                               capture_output=True, text=True, timeout=10)
    finally:
        for fake in fakes:
            fake.kill()
            fake.wait()
    shell, *matched = (int(p) for p in probe.stdout.split())
    assert {f.pid for f in fakes} <= set(matched)
    assert shell not in matched


CLIENT_LOOP = r"""
import sys, time, urllib.request
for i in range(1, int(sys.argv[1]) + 1):
    try:
        urllib.request.urlopen(f"http://169.254.169.254/latest/meta-data/seq-{i}", timeout=5).read()
    except Exception:
        pass   # the fake IMDS answers 404: the request was still sent
    time.sleep(0.05)
"""


@pytest.mark.kernel
def test_rotation_with_the_real_agent(tmp_path, lab_factory):
    """`imds-tracer run` logs a stream of requests while logrotate -f runs the shipped config
    (postrotate: SIGHUP to the agent): every request is logged exactly once, and those sent
    after the rotation are in the new imds-trace.log."""
    from tests.packaging.agent import Agent, agent_command
    from tests.packaging.test_unit import _bcc_usable, _require_kernel

    if reason := _bcc_usable():
        _require_kernel(reason)
    lab = lab_factory()
    agent = Agent(agent_command(tmp_path))
    if not agent.ready:
        status, err = agent.stop()
        pytest.skip(f"the agent does not get ready here: {(err.strip().splitlines() or [status])[-1]}")
    log_dir = tmp_path / "logs"
    total = 80
    try:
        client = lab.popen(["/usr/bin/python3", "-c", CLIENT_LOOP, str(total)])
        deadline = time.monotonic() + 30
        log = log_dir / "imds-trace.log"
        while not log.exists() or log.read_text().count("seq-") < 20:
            assert time.monotonic() < deadline, "the agent logged nothing"
            time.sleep(0.1)
        conf = tmp_path / "logrotate.conf"
        conf.write_text(_test_config(SHIPPED.read_text(), log_dir, agent.proc.pid))
        run = subprocess.run([LOGROTATE, "-f", "-s", str(tmp_path / "state"), str(conf)],
                             capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stderr
        client.wait(timeout=60)
        # everything sent has been logged (or the deadline says what is missing)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            text = "".join(p.read_text() for p in log_dir.iterdir())
            if len(set(re.findall(r"seq-(\d+)", text))) >= total:
                break
            time.sleep(0.2)
    finally:
        status, err = agent.stop()
    assert status == 0, err
    # the trace log and the rotated one (beside them the agent's lock and evidence file)
    logs = [p for p in log_dir.iterdir() if p.name.startswith(LOG_NAME)]
    assert len(logs) == 2, logs
    files = {p.name: [int(n) for n in re.findall(r"seq-(\d+)", p.read_text())]
             for p in logs}
    rotated = [n for n in files if n.startswith("imds-trace.log-")]
    assert len(rotated) == 1, files.keys()
    old, new = files[rotated[0]], files["imds-trace.log"]
    assert sorted(old + new) == list(range(1, total + 1))     # once each, none lost
    assert old and new and max(old) < min(new)                # after the HUP: the new file
    for path in log_dir.iterdir():
        assert path.stat().st_mode & 0o777 == 0o600, path
