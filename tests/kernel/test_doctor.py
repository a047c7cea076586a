"""`imds-tracer doctor` on this machine: it names what exists, what is missing, and the backend."""
import io
import re

from imds_tracer import doctor
from imds_tracer.config import Config
from tests.lab.agent import AgentProcess


def test_doctor_reports_this_kernel():
    out = io.StringIO()
    code = doctor.main(Config(), out=out)
    text = out.getvalue()
    print(text)
    for name in ("BPF syscall", "capabilities", "BCC", "cgroup v2", "tracefs",
                 "syscall tracepoints", "kprobes", "BTF", "kernel headers", "dry run"):
        assert f"] {name}:" in text, name
    assert "--backend auto would use cgroup" in text
    assert "dry run: cgroup backend compiled, loaded and attached 6 probes" in text
    assert code == 0


def test_doctor_without_loading_is_quick_and_names_fixes():
    out = io.StringIO()
    doctor.main(Config(), load=False, out=out)
    text = out.getvalue()
    assert "dry run" not in text
    if "[     no] kprobes" in text:
        assert "fix: the cgroup and tracepoint backends work without them" in text


def test_doctor_names_the_backend_run_picks(tmp_path):
    """One selection function: doctor's answer is what `run --backend auto` starts."""
    out = io.StringIO()
    assert doctor.main(Config(), out=out) == 0, out.getvalue()
    said = re.search(r"--backend auto would use (\w+)", out.getvalue())
    assert said, out.getvalue()
    with AgentProcess(tmp_path, backend="auto") as agent:
        ready = re.match(r"ready backend=(\w+) ", agent.ready_line)
    assert ready and ready.group(1) == said.group(1), (out.getvalue(), agent.ready_line)
