"""Which BPF helpers the running kernel lets a program type call, found by a load test.

The set differs between kernels of the same version family and is not written anywhere a
program can read: Debian's 6.1 refuses `bpf_get_current_pid_tgid` in a `cgroup_skb` program,
6.18 accepts it. So we ask the verifier, as bpftool's `feature probe` does: load a
three-instruction program of the type that calls the helper, and see whether the verifier
says "unknown func" / "cannot use helper" (the helper is not in the type's list) or anything
else (it is: an argument the probe did not set up properly is a later, different complaint). No BCC, no
compiler: one bpf(BPF_PROG_LOAD) per question, microseconds each.
"""
from __future__ import annotations

import ctypes
import errno
import os
import platform
import re
import resource

from .bpfsys import SYS_BPF

BPF_MAP_CREATE, BPF_PROG_LOAD = 0, 5
MAP_RINGBUF = 27

# enum bpf_prog_type / bpf_attach_type (uapi/linux/bpf.h)
PROG_CGROUP_SKB, PROG_CGROUP_SOCK_ADDR = 8, 18
ATTACH_CGROUP_INET_EGRESS, ATTACH_CGROUP_INET4_CONNECT = 1, 10

# enum bpf_func_id
HELPERS = {
    "ktime_get_ns": 5,
    "get_smp_processor_id": 8,
    "get_current_pid_tgid": 14,
    "get_current_uid_gid": 15,
    "get_current_comm": 16,
    "perf_event_output": 25,
    "skb_load_bytes": 26,
    "get_socket_cookie": 46,
    "skb_cgroup_id": 79,
    "get_current_cgroup_id": 80,
    "ringbuf_output": 130,
}


# what the verifier says when a type may not call a helper (older kernels, newer kernels)
REFUSALS = ("unknown func", "invalid func", "cannot use helper")


class ProgLoadAttr(ctypes.Structure):
    """The BPF_PROG_LOAD part of union bpf_attr, padded to a size every kernel accepts."""
    _fields_ = [
        ("prog_type", ctypes.c_uint32),
        ("insn_cnt", ctypes.c_uint32),
        ("insns", ctypes.c_uint64),
        ("license", ctypes.c_uint64),
        ("log_level", ctypes.c_uint32),
        ("log_size", ctypes.c_uint32),
        ("log_buf", ctypes.c_uint64),
        ("kern_version", ctypes.c_uint32),
        ("prog_flags", ctypes.c_uint32),
        ("prog_name", ctypes.c_char * 16),
        ("prog_ifindex", ctypes.c_uint32),
        ("expected_attach_type", ctypes.c_uint32),
        ("pad", ctypes.c_uint8 * 40),
    ]


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return bytes((code, dst | src << 4)) + off.to_bytes(2, "little", signed=True) + \
        imm.to_bytes(4, "little", signed=True)


def _calling(helper_id: int) -> bytes:
    """call helper; r0 = 1; exit  (1: "let it pass" for every cgroup program type)"""
    return _insn(0x85, imm=helper_id) + _insn(0xb7, dst=0, imm=1) + _insn(0x95)


class ProbeError(Exception):
    """The kernel would not say (no BPF syscall, not permitted)."""


def raise_memlock() -> None:
    """Kernels before 5.11 charge BPF maps and programs to RLIMIT_MEMLOCK, counted per user:
    with an agent running, root's 64 KiB default is used up and a probe's map create fails
    with EPERM. Lifted, as BCC does for itself when it loads (and the systemd unit with
    LimitMEMLOCK=infinity)."""
    try:
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (resource.RLIM_INFINITY,) * 2)
    except (ValueError, OSError):
        pass   # not permitted: the bpf() call says so


def _bpf_syscall() -> int:
    raise_memlock()
    nr = SYS_BPF.get(platform.machine())
    if nr is None:
        raise ProbeError(f"bpf syscall number unknown on {platform.machine()}")
    return nr


def ringbuf_map_supported() -> bool:
    """Whether the kernel creates a BPF ring buffer map (mainline 5.8; distribution kernels
    older by their number may have it backported). Raises ProbeError."""
    attr = (ctypes.c_uint32 * 30)(MAP_RINGBUF, 0, 0, 4096)   # type, key, value, max_entries
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.syscall(_bpf_syscall(), BPF_MAP_CREATE, ctypes.byref(attr), ctypes.sizeof(attr))
    if fd >= 0:
        os.close(fd)
        return True
    err = ctypes.get_errno()
    if err == errno.EINVAL:
        return False
    raise ProbeError(f"bpf(BPF_MAP_CREATE) failed: {os.strerror(err)}")


def _prog_load(prog_type: int, attach_type: int, code: bytes, name: bytes,
               log_size: int) -> tuple[int, int, str]:
    """bpf(BPF_PROG_LOAD): (fd or -1, errno, verifier log). Raises ProbeError."""
    nr = _bpf_syscall()
    insns = ctypes.create_string_buffer(code, len(code))
    license_ = ctypes.create_string_buffer(b"GPL")
    log = ctypes.create_string_buffer(max(log_size, 1))
    attr = ProgLoadAttr(prog_type=prog_type, insn_cnt=len(code) // 8,
                        insns=ctypes.addressof(insns), license=ctypes.addressof(license_),
                        log_level=1 if log_size else 0, log_size=log_size,
                        log_buf=ctypes.addressof(log) if log_size else 0,
                        prog_name=name[:15], expected_attach_type=attach_type)
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.syscall(nr, BPF_PROG_LOAD, ctypes.byref(attr), ctypes.sizeof(attr))
    return fd, ctypes.get_errno() if fd < 0 else 0, log.value.decode("ascii", "replace")


def load_program(prog_type: int, attach_type: int, code: bytes, name: str) -> int:
    """Loads compiled BPF instructions (BCC's, maps already resolved) with an expected
    attach type, for BCC versions whose load_func cannot pass one (0.18, Debian 11): the
    program fd. Raises OSError."""
    fd, err, _ = _prog_load(prog_type, attach_type, code, name.encode(), 0)
    if fd < 0:
        raise OSError(err, os.strerror(err))
    return fd


def helper_allowed(prog_type: int, attach_type: int, helper: str) -> bool:
    """True when the kernel lets `prog_type` programs call `helper`. Raises ProbeError."""
    fd, err, text = _prog_load(prog_type, attach_type, _calling(HELPERS[helper]),
                               b"imds_probe", 16384)
    if fd >= 0:
        os.close(fd)
        return True
    if any(refusal in text for refusal in REFUSALS):
        return False
    if err in (errno.EPERM, errno.ENOSYS) or not text:
        raise ProbeError(f"bpf(BPF_PROG_LOAD) failed: {os.strerror(err)}")
    return True   # refused for another reason (the probe's arguments): the helper exists


def allowed_helpers(prog_type: int, attach_type: int, names) -> dict[str, bool]:
    """{helper: allowed} for each of `names`. Raises ProbeError."""
    return {name: helper_allowed(prog_type, attach_type, name) for name in names}


def ringbuf_supported() -> bool:
    """BPF ring buffers: asked of the kernel (a map created and closed); by the version
    (mainline 5.8) only where the kernel will not say."""
    try:
        return ringbuf_map_supported()
    except ProbeError:
        match = re.match(r"(\d+)\.(\d+)", platform.release())
        return bool(match) and (int(match.group(1)), int(match.group(2))) >= (5, 8)
