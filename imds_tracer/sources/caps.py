"""The one capability helper: what this process holds, whether it can load BPF, and dropping
every capability the running agent no longer needs once the loader has handed it its file
descriptors (capset / prctl through ctypes)."""
from __future__ import annotations

import ctypes
import logging
import os
import threading
from pathlib import Path

log = logging.getLogger("imds_tracer")

CAP_DAC_READ_SEARCH, CAP_NET_ADMIN, CAP_SYS_PTRACE, CAP_SYS_ADMIN = 2, 12, 19, 21
CAP_SETPCAP, CAP_PERFMON, CAP_BPF = 8, 38, 39
NAMES = {"CAP_SYS_ADMIN": CAP_SYS_ADMIN, "CAP_BPF": CAP_BPF, "CAP_PERFMON": CAP_PERFMON,
         "CAP_NET_ADMIN": CAP_NET_ADMIN, "CAP_SYS_PTRACE": CAP_SYS_PTRACE,
         "CAP_DAC_READ_SEARCH": CAP_DAC_READ_SEARCH}

# What the running agent keeps after the load (found by test, see the unit's comments):
#   CAP_SYS_PTRACE  readlink /proc/PID/exe of other processes (enrichment: the executable,
#                   the package that owns it); without it EACCES for every process not ours.
# Everything else is dropped: the start-up scan of other users' /proc/PID/fd is the loader's,
# files the agent writes are its own (uid 0 is their owner), map reads and the event buffers
# go through descriptors it already holds. Where the kernel checks bpf() map commands against
# kernel.unprivileged_bpf_disabled (mainline before 6.5; not Debian's 6.1), the loader finds
# that CAP_BPF (before 5.8: CAP_SYS_ADMIN) is needed for them too and the agent keeps that.
AGENT_KEEPS = 1 << CAP_SYS_PTRACE

PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT = 24, 38, 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


class _Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _Data(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


_libc = ctypes.CDLL(None, use_errno=True)


def _status_mask(field: str, status: str = "/proc/self/status") -> int:
    try:
        with open(status) as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1], 16)
    except (OSError, ValueError):
        pass
    return 0


def effective_caps() -> int:
    """This thread's effective capability mask (0 when /proc does not say)."""
    return _status_mask("CapEff", f"/proc/self/task/{_gettid()}/status")


def permitted_caps() -> int:
    return _status_mask("CapPrm", f"/proc/self/task/{_gettid()}/status")


def _gettid() -> int:
    return threading.get_native_id()


def can_load_bpf() -> bool:
    """Root, or the capabilities BCC needs (CAP_BPF + CAP_PERFMON, or CAP_SYS_ADMIN)."""
    caps = effective_caps()
    has = lambda cap: bool(caps >> cap & 1)  # noqa: E731
    return has(CAP_SYS_ADMIN) or (has(CAP_BPF) and has(CAP_PERFMON))


def names(mask: int) -> list[str]:
    return [name for name, bit in sorted(NAMES.items(), key=lambda kv: kv[1])
            if mask >> bit & 1] + [f"cap{bit}" for bit in range(64)
                                   if mask >> bit & 1 and bit not in NAMES.values()]


def _capset(effective: int, permitted: int, inheritable: int = 0) -> None:
    header = _Header(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_Data * 2)()
    for i in range(2):
        data[i].effective = effective >> (32 * i) & 0xFFFFFFFF
        data[i].permitted = permitted >> (32 * i) & 0xFFFFFFFF
        data[i].inheritable = inheritable >> (32 * i) & 0xFFFFFFFF
    if _libc.capset(ctypes.byref(header), data) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def set_effective(mask: int) -> None:
    """Effective set = mask (within the permitted set, which stays). Raises OSError."""
    _capset(mask, permitted_caps())


def last_cap() -> int:
    try:
        return int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    except (OSError, ValueError):
        return 40


def drop_to(keep: int) -> int:
    """Keeps only `keep` (of what this process has): effective = permitted = keep, no
    inheritable or ambient capabilities, the bounding set cut to `keep` where CAP_SETPCAP
    allows, and no_new_privs, so no later exec can gain any. Returns the effective mask.
    Capabilities are per thread: threads started before this call keep theirs (logged)."""
    keep &= permitted_caps()
    if effective_caps() >> CAP_SETPCAP & 1:
        for cap in range(last_cap() + 1):
            if not keep >> cap & 1:
                _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)
    _libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    _capset(keep, keep, 0)
    others = [task for task in os.listdir("/proc/self/task")
              if int(task) != _gettid() and
              _status_mask("CapEff", f"/proc/self/task/{task}/status") & ~keep]
    if others:
        log.warning("threads %s started before the BPF load keep their capabilities",
                    ", ".join(others))
    return effective_caps()
