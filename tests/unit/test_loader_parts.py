"""The loader's pieces that need no kernel: the legacy kprobe_events clean-up, the spec, the
start-up phases, and a loader that cannot start or dies early (one line, no traceback)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from imds_tracer.config import Config
from imds_tracer.sources import loader
from imds_tracer.sources.base import SourceError


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_legacy_kprobe_events_of_gone_loaders_are_removed(tmp_path):
    """BCC without the kprobe PMU (kernels before 4.17) names its events p_<fn>_bcc_<pid>;
    a loader that exits without BCC's clean-up leaves them: the next load removes those of
    loaders that are gone, never those of a live process or of other tools."""
    dead = _dead_pid()
    events = tmp_path / "kprobe_events"
    events.write_text(f"p:kprobes/p_tcp_sendmsg_bcc_{dead} tcp_sendmsg\n"
                      f"r:kprobes/r_tcp_recvmsg_bcc_{dead} tcp_recvmsg\n"
                      f"p:kprobes/p_tcp_sendmsg_bcc_{os.getppid()} tcp_sendmsg\n"
                      f"p:kprobes/other_tool tcp_sendmsg\n")
    assert loader.remove_stale_kprobe_events(events) == 2
    written = events.read_text().splitlines()[4:]   # a plain file: the writes are appended
    assert written == [f"-:kprobes/p_tcp_sendmsg_bcc_{dead}", f"-:kprobes/r_tcp_recvmsg_bcc_{dead}"]
    assert loader.remove_stale_kprobe_events(tmp_path / "absent") == 0


def test_spec_is_json_of_the_config():
    spec = loader.spec_of(Config(ports=[80, 8080], max_payload=512), use_perf=True, keep_caps=4)
    assert spec["ports"] == [80, 8080] and spec["max_payload"] == 512
    assert spec["use_perf"] is True and spec["keep_caps"] == 4
    flags = loader.compile_flags(dict(spec, backend="tracepoint"))
    assert "-DIMDS_USE_PERF" in flags and "-DIMDS_PAYLOAD_LIMIT=512" in flags


def test_phases_add_up():
    marks = {"interpreter": 10.1, "bcc_imported": 10.2, "compiled": 11.0, "attached": 11.1}
    out = loader.phases(10.0, marks)
    assert list(out)[:4] == ["interpreter", "bcc_imported", "compiled", "attached"]
    assert out["compiled"] == pytest.approx(0.8) and out["handover"] >= 0


def test_a_loader_that_dies_before_handing_over_is_one_line(monkeypatch):
    """The loader's interpreter fails at once (here: a Python that cannot run it): the agent
    gets one line naming how it died, never a traceback or a hang."""
    monkeypatch.setattr(loader.sys, "executable", "/bin/false")
    with pytest.raises(SourceError) as info:
        loader.load("tracepoint", loader.spec_of(Config(), use_perf=False, keep_caps=0))
    message = str(info.value)
    assert "\n" not in message and "the BPF loader died (exit status 1)" in message


def test_a_loader_that_cannot_start_is_one_line(monkeypatch):
    monkeypatch.setattr(loader.sys, "executable", "/nonexistent/python")
    with pytest.raises(SourceError, match="cannot start the BPF loader"):
        loader.load("tracepoint", loader.spec_of(Config(), use_perf=False, keep_caps=0))
