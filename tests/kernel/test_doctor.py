"""`imds-tracer doctor` on this machine: it names what exists, what is missing, and the backend."""
import io

from imds_tracer import doctor
from imds_tracer.config import Config


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
