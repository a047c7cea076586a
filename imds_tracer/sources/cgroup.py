"""The cgroup backend: BPF socket hooks on the root of the cgroup v2 hierarchy (bpf/cgroup.c).

It puts nothing on the syscall path: a connect() to a watched address is seen by the
cgroup/connect4|6 hook, and the packets of such a socket by cgroup_skb egress/ingress, whose
first test (the socket's remote port) lets every other packet through at once. Unrelated
writes and sends therefore cost next to nothing, where syscall tracepoints slow down every
syscall of the machine. Packets arrive as a capture would hold them and go through the
replay's decoder (`packets.TcpDemux`), keyed by socket cookie.

The hooks are attached with BPF links: they go away with the agent's process, also when it
is killed, so a crashed agent leaves nothing running in the kernel.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import logging
import os
from pathlib import Path
from typing import NamedTuple, Optional

from . import adopt, helpers
from .base import SourceError
from .bcc_module import import_bcc
from .btf import VMLINUX_BTF, Btf, BtfError, exec_argv_constants
from .kernel import EV_PACKET, EventHeader, KernelSource, ringbuf_supported
from .packets import TcpDemux

log = logging.getLogger("imds_tracer")

F_INGRESS, F_OWNER_GUESSED = 0x4, 0x8

# (function in bpf/cgroup.c, BCC program type name, bpf_attach_type from uapi/linux/bpf.h)
CGROUP_INET_INGRESS, CGROUP_INET_EGRESS = 0, 1
CGROUP_INET4_CONNECT, CGROUP_INET6_CONNECT = 10, 11
HOOKS = (
    ("imds_connect4", "CGROUP_SOCK_ADDR", CGROUP_INET4_CONNECT),
    ("imds_connect6", "CGROUP_SOCK_ADDR", CGROUP_INET6_CONNECT),
    ("imds_egress", "CGROUP_SKB", CGROUP_INET_EGRESS),
    ("imds_ingress", "CGROUP_SKB", CGROUP_INET_INGRESS),
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
    try:
        text = mountinfo.read_text()
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        left, _, right = line.partition(" - ")
        fields = left.split()
        if right.split()[:1] == ["cgroup2"] and len(fields) >= 5:
            out.append(fields[4].replace("\\040", " "))
    return out


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
# unmount` removes it after, or an agent holding CAP_SYS_ADMIN mounts it itself and unmounts
# it when it stops.
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


_libbpf = None


def link_create(prog_fd: int, target_fd: int, attach_type: int) -> int:
    """A BPF link attaching a program to a cgroup: the link fd, closed to detach.
    Raises OSError."""
    global _libbpf
    if _libbpf is None:
        name = ctypes.util.find_library("bpf") or "libbpf.so.1"
        _libbpf = ctypes.CDLL(name, use_errno=True)
        _libbpf.bpf_link_create.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                            ctypes.c_void_p]
        _libbpf.bpf_link_create.restype = ctypes.c_int
    fd = _libbpf.bpf_link_create(prog_fd, target_fd, attach_type, None)
    if fd < 0:
        code = -fd if fd < -1 else ctypes.get_errno() or errno.EINVAL
        raise OSError(code, os.strerror(code))
    return fd


def port_match(ports) -> str:
    """The C expression the kernel tests the remote port with (a constant compare chain)."""
    return "(" + " || ".join(f"(p) == {int(p)}" for p in sorted(set(ports))) + ")"


class CgroupSource(KernelSource):
    name = "cgroup"
    program = "cgroup.c"
    flow_tag = "cg"
    tracks_fds = False

    def __init__(self, config):
        super().__init__(config)
        self.root = cgroup2_root()
        self.private_mount = False
        self.demux = TcpDemux(config.addresses, config.ports, self.name,
                              max_conns=config.max_flows)
        self.exec_argv = False
        self._links: list[int] = []
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
            if not helpers.effective_caps() >> helpers.CAP_SYS_ADMIN & 1:
                return ("no cgroup v2 hierarchy mounted (a cgroup v1 host), and no "
                        "CAP_SYS_ADMIN to mount one: run 'imds-tracer cgroup2 mount' as root "
                        "before the agent (the systemd unit does)")
        return None   # no v2 mount on a v1 host: start() mounts a private one

    def _cflags(self) -> list[str]:
        flags = super()._cflags() + [f"-DIMDS_PORT_MATCH(p)={port_match(self.config.ports)}"]
        if hook_support().packet_current_task:
            flags.append("-DIMDS_SKB_CURRENT_TASK")
        try:
            constants = exec_argv_constants(Btf.load(VMLINUX_BTF))
        except BtfError as exc:
            log.info("argv at exec not captured (%s): argv comes from /proc at connect", exc)
            return flags
        self.exec_argv = True
        return flags + [f"-D{k}={v}" for k, v in sorted(constants.items())]

    def _no_probe_message(self) -> str:
        return f"no cgroup hook attached to {self.root}; see imds-tracer doctor"

    def _attach(self) -> int:
        BPF = import_bcc().BPF

        if self.root is None:
            self._mount_private()
        try:
            cgroup_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        except (OSError, TypeError) as exc:
            raise SourceError(f"cgroup backend: cannot open the cgroup v2 root "
                              f"{self.root}: {getattr(exc, 'strerror', exc)}") from None
        try:
            for func, prog_type, attach_type in HOOKS:
                prog_fd, ours = self._load_hook(func, getattr(BPF, prog_type), attach_type)
                try:
                    self._links.append(link_create(prog_fd, cgroup_fd, attach_type))
                except OSError as exc:
                    raise SourceError(f"cgroup backend: attaching {func} to {self.root} "
                                      f"failed: {exc.strerror}") from None
                finally:
                    if ours:   # the link holds the program
                        os.close(prog_fd)
        finally:
            os.close(cgroup_fd)
        attached = len(self._links) + self._attach_process_cache()
        if self.exec_argv:
            try:
                self.bpf.attach_tracepoint(tp=b"sched:sched_process_exec",
                                           fn_name=b"imds_on_exec")
                attached += 1
            except Exception as exc:  # noqa: BLE001 - BCC raises bare Exception
                log.warning("sched:sched_process_exec not attached (%s): argv of processes "
                            "that exit early will be unknown", exc)
        return attached

    def _after_attach(self) -> None:
        # after attaching, so that a connect racing with the scan is seen by one or the other
        try:
            adopted, missed = self.adopt_existing()
        except OSError as exc:
            log.warning("start-up scan of connected sockets failed: %s", exc)
            return
        if adopted:
            log.info("adopted %d connection(s) opened before the agent started", adopted)
        if missed:
            log.warning("%d connection(s) opened before the agent started could not be "
                        "adopted (%s): their requests are logged without their process "
                        "where this kernel cannot tell", len(missed), missed[0])

    def adopt_existing(self) -> tuple[int, list[str]]:
        """Sockets connected to a watched address before the hooks were attached: their
        cookies are given their holder, as the connect hooks would have. (adopted, why
        each one that could not be was not)."""
        socks = self.bpf[b"socks"]
        adopted, missed = 0, []
        for held in adopt.scan_connected(self.config.addresses, self.config.ports):
            try:
                cookie = adopt.socket_cookie(held.tgid, held.fd)
            except OSError as exc:
                missed.append(f"pid {held.tgid} fd {held.fd}: {exc.strerror}")
                continue
            key = socks.Key(cookie)
            if key in socks:
                continue                  # seen by a hook meanwhile, or held by two processes
            who = adopt.holder(held.tgid, self.root)
            if who is None:
                continue                  # exited meanwhile
            leaf = socks.Leaf()
            leaf.cgroup_id, leaf.tgid, leaf.tid = who.cgroup_id, who.tgid, who.tgid
            leaf.uid, leaf.ppid, leaf.flags = who.uid, who.ppid, 0
            leaf.comm = who.comm
            socks[key] = leaf
            adopted += 1
        return adopted, missed

    def _load_hook(self, func: str, prog_type: int, attach_type: int) -> tuple[int, bool]:
        """(program fd, whether we own it). BCC before 0.19 (Debian 11's 0.18) has no
        attach_type for load_func, which cgroup/connect programs need at load: there, BCC's
        compiled instructions are loaded with it directly."""
        try:
            return self.bpf.load_func(func.encode(), prog_type, attach_type=attach_type).fd, False
        except TypeError:
            pass
        try:
            return helpers.load_program(prog_type, attach_type,
                                        self.bpf.dump_func(func.encode()), func), True
        except (OSError, helpers.ProbeError) as exc:
            raise SourceError(f"cgroup backend: loading {func} failed: "
                              f"{getattr(exc, 'strerror', None) or exc}") from None

    def _mount_private(self) -> None:
        try:
            self.root = mount_private_cgroup2()
        except OSError as exc:
            raise SourceError(f"cgroup backend: no cgroup v2 hierarchy mounted (a cgroup v1 "
                              f"host) and mounting one at {PRIVATE_CGROUP2} failed: "
                              f"{exc.strerror}") from None
        self.private_mount = True
        log.warning("cgroup backend: no cgroup v2 hierarchy mounted (a cgroup v1 host): "
                    "mounted one at %s for the socket hooks, every process is in its root; "
                    "unmounted at exit", self.root)

    def stop(self) -> None:
        links, self._links = self._links, []
        for fd in links:   # closing the last reference to a link detaches its program
            try:
                os.close(fd)
            except OSError:
                pass
        super().stop()
        if self.private_mount:
            self.private_mount = False
            unmount_private_cgroup2()

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
            else:
                self._conns.move_to_end(ev.conn_id)
            process = self._snapshot(ev, info)
        self.demux.ip_packet(payload, 0, version, self.wall_time(ev.ts_ns), self._out,
                             scope=ev.conn_id, process=process)
