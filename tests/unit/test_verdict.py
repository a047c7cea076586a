"""The verdict means what it says (issue 10, defect 2): the agent's evidence file outlives
rotated lines and restarts, and `report` exits 0 only for a whole, gap-free, loss-free watch
with no normal-mode request; 3 when it saw none but cannot vouch for the window; 1 not safe.

The agent side is the real pipeline (`agent.Agent`, the sinks `run` uses, the evidence sink)
fed by real captures (tests/data); times of the watch are set through the sink's clock
arguments, as a 14-day run cannot be waited for.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from imds_tracer import evidence, verdict
from imds_tracer.agent import Agent
from imds_tracer.config import Config

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data"
DAY = 86400.0


def report(log_dir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "imds_tracer", "report", "--log-dir",
                           str(log_dir), *args], capture_output=True, text=True, timeout=60,
                          cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))


def watch(log_dir: Path, pcaps=(), *, start: float, end: float, drops=None,
          max_bytes: int = 1024 * 1024, backups: int = 5, stopped: bool = True):
    """One run of the agent's pipeline from `start` to `end` (epoch seconds): the trace log
    as `run` writes it, the evidence sink as `run` adds it; captures replayed through it."""
    config = Config(log_dir=str(log_dir), log_max_bytes=max_bytes, log_backups=backups,
                    cloud="none")
    agent = Agent(config)
    pipeline = agent.pipeline
    sink = evidence.EvidenceSink(str(log_dir), now=start)
    pipeline.sinks.append(sink)
    for pcap in pcaps:
        agent.replay_file(str(pcap))
    for kind, count in (drops or {}).items():
        pipeline.drop(kind, count)
    pipeline.flush(end)
    if stopped:
        pipeline.close()
        sink.current["last"] = end
        sink.write(end)
    else:  # killed: nothing after its last heartbeat
        sink.current["last"] = end
        sink.write(end)
        pipeline.sinks.remove(sink)
        pipeline.close()
    return sink


def test_empty_log_dir_is_not_safe_to_call_safe(tmp_path):
    (tmp_path / "imds-trace.log").write_text("")
    proc = report(tmp_path)
    assert proc.returncode == verdict.EXIT_UNSURE, proc.stdout + proc.stderr
    assert "NOT ENOUGH EVIDENCE" in proc.stdout and "SAFE to" not in proc.stdout
    empty = tmp_path / "empty"
    empty.mkdir()
    assert report(empty).returncode == verdict.EXIT_UNSURE


def test_a_whole_quiet_watch_is_safe(tmp_path):
    now = time.time()
    watch(tmp_path, [DATA / "azure_gcp.pcap"], start=now - 15 * DAY, end=now)
    proc = report(tmp_path, "--since", "14d")
    assert proc.returncode == verdict.EXIT_SAFE, proc.stdout + proc.stderr
    assert "SAFE to enforce" in proc.stdout


def test_a_watch_shorter_than_the_window_or_with_a_gap_or_losses_is_not_enough(tmp_path):
    now = time.time()
    short = tmp_path / "short"
    watch(short, start=now - 2 * DAY, end=now)
    proc = report(short, "--since", "14d")
    assert proc.returncode == verdict.EXIT_UNSURE, proc.stdout
    assert re.search(r"did not watch (11d2[0-9]h|12d) of the window", proc.stdout)
    assert report(short, "--since", "1d").returncode == verdict.EXIT_SAFE

    gap = tmp_path / "gap"
    watch(gap, start=now - 15 * DAY, end=now - 6 * DAY, stopped=False)   # killed
    watch(gap, start=now - 5 * DAY, end=now)                             # back a day later
    proc = report(gap, "--since", "14d", "--json")
    data = json.loads(proc.stdout)
    assert proc.returncode == verdict.EXIT_UNSURE and data["verdict"] == "not-enough-evidence"
    assert len(data["coverage"]["gaps"]) == 1 and data["coverage"]["agent_starts"] == 2
    assert data["coverage"]["unclean_stops"] == 1

    lost = tmp_path / "lost"
    watch(lost, start=now - 15 * DAY, end=now, drops={"kernel_lost": 7})
    proc = report(lost, "--since", "14d")
    assert proc.returncode == verdict.EXIT_UNSURE and "kernel_lost=7" in proc.stdout


def test_an_offender_rotated_out_of_the_logs_is_still_not_safe(tmp_path):
    # the smallest log the config allows, no backup: busy hardened traffic after the one
    # normal-mode client pushes its line out
    now = time.time()
    watch(tmp_path, [DATA / "aws.pcap"] + [DATA / "sdk.pcap"] * 40, start=now - 15 * DAY,
          end=now, max_bytes=4096, backups=0)
    lines = (tmp_path / "imds-trace.log").read_text()
    assert "[WARNING]" not in lines      # the evidence is all that is left
    proc = report(tmp_path, "--since", "14d", "--json")
    data = json.loads(proc.stdout)
    assert proc.returncode == verdict.EXIT_NOT_SAFE, proc.stdout
    expected = json.loads((DATA / "expected.json").read_text())["files"]["aws.pcap"]
    normal = sum(1 for r in expected["requests"] if r["mode"] == "normal")
    assert data["normal_mode_requests"] == normal > 0
    lines = sum(data["requests_by_level"].values())
    assert data["coverage"]["requests_logged"] > lines
    assert "request line(s) the agent logged in these runs are no longer in the logs" in \
        " ".join(data["notes"])


def test_lines_and_evidence_are_merged_without_double_counting(tmp_path):
    now = time.time()
    watch(tmp_path, [DATA / "aws.pcap"], start=now - 15 * DAY, end=now)
    lines = (tmp_path / "imds-trace.log").read_text().count("[WARNING]")
    data = json.loads(report(tmp_path, "--since", "14d", "--json").stdout)
    assert data["normal_mode_requests"] == lines > 0


def test_evidence_survives_restarts_and_a_kill(tmp_path):
    now = time.time()
    watch(tmp_path, [DATA / "aws.pcap"], start=now - 3 * DAY, end=now - 2 * DAY,
          stopped=False)
    first = evidence.load(str(tmp_path))
    watch(tmp_path, start=now - 2 * DAY + 60, end=now)
    doc = evidence.load(str(tmp_path))
    assert len(doc["intervals"]) == 2 and doc["intervals"][0]["stopped"] is False
    assert doc["offenders"] == first["offenders"] and doc["offenders"]
    proc = report(tmp_path, "--since", "14d", "--json")
    data = json.loads(proc.stdout)
    assert proc.returncode == verdict.EXIT_NOT_SAFE and data["offenders"]
    assert data["coverage"]["agent_starts"] == 2 and data["coverage"]["unclean_stops"] == 1


def test_the_evidence_file_is_replaced_whole_and_bounded(tmp_path):
    sink = evidence.EvidenceSink(str(tmp_path), now=1000.0)
    for i in range(evidence.MAX_INTERVALS + 10):
        sink = evidence.EvidenceSink(str(tmp_path), now=2000.0 + i)
    doc = evidence.load(str(tmp_path))
    assert len(doc["intervals"]) == evidence.MAX_INTERVALS
    assert doc["forgotten_before"] is not None
    assert sorted(os.listdir(tmp_path)) == ["imds-evidence.json"]   # no temporary left
    assert (os.stat(tmp_path / "imds-evidence.json").st_mode & 0o777) == 0o600


def test_unreadable_lines_are_counted_shown_and_a_warning_one_is_never_safe(tmp_path):
    now = time.time()
    watch(tmp_path, [DATA / "azure_gcp.pcap"], start=now - 15 * DAY, end=now)
    log = tmp_path / "imds-trace.log"
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(now - 60))
    with log.open("a") as fh:
        fh.write(f"[{stamp}] [INFO] something report does not know\n")
    proc = report(tmp_path, "--since", "14d")
    assert proc.returncode == verdict.EXIT_UNSURE and "1 line(s) could not be read" in proc.stdout
    with log.open("a") as fh:
        fh.write(f"[{stamp}] [WARNING] normal-mode provider=aws GET /x dst=1.2.3.4:80 "
                 "status=200 (pid:1:curl argv:curl) container=docker:my container\n")
    proc = report(tmp_path, "--since", "14d")
    assert proc.returncode == verdict.EXIT_NOT_SAFE, proc.stdout
    assert "WARNING line(s) that report could not read" in proc.stdout


def test_report_help_documents_the_exit_codes():
    out = subprocess.run([sys.executable, "-m", "imds_tracer", "report", "--help"],
                         capture_output=True, text=True, cwd=ROOT).stdout
    assert "3 not enough evidence" in " ".join(out.split())
    readme = (ROOT / "README.md").read_text()
    assert "**3**" in readme
