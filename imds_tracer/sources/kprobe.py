"""The kprobe backend: BCC kprobes on the TCP send/receive path (bpf/kprobe.c).

Struct offsets come from the running kernel's BTF (`btf.kprobe_constants`, passed to the
compile by the loader), never from the headers BCC compiles against. Needs CONFIG_KPROBES (and kprobe events): the development
machines do not have it, so there it fails to start with a one-line reason, and `auto` falls
back to the tracepoint backend.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from .btf import VMLINUX_BTF
from .kernel import KernelSource

log = logging.getLogger("imds_tracer")

# one hook per call chain: the first name that exists wins
SEND_FUNCTIONS = ("tcp_sendmsg", "tcp_sendmsg_locked")
RECV_FUNCTION = "tcp_recvmsg"
KPROBE_EVENTS = Path("/sys/kernel/tracing/kprobe_events")
NO_KPROBES = ("no kprobe attached (kernel built without CONFIG_KPROBES?); "
              "use --backend cgroup or --backend tracepoint; see imds-tracer doctor")


def kernel_symbols(names, kallsyms: Path = Path("/proc/kallsyms")) -> set[str]:
    """Which of `names` are kernel text symbols."""
    wanted = set(names)
    found = set()
    try:
        with open(kallsyms) as fh:
            for line in fh:
                parts = line.split()
                if len(parts) >= 3 and parts[2] in wanted and parts[1] in "tT":
                    found.add(parts[2])
    except OSError:
        pass
    return found


class KprobeSource(KernelSource):
    name = "kprobe"
    flow_tag = "kp"

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if not os.path.exists(KPROBE_EVENTS) and not os.path.exists("/sys/bus/event_source/devices/kprobe"):
            return "kernel has no kprobes (CONFIG_KPROBES / CONFIG_KPROBE_EVENTS off)"
        if not os.path.exists(VMLINUX_BTF):
            return f"no BTF at {VMLINUX_BTF} (needed for struct offsets; CONFIG_DEBUG_INFO_BTF)"
        if not kernel_symbols(SEND_FUNCTIONS):
            return f"none of {', '.join(SEND_FUNCTIONS)} in /proc/kallsyms"
        return None

    def flow_key(self, ev):
        # one socket, whichever process sends on it; the pointer is reused only after the
        # TCP_CLOSE event closed the flow
        return (self.flow_tag, ev.conn_id)
