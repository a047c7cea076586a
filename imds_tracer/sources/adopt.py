"""Connections opened before the agent started: found in /proc, in every network namespace,
so the backends can attribute their later requests to the process that holds them.

/proc/PID/fd gives (tgid, fd) -> socket inode; /proc/PID/net/tcp{,6} (read through a process
of each namespace) gives inode -> destination. psutil cannot do this: it sees the agent's own
namespace only. The cgroup backend also needs each socket's cookie, the key its packet
programs look owners up by: a copy of the fd (pidfd_getfd, Linux 5.6, CAP_SYS_PTRACE) is asked
for SO_COOKIE and closed again.
"""
from __future__ import annotations

import ctypes
import ipaddress
import os
import platform
import socket
from pathlib import Path
from typing import Iterator, NamedTuple

from .. import procfs

# TCP states worth adopting: ESTABLISHED, SYN_SENT, CLOSE_WAIT (the server closed; the
# client may still send)
ADOPT_STATES = {"01", "02", "08"}
SO_COOKIE = 57
# pidfd_open and pidfd_getfd have the same numbers on every architecture since 5.1
SYS_PIDFD_OPEN, SYS_PIDFD_GETFD = 434, 438


class Held(NamedTuple):
    """A socket connected to a watched address, and one process holding it."""
    tgid: int
    fd: int
    ip: str
    port: int


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


def scan_connected(addresses, ports, proc: Path = Path("/proc")) -> list[Held]:
    """Every fd connected to a watched (address, port), in every network namespace."""
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
                    out.extend(Held(tgid, fd, ip, port) for tgid, fd in sockets[inode])
    return out


_libc = None


def _syscall(number: int, *args: int) -> int:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    result = _libc.syscall(ctypes.c_long(number), *(ctypes.c_long(a) for a in args))
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


def socket_cookie(tgid: int, fd: int) -> int:
    """The kernel's cookie of the socket process `tgid` holds as `fd`. Raises OSError (the
    process or fd is gone, the kernel predates pidfd_getfd, or no CAP_SYS_PTRACE)."""
    if platform.machine() not in ("x86_64", "aarch64", "arm64"):
        raise OSError(38, "pidfd syscalls: numbers not known for " + platform.machine())
    pidfd = _syscall(SYS_PIDFD_OPEN, tgid, 0)
    try:
        copy = _syscall(SYS_PIDFD_GETFD, pidfd, fd, 0)
    finally:
        os.close(pidfd)
    sock = socket.socket(fileno=copy)
    try:
        return int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8), "little")
    finally:
        sock.close()   # our copy only: the process's fd stays open


class Holder(NamedTuple):
    """What the connect hooks would have recorded for the process, read from /proc."""
    tgid: int
    uid: int
    ppid: int
    comm: bytes
    cgroup_id: int


def holder(tgid: int, cgroup2_root: str | None, proc: str = procfs.PROC) -> Holder | None:
    """The process's ids as the kernel's helpers give them (uid: the real one; cgroup id: the
    inode of its cgroup v2 directory, 0 when unknown); None when it is gone."""
    stat, uid = procfs.stat(tgid, proc), procfs.uid(tgid, proc)
    if stat is None or uid is None:
        return None
    cgroup_id = 0
    path = procfs.cgroup(tgid, proc) if cgroup2_root else None
    if path is not None:
        try:
            cgroup_id = os.stat(os.path.join(cgroup2_root, path.lstrip("/"))).st_ino
        except OSError:
            pass
    comm = stat.comm.encode("utf-8", "replace")[:15]
    return Holder(tgid, uid, stat.ppid, comm, cgroup_id)
