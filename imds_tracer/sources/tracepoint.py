"""The tracepoint backend: BCC on syscall tracepoints (bpf/tracepoint.c).

Runs where kprobes cannot (kernels without CONFIG_KPROBES, like the development machines) and
with kernel headers that are not the running kernel's: the BPF side reads tracepoint
arguments and user memory only.

At load (in the loader, which holds the capabilities for other users' /proc/PID/fd) it adopts sockets that were already connected to a watched address, in every
network namespace: /proc/PID/fd gives (tgid, fd) -> socket inode, /proc/PID/net/tcp{,6}
(read through a process of each namespace) gives inode -> destination. psutil cannot do this:
it sees the agent's own namespace only.
"""
from __future__ import annotations

import ipaddress
import logging
import os
import struct
from pathlib import Path
from typing import Iterator

from .kernel import KernelSource

log = logging.getLogger("imds_tracer")

TRACEFS = Path("/sys/kernel/tracing")
# TCP states worth adopting: ESTABLISHED, SYN_SENT, CLOSE_WAIT (the server closed; the
# client may still send)
ADOPT_STATES = {"01", "02", "08"}
ADOPTED_ID_BASE = 1 << 63


def _parse_hex_addr(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """/proc/net/tcp prints addresses as 32-bit words in host (little-endian) order."""
    raw = bytes.fromhex(text)
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    if len(words) == 4:
        return ipaddress.IPv4Address(words)
    addr = ipaddress.IPv6Address(words)
    return addr.ipv4_mapped or addr


def parse_proc_net_tcp(text: str) -> Iterator[tuple[int, str, int, str]]:
    """(inode, remote ip, remote port, state) for each socket line of /proc/PID/net/tcp{,6}."""
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 10:
            continue
        try:
            rem_addr, rem_port = fields[2].split(":")
            inode = int(fields[9])
            yield inode, str(_parse_hex_addr(rem_addr)), int(rem_port, 16), fields[3]
        except ValueError:
            continue


def scan_connected(addresses, ports, proc: Path = Path("/proc")):
    """(tgid, fd, ip, port) for every fd connected to a watched (address, port), every netns."""
    watched = {(str(ipaddress.ip_address(a)), int(p)) for a in addresses for p in ports}
    sockets: dict[int, list[tuple[int, int]]] = {}   # inode -> [(tgid, fd)]
    netns_reader: dict[int, int] = {}                # netns inode -> a pid inside it
    for entry in os.scandir(proc):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            netns = os.stat(f"{proc}/{pid}/ns/net").st_ino
            fds = os.listdir(f"{proc}/{pid}/fd")
        except OSError:
            continue
        found = False
        for fd in fds:
            try:
                target = os.readlink(f"{proc}/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                sockets.setdefault(int(target[8:-1]), []).append((pid, int(fd)))
                found = True
        if found:
            netns_reader.setdefault(netns, pid)
    out = []
    for pid in netns_reader.values():
        for name in ("tcp", "tcp6"):
            try:
                text = Path(f"{proc}/{pid}/net/{name}").read_text()
            except OSError:
                continue
            for inode, ip, port, state in parse_proc_net_tcp(text):
                if state in ADOPT_STATES and (ip, port) in watched and inode in sockets:
                    for tgid, fd in sockets[inode]:
                        out.append((tgid, fd, ip, port))
    return out


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
