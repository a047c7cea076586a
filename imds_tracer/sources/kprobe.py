"""The kprobe backend: BCC kprobes on the TCP send/receive path (bpf/kprobe.c).

Struct offsets come from the running kernel's BTF (`btf.kprobe_constants`), never from the
headers BCC compiles against. Needs CONFIG_KPROBES (and kprobe events): the development
machines do not have it, so there it fails to start with a one-line reason, and `auto` falls
back to the tracepoint backend.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from .base import SourceError
from .btf import Btf, BtfError, VMLINUX_BTF, kprobe_constants
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
    program = "kprobe.c"
    flow_tag = "kp"

    def __init__(self, config):
        super().__init__(config)
        self.send_function: str | None = None
        self.constants: dict[str, int] | None = None

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if not os.path.exists(KPROBE_EVENTS) and not os.path.exists("/sys/bus/event_source/devices/kprobe"):
            return "kernel has no kprobes (CONFIG_KPROBES / CONFIG_KPROBE_EVENTS off)"
        if not os.path.exists(VMLINUX_BTF):
            return f"no BTF at {VMLINUX_BTF} (needed for struct offsets; CONFIG_DEBUG_INFO_BTF)"
        if not kernel_symbols(SEND_FUNCTIONS):
            return f"none of {', '.join(SEND_FUNCTIONS)} in /proc/kallsyms"
        return None

    def _cflags(self) -> list[str]:
        try:
            self.constants = kprobe_constants(Btf.load())
        except BtfError as exc:
            raise SourceError(f"kprobe backend: {exc}; use --backend cgroup or "
                              "--backend tracepoint") from None
        flags = super()._cflags()
        flags += [f"-D{name}={value}" for name, value in sorted(self.constants.items())]
        return flags

    def flow_key(self, ev):
        # one socket, whichever process sends on it; the pointer is reused only after the
        # TCP_CLOSE event closed the flow
        return (self.flow_tag, ev.conn_id)

    def _no_probe_message(self) -> str:
        return NO_KPROBES

    def _attach(self) -> int:
        existing = kernel_symbols(SEND_FUNCTIONS + (RECV_FUNCTION,))
        attached = 0
        for fn in SEND_FUNCTIONS:
            if fn not in existing:
                continue
            try:
                self.bpf.attach_kprobe(event=fn.encode(), fn_name=b"imds_tcp_sendmsg")
            except Exception as exc:
                log.info("kprobe on %s not attached: %s", fn, exc)
                continue
            self.send_function = fn
            attached += 1
            break
        if not attached:
            raise SourceError(NO_KPROBES)
        if RECV_FUNCTION in existing:
            try:
                self.bpf.attach_kprobe(event=RECV_FUNCTION.encode(), fn_name=b"imds_tcp_recvmsg")
                self.bpf.attach_kretprobe(event=RECV_FUNCTION.encode(),
                                          fn_name=b"imds_tcp_recvmsg_ret")
                attached += 2
            except Exception as exc:
                log.warning("response status unavailable: %s not probed (%s)", RECV_FUNCTION, exc)
        self._attach_process_cache()
        return attached + int(self.bpf.num_open_tracepoints())
