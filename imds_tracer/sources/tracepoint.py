"""The tracepoint backend: BCC on syscall tracepoints (bpf/tracepoint.c).

Runs where kprobes cannot (kernels without CONFIG_KPROBES, like the development machines) and
with kernel headers that are not the running kernel's: the BPF side reads tracepoint
arguments and user memory only.

At load (in the loader, which holds the capabilities for other users' /proc/PID/fd) it
adopts sockets that were already connected to a watched address, in every network namespace
(sources/adopt.py).
"""
from __future__ import annotations

import logging
import os
import struct
from pathlib import Path

from .kernel import KernelSource

log = logging.getLogger("imds_tracer")

TRACEFS = Path("/sys/kernel/tracing")
ADOPTED_ID_BASE = 1 << 63


class TracepointSource(KernelSource):
    name = "tracepoint"
    flow_tag = "tp"

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if not os.path.exists(TRACEFS / "events" / "syscalls" / "sys_enter_connect"):
            return (f"syscall tracepoints not found under {TRACEFS}/events "
                    "(mount tracefs; kernel needs CONFIG_FTRACE_SYSCALLS)")
        return None

    def _forget_kernel_fd(self, tgid: int, fd: int) -> None:
        conns = self.maps.get("conns")
        if conns is not None:
            conns.delete(struct.pack("<Q", (tgid << 32) | fd))
