"""The cgroup backend: BPF socket hooks on the root of the cgroup v2 hierarchy (bpf/cgroup.c).

It puts nothing on the syscall path: a connect() to a watched address is seen by the
cgroup/connect4|6 hook, and the packets of such a socket by cgroup_skb egress/ingress, whose
first test (the socket's remote port) lets every other packet through at once. Unrelated
writes and sends therefore cost next to nothing, where syscall tracepoints slow down every
syscall of the machine. Packets arrive as a capture would hold them and go through the
replay's decoder (`packets.TcpDemux`), keyed by socket cookie.

The hooks are attached (by the loader, loader.py) with BPF links, whose descriptors the agent
holds: they go away with the agent's process, also when it is killed, so a crashed agent
leaves nothing running in the kernel.
"""
from __future__ import annotations

import ctypes
import errno
import functools
import logging
import os
from pathlib import Path
from typing import NamedTuple, Optional

from .. import procfs
from . import bpfsys, caps, helpers
from ..model import FlowClosed
from .events import EV_PACKET, F_OWNER_GUESSED, EventHeader
from .helpers import ringbuf_supported
from .kernel import KernelSource
from .packets import TcpDemux

log = logging.getLogger("imds_tracer")

# (function in bpf/cgroup.c, bpf_prog_type, bpf_attach_type from uapi/linux/bpf.h)
CGROUP_INET_INGRESS, CGROUP_INET_EGRESS = 0, 1
CGROUP_INET4_CONNECT, CGROUP_INET6_CONNECT = 10, 11
HOOKS = (
    ("imds_connect4", helpers.PROG_CGROUP_SOCK_ADDR, CGROUP_INET4_CONNECT),
    ("imds_connect6", helpers.PROG_CGROUP_SOCK_ADDR, CGROUP_INET6_CONNECT),
    ("imds_egress", helpers.PROG_CGROUP_SKB, CGROUP_INET_EGRESS),
    ("imds_ingress", helpers.PROG_CGROUP_SKB, CGROUP_INET_INGRESS),
)


# helpers each program type must be allowed to call, and the ones a packet program uses when
# it may (a socket connected before the agent started is then attributed to its sender)
CONNECT_HELPERS = ("get_socket_cookie", "get_current_pid_tgid", "get_current_uid_gid",
                   "get_current_comm", "get_current_cgroup_id", "ringbuf_output")
PACKET_HELPERS = ("get_socket_cookie", "skb_load_bytes", "skb_cgroup_id", "ringbuf_output")
PACKET_TASK_HELPERS = ("get_current_pid_tgid", "get_current_uid_gid", "get_current_comm",
                       "get_current_cgroup_id")


class HookSupport(NamedTuple):
    refused: Optional[str]       # why the hooks cannot be built on this kernel, or None
    packet_current_task: bool    # cgroup_skb programs may ask for the current task


@functools.lru_cache(maxsize=1)
def hook_support() -> HookSupport:
    """What the running kernel lets the cgroup hooks call, by load test (helpers.py)."""
    try:
        connect = helpers.allowed_helpers(helpers.PROG_CGROUP_SOCK_ADDR,
                                          helpers.ATTACH_CGROUP_INET4_CONNECT,
                                          CONNECT_HELPERS)
        packet = helpers.allowed_helpers(helpers.PROG_CGROUP_SKB,
                                         helpers.ATTACH_CGROUP_INET_EGRESS,
                                         PACKET_HELPERS + PACKET_TASK_HELPERS)
    except helpers.ProbeError:
        # not permitted to ask: loading will fail with its own reason; build the variant
        # every kernel accepts
        return HookSupport(None, False)
    refused = [f"bpf_{name} in cgroup/connect programs" for name in CONNECT_HELPERS
               if not connect[name]]
    refused += [f"bpf_{name} in cgroup_skb programs" for name in PACKET_HELPERS
                if not packet[name]]
    return HookSupport("the kernel refuses " + ", ".join(refused) if refused else None,
                       all(packet[name] for name in PACKET_TASK_HELPERS))


