"""Files the agent writes: no symlink followed, no chmod of what it did not create, one
writer per log directory, memory-heavy settings bounded, a file as --log-dir named as such.
These run `imds-tracer replay` (the same sinks as `run`) as a user would."""
from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from imds_tracer.config import ConfigError, apply, Config
from imds_tracer.sinks.files import LOCK_NAME
from imds_tracer.sinks.tracelog import TraceLogSink

REPO = Path(__file__).resolve().parents[2]
PCAP = str(REPO / "tests" / "data" / "aws.pcap")


def _replay(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "imds_tracer", "replay", PCAP, *args],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("imds-tracer: error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


def test_a_symlink_planted_as_the_log_is_never_written_through_nor_chmoded(tmp_path):
    target = tmp_path / "target"
    target.write_text("precious\n")
    target.chmod(0o644)
    logs = tmp_path / "logs"
    sink = TraceLogSink(str(logs))
    sink.file.write("before")
    # swapped for a symlink under the running agent, then SIGHUP (reopen)
    os.unlink(logs / "imds-trace.log")
    os.symlink(target, logs / "imds-trace.log")
    sink.reopen()
    assert not sink.file.write("after the swap")    # counted as a failed write
    sink.close()
    assert target.read_text() == "precious\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    # at start-up: a one-line error, nothing written
    proc = _replay("--log-dir", str(logs))
    line = _one_error_line(proc)
    assert "symbolic link" in line and "imds-trace.log" in line
    assert target.read_text() == "precious\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644


def test_files_and_directories_the_agent_did_not_create_keep_their_mode(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir(mode=0o750)
    logs.chmod(0o750)
    (logs / "imds-trace.log").write_text("")
    (logs / "imds-trace.log").chmod(0o640)
    assert _replay("--log-dir", str(logs)).returncode == 0
    assert stat.S_IMODE(logs.stat().st_mode) == 0o750
    assert stat.S_IMODE((logs / "imds-trace.log").stat().st_mode) == 0o640
    assert "normal-mode" in (logs / "imds-trace.log").read_text()
    # what it creates is private
    fresh = tmp_path / "fresh"
    assert _replay("--log-dir", str(fresh)).returncode == 0
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o700
    assert stat.S_IMODE((fresh / "imds-trace.log").stat().st_mode) == 0o600


def test_a_second_agent_on_the_same_log_dir_says_why_and_exits(tmp_path):
    logs = tmp_path / "logs"
    # the first agent: a replay that keeps its log dir while it lingers
    first = subprocess.Popen([sys.executable, "-m", "imds_tracer", "replay", PCAP,
                              "--log-dir", str(logs), "--metrics-addr", "127.0.0.1:0",
                              "--linger"], stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        for line in first.stderr:
            if "serving metrics" in line:
                break
        else:
            pytest.fail("the first replay did not linger")
        before = (logs / "imds-trace.log").read_text()
        line = _one_error_line(_replay("--log-dir", str(logs)))
        assert str(logs) in line and f"pid {first.pid}" in line and LOCK_NAME in line
        assert (logs / "imds-trace.log").read_text() == before   # no line written twice
    finally:
        first.terminate()
        first.wait(30)
    # the lock goes with the agent
    assert _replay("--log-dir", str(logs)).returncode == 0


def test_a_regular_file_as_log_dir_is_named_as_not_a_directory(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("")
    line = _one_error_line(_replay("--log-dir", str(afile)))
    assert line == f"imds-tracer: error: cannot write {afile}: not a directory " \
                   "(--log-dir / log.dir)"


@pytest.mark.parametrize("section, key, value, bound", [
    ("capture", "perf_pages", 65536, "2048"),
    ("capture", "max_payload", 1 << 20, "16384"),
    ("flows", "max_flows", 10_000_000, "262144"),
])
def test_memory_heavy_settings_are_bounded(section, key, value, bound):
    with pytest.raises(ConfigError) as err:
        apply(Config(), {section: {key: value}}, origin="config.toml")
    message = str(err.value)
    assert f"{section}.{key}" in message and bound in message and "\n" not in message


def test_a_bound_too_high_in_the_config_file_is_a_one_line_error(tmp_path):
    conf = tmp_path / "config.toml"
    conf.write_text("[capture]\nperf_pages = 65536\n")
    line = _one_error_line(_replay("--config", str(conf), "--log-dir", str(tmp_path / "l")))
    assert "capture.perf_pages" in line and "2048" in line
