"""What /proc says about a process, and where cgroup v2 is mounted: the one place that reads
them. The kernel sources (a sender's argv and parent when the kernel had none), the enricher
(argv, executable, parents, cgroup) and the adoption of connections opened before the start
all ask here.

Every reader returns None when the process is gone or unreadable: a process may exit between
any two reads, which is normal, not an error.
"""
from __future__ import annotations

import os
from typing import NamedTuple, Optional

PROC = "/proc"
READ_MAX = 65536  # bytes of a /proc file read at once (argv longer than this is marked cut)


def read(pid: int, name: str, proc: str = PROC) -> Optional[bytes]:
    """/proc/PID/NAME in one read (os.open + os.read: a third of the cost of open().read();
    procfs hands over a whole file of this size in one read)."""
    try:
        fd = os.open(f"{proc}/{pid}/{name}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return os.read(fd, READ_MAX)
    except OSError:
        return None
    finally:
        os.close(fd)


class Stat(NamedTuple):
    comm: str
    ppid: int
    starttime: int   # clock ticks after boot: with the pid, names one process for good


def stat(pid: int, proc: str = PROC) -> Optional[Stat]:
    """comm, parent and start time from /proc/PID/stat (comm may hold spaces and ')')."""
    raw = read(pid, "stat", proc)
    if not raw:
        return None
    lpar, rpar = raw.find(b"("), raw.rfind(b")")
    fields = raw[rpar + 2:].split()
    try:
        return Stat(raw[lpar + 1:rpar].decode("utf-8", "replace"), int(fields[1]),
                    int(fields[19]))
    except (IndexError, ValueError):
        return None


def ppid(pid: int, proc: str = PROC) -> Optional[int]:
    found = stat(pid, proc)
    return found.ppid if found is not None else None


def split_argv(raw: bytes) -> tuple[str, ...]:
    """NUL-separated arguments, as /proc/PID/cmdline and the kernel's exec cache hold them
    (trailing NULs are padding: a process that rewrote its title leaves them)."""
    raw = raw.rstrip(b"\0")
    return tuple(a.decode("utf-8", "backslashreplace") for a in raw.split(b"\0")) if raw else ()


class Argv(NamedTuple):
    argv: Optional[tuple]
    truncated: bool


def argv(pid: int, proc: str = PROC) -> Argv:
    """argv from /proc/PID/cmdline, and whether it was cut (one read holds READ_MAX bytes)."""
    raw = read(pid, "cmdline", proc)
    if not raw:
        return Argv(None, False)
    return Argv(split_argv(raw) or None, len(raw) >= READ_MAX)


def exe(pid: int, proc: str = PROC) -> Optional[str]:
    try:
        return os.readlink(f"{proc}/{pid}/exe")
    except OSError:
        return None


def uid(pid: int, proc: str = PROC) -> Optional[int]:
    """The real uid (what the kernel's bpf_get_current_uid_gid gives)."""
    raw = read(pid, "status", proc)
    for line in (raw or b"").splitlines():
        if line.startswith(b"Uid:"):
            try:
                return int(line.split()[1])
            except (IndexError, ValueError):
                return None
    return None


def cgroup(pid: int, proc: str = PROC) -> Optional[str]:
    """The process's cgroup path: the cgroup v2 line, else (a v1 host) the systemd one."""
    raw = read(pid, "cgroup", proc)
    if not raw:
        return None
    fallback = None
    for line in raw.decode("utf-8", "replace").splitlines():
        hier, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hier == "0" and controllers == "":
            return path                      # the cgroup v2 line
        if fallback is None or controllers.endswith("systemd"):
            fallback = path
    return fallback


def cgroup2_mounts(mountinfo: str = f"{PROC}/self/mountinfo") -> list[str]:
    """Mount points of cgroup v2 filesystems (/sys/fs/cgroup, or .../unified in hybrid mode)."""
    try:
        with open(mountinfo) as fh:
            text = fh.read()
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        left, _, right = line.partition(" - ")
        fields = left.split()
        if right.split()[:1] == ["cgroup2"] and len(fields) >= 5:
            out.append(fields[4].replace("\\040", " "))
    return out
