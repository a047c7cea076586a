"""The tracepoint backend: BCC on syscall tracepoints (bpf/tracepoint.c).

Runs where kprobes cannot (kernels without CONFIG_KPROBES, like the development machines) and
with kernel headers that are not the running kernel's: the BPF side reads tracepoint
arguments and user memory only.

At start it adopts sockets that were already connected to a watched address, in every
network namespace (sources/adopt.py).
"""
from __future__ import annotations

import ctypes
import logging
import os
from pathlib import Path

from .adopt import scan_connected
from .kernel import KernelSource, addr_key_bytes

log = logging.getLogger("imds_tracer")

TRACEFS = Path("/sys/kernel/tracing")
ADOPTED_ID_BASE = 1 << 63


class TracepointSource(KernelSource):
    name = "tracepoint"
    program = "tracepoint.c"
    flow_tag = "tp"

    def __init__(self, config):
        super().__init__(config)
        self.adopted = 0

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if not os.path.exists(TRACEFS / "events" / "syscalls" / "sys_enter_connect"):
            return (f"syscall tracepoints not found under {TRACEFS}/events "
                    "(mount tracefs; kernel needs CONFIG_FTRACE_SYSCALLS)")
        return None

    def _no_probe_message(self) -> str:
        return ("no syscall tracepoint attached (mount tracefs at /sys/kernel/tracing; kernel "
                "needs CONFIG_FTRACE_SYSCALLS); use --backend kprobe; see imds-tracer doctor")

    def _attach(self) -> int:
        # TRACEPOINT_PROBE functions are attached by BCC when the program loads
        self._attach_process_cache()
        return int(self.bpf.num_open_tracepoints())

    def _after_attach(self) -> None:
        # after attaching, so that a connect racing with the scan is seen by one or the other
        try:
            self.adopted = self.adopt_existing()
        except OSError as exc:
            log.warning("start-up scan of connected sockets failed: %s", exc)
        if self.adopted:
            log.info("adopted %d connection(s) opened before the agent started", self.adopted)

    def adopt_existing(self) -> int:
        conns = self.bpf[b"conns"]
        epochs = self.bpf[b"tgid_epoch"]
        maybe = self.bpf[b"maybe_tracked"]
        slots = len(maybe)
        count = 0
        for tgid, fd, ip, port in scan_connected(self.config.addresses, self.config.ports):
            key = conns.Key((tgid << 32) | fd)
            try:
                conns[key]
                continue            # already seen by connect()
            except KeyError:
                pass
            conn_id = ADOPTED_ID_BASE | (os.getpid() << 24) | count
            ekey = epochs.Key(tgid)
            try:
                epoch = int(epochs[ekey].value)
            except KeyError:
                epoch = conn_id
                epochs[ekey] = epochs.Leaf(epoch)
            leaf = conns.Leaf()
            leaf.conn_id = conn_id
            leaf.epoch = epoch
            leaf.family = 10 if ":" in ip else 2
            leaf.dport = port
            ctypes.memmove(ctypes.addressof(leaf.daddr), addr_key_bytes(ip), 16)
            conns[key] = leaf
            maybe[maybe.Key(tgid % slots)] = maybe.Leaf(1)  # the kernel's fast test
            count += 1
        return count

    def _forget_kernel_fd(self, tgid: int, fd: int) -> None:
        if self.bpf is None:
            return
        conns = self.bpf[b"conns"]
        try:
            del conns[conns.Key((tgid << 32) | fd)]
        except KeyError:
            pass