ROOT_CGROUP_INO = 1   # kernfs gives the root of the hierarchy inode 1 (its cgroup id)


def cgroup2_mounts(mountinfo: Path = Path("/proc/self/mountinfo")) -> list[str]:
    """Mount points of cgroup v2 filesystems (/sys/fs/cgroup, or .../unified in hybrid mode)."""
    return procfs.cgroup2_mounts(str(mountinfo))


def cgroup2_root(mountinfo: Path = Path("/proc/self/mountinfo")) -> str | None:
    """The mount point that shows the root of the whole cgroup v2 hierarchy, or None.

    Hooks attached lower down (a container's cgroup namespace shows its own cgroup as "/")
    would see only the processes below it: a silent blind spot, so such a mount does not
    count."""
    for path in cgroup2_mounts(mountinfo):
        try:
            if os.stat(path).st_ino == ROOT_CGROUP_INO:
                return path
        except OSError:
            continue
    return None


# Where a host mounts no cgroup v2 hierarchy (cgroup v1 only: the EL8 and Alibaba Cloud
# Linux 3 defaults), the hooks need one mounted. The v2 hierarchy exists in the kernel all the
# same; with no controller in it every process sits in its root, so hooks attached there see
# every socket. Either `imds-tracer cgroup2 mount` mounts it before the agent starts (the
# systemd unit's ExecStartPre, outside the sandbox that keeps CAP_SYS_ADMIN from the agent;
# the agent finds it in /proc/self/mountinfo like any other) and `imds-tracer cgroup2
# unmount` removes it after, or a loader holding CAP_SYS_ADMIN mounts it itself, attaches,
# and unmounts it again at once: the links hold the hierarchy's root cgroup, not the mount.
PRIVATE_CGROUP2 = Path("/run/imds-tracer/cgroup2")
MNT_DETACH = 2


def cgroup2_supported(filesystems: Path = Path("/proc/filesystems")) -> bool:
    try:
        return any(line.split()[-1:] == ["cgroup2"] for line in filesystems.read_text().splitlines())
    except OSError:
        return False


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def mount_private_cgroup2(path: Path = PRIVATE_CGROUP2) -> str:
    """Mounts the root of the cgroup v2 hierarchy at `path`. Raises OSError."""
    path.mkdir(parents=True, exist_ok=True)
    if _libc().mount(b"none", str(path).encode(), b"cgroup2", 0, None) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    if os.stat(path).st_ino != ROOT_CGROUP_INO:   # a cgroup namespace shows its own sub-tree
        unmount_private_cgroup2(path)
        raise OSError(errno.EPERM, "the mount shows a sub-tree, not the root (a cgroup "
                                   "namespace?)")
    return str(path)


def unmount_private_cgroup2(path: Path = PRIVATE_CGROUP2) -> None:
    """Unmounts `path` and removes it, and its parent when that is empty."""
    _libc().umount2(str(path).encode(), MNT_DETACH)
    for directory in (path, path.parent):
        try:
            directory.rmdir()
        except OSError:
            break


def mount_cgroup2_for_hooks(path: Path = PRIVATE_CGROUP2) -> str:
    """`imds-tracer cgroup2 mount`: mounts the cgroup v2 hierarchy at `path` unless its root
    is mounted somewhere already; what it did, in one line. Raises OSError."""
    root = cgroup2_root()
    if root is not None:
        return f"the root of the cgroup v2 hierarchy is mounted at {root}: nothing to do"
    if not cgroup2_supported():
        raise OSError(errno.ENODEV, "the kernel has no cgroup2 filesystem")
    return (f"mounted the cgroup v2 hierarchy at {mount_private_cgroup2(path)} (no cgroup v2 "
            f"mount on this host) for the cgroup backend's hooks")


