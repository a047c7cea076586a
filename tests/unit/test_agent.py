"""The Agent's order of things (imds_tracer/agent.py): outputs before the source, so a taken
metrics port or an unwritable log directory fails before a kernel source spends seconds
loading, and leaves nothing held; the enricher built with the source's process caches; a
replay that loads neither prometheus_client nor scapy nor the kernel sources."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest

from imds_tracer.agent import Agent
from imds_tracer.config import Config, ConfigError
from imds_tracer.sinks.metrics import MetricsError

ROOT = Path(__file__).resolve().parents[2]


class Opened:
    """What `open_source` returns, and whether it was asked to."""
    name = "tracepoint"

    def __init__(self):
        self.calls = 0
        self.threads_then = None

    def __call__(self):
        self.calls += 1
        self.threads_then = {thread.name for thread in threading.enumerate()}
        return self

    def lookup_process(self, pid):
        return None, None


def test_a_taken_metrics_port_fails_before_the_source_and_holds_nothing(tmp_path):
    opened = Opened()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        addr = "127.0.0.1:%d" % taken.getsockname()[1]
        with pytest.raises(MetricsError, match="metrics address"):
            Agent(Config(log_dir=str(tmp_path)), backend="auto", metrics_addr=addr,
                  open_source=opened, enrich=True)
    assert opened.calls == 0
    assert not (tmp_path / "imds-trace.log").exists()


def test_an_unwritable_log_dir_fails_before_the_source_and_frees_the_port(tmp_path):
    opened = Opened()
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="--log-dir"):
        Agent(Config(log_dir=str(blocker / "d")), backend="auto", metrics_addr="127.0.0.1:0",
              open_source=opened)
    assert opened.calls == 0
    # the log directory's lock and the metrics socket were let go: the same outputs open again
    Agent(Config(log_dir=str(tmp_path / "ok")), metrics_addr="127.0.0.1:0").close()
    Agent(Config(log_dir=str(tmp_path / "ok")), metrics_addr="127.0.0.1:0").close()


def test_the_enricher_gets_the_sources_process_caches_at_construction(tmp_path):
    opened = Opened()
    agent = Agent(Config(log_dir=str(tmp_path), cloud="none"), backend="auto",
                  metrics_addr="127.0.0.1:0", open_source=opened, enrich=True)
    try:
        assert opened.calls == 1 and agent.source is opened
        # the port was taken before, but its thread starts after the source opened (which
        # drops capabilities: a thread started before would keep them)
        assert "metrics" not in opened.threads_then
        url = "http://127.0.0.1:%d/metrics" % agent.metrics_port
        assert b"imds_tracer_dropped_total" in urllib.request.urlopen(url, timeout=10).read()
        assert agent.pipeline.enricher.lookup == opened.lookup_process
        info = [sample.labels for metric in agent.metrics.registry.collect()
                for sample in metric.samples if sample.name == "imds_tracer_info"]
        assert [labels["backend"] for labels in info] == ["tracepoint"]   # what auto chose
    finally:
        agent.close()


def test_replay_loads_no_metrics_capture_or_kernel_module(tmp_path):
    code = ("import sys, json\n"
            "from imds_tracer.cli import main\n"
            f"rc = main(['replay', {str(ROOT / 'tests/data/aws.pcap')!r}, "
            f"'--log-dir', {str(tmp_path)!r}])\n"
            "heavy = ('prometheus_client', 'scapy', 'bcc', 'psutil', "
            "'imds_tracer.sources.kernel', 'imds_tracer.owner', 'imds_tracer.report')\n"
            "print(json.dumps([rc, sorted(m for m in sys.modules if m.startswith(heavy))]))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)
    rc, loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert rc == 0 and loaded == [], proc.stderr
    assert "WARNING" in (tmp_path / "imds-trace.log").read_text()