def unmount_cgroup2_for_hooks(path: Path = PRIVATE_CGROUP2) -> str:
    """`imds-tracer cgroup2 unmount`: undoes `mount_cgroup2_for_hooks`; one line."""
    if str(path) not in cgroup2_mounts():
        return f"no cgroup v2 mount at {path}: nothing to do"
    for _ in range(8):   # mounted more than once (e.g. a pre-start step run twice)
        unmount_private_cgroup2(path)
        if str(path) not in cgroup2_mounts():
            return f"unmounted the cgroup v2 hierarchy at {path}"
    raise OSError(errno.EBUSY, f"{path} is still mounted")


BPF_LINK_CREATE = 28


class _LinkCreateAttr(ctypes.Structure):
    _fields_ = [("prog_fd", ctypes.c_uint32), ("target_fd", ctypes.c_uint32),
                ("attach_type", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("pad", ctypes.c_uint8 * 48)]


def link_create(prog_fd: int, target_fd: int, attach_type: int) -> int:
    """A BPF link attaching a program to a cgroup (bpf(BPF_LINK_CREATE), kernel >= 5.7): the
    link fd, closed to detach. Raises OSError."""
    return bpfsys.bpf(BPF_LINK_CREATE, _LinkCreateAttr(prog_fd, target_fd, attach_type, 0))


def port_match(ports) -> str:
    """The C expression the kernel tests the remote port with (a constant compare chain)."""
    return "(" + " || ".join(f"(p) == {int(p)}" for p in sorted(set(ports))) + ")"


class CgroupSource(KernelSource):
    name = "cgroup"
    flow_tag = "cg"
    tracks_fds = False

    def __init__(self, config):
        super().__init__(config)
        self.demux = TcpDemux(config.addresses, config.ports, self.name,
                              max_conns=config.max_flows)
        self.stats.update({"packets": 0, "owner_guessed": 0})

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if not ringbuf_supported():
            return "the kernel has no BPF ring buffers (mainline 5.8)"
        refused = hook_support().refused
        if refused:
            return refused
        if cgroup2_root() is None:
            if cgroup2_mounts():
                return ("the cgroup v2 mount shows a sub-tree, not the root of the hierarchy "
                        "(a cgroup namespace?): mount the host's /sys/fs/cgroup")
            if not cgroup2_supported():
                return "the kernel has no cgroup2 filesystem"
            if not caps.effective_caps() >> caps.CAP_SYS_ADMIN & 1:
                return ("no cgroup v2 hierarchy mounted (a cgroup v1 host), and no "
                        "CAP_SYS_ADMIN to mount one: run 'imds-tracer cgroup2 mount' as root "
                        "before the agent (the systemd unit does)")
        return None   # no v2 mount on a v1 host: the loader mounts a private one

    def handle_event(self, ev: EventHeader, payload: bytes) -> None:
        if ev.kind != EV_PACKET:
            super().handle_event(ev, payload)
            return
        self.stats["packets"] += 1
        version = payload[0] >> 4 if payload else 0
        if version not in (4, 6):
            return
        process = None
        if ev.tgid:   # 0: a received packet of a socket connected before the agent started
            info = self._conns.get(ev.conn_id)
            if info is None or info.tgid != ev.tgid:
                if ev.flags & F_OWNER_GUESSED:
                    self.stats["owner_guessed"] += 1
                info = self._remember(ev, None)
            process = self._snapshot(ev, info)
        before = len(self._out)
        self.demux.ip_packet(payload, 0, version, self.wall_time(ev.ts_ns), self._out,
                             wire_len=len(payload) + ev.lost_bytes, scope=ev.conn_id,
                             process=process)
        # a socket carries one connection: once the decoder closed it, its process facts go
        # too (this backend has no close event; without this they stayed until evicted)
        for item in self._out[before:]:
            if isinstance(item, FlowClosed) and item.flow[0] == ev.conn_id:
                self._conns.pop(ev.conn_id)
