"""The event layout shared with the BPF programs: every IMDS_EV_ / IMDS_F_ / IMDS_CNT_ constant
of `bpf/event.h` and the ctypes mirror of `struct imds_event`, in one place
(tests/unit/test_event_layout.py pins them to the header), and the small codecs of its fields.
"""
from __future__ import annotations

import ctypes
import ipaddress
from pathlib import Path

from .. import procfs

# imds_tracer/bpf is a symlink to ../bpf in a checkout and a directory in an installed
# package: found relative to this module, never to the working directory.
BPF_DIR = Path(__file__).resolve().parent.parent / "bpf"

# kinds (IMDS_EV_*)
EV_CONNECT, EV_SEND, EV_RECV, EV_CLOSE, EV_TGID_RESET, EV_PACKET = 1, 2, 3, 4, 5, 6
# flags (IMDS_F_*)
F_ARGV_TRUNCATED, F_NO_ARGV, F_INGRESS, F_OWNER_GUESSED = 0x1, 0x2, 0x4, 0x8
# counters[] slots (IMDS_CNT_*)
CNT_OUTPUT_FAILED, CNT_SENDS_TRUNCATED, CNT_STALE_FD, CNT_ARGV_TRUNCATED = range(4)
CNT_SLOTS = 4

AF_INET, AF_INET6 = 2, 10
RESPONSE_BYTES = 256      # IMDS_RESPONSE_BYTES as user space sets it
ARGV_BUF = 1024 + 256     # IMDS_ARGV_BUF in bpf/common.h


class EventHeader(ctypes.Structure):
    """ctypes mirror of `struct imds_event` (bpf/event.h); the payload follows it."""
    _fields_ = [
        ("ts_ns", ctypes.c_uint64),
        ("conn_id", ctypes.c_uint64),
        ("cgroup_id", ctypes.c_uint64),
        ("tgid", ctypes.c_uint32),
        ("tid", ctypes.c_uint32),
        ("uid", ctypes.c_uint32),
        ("ppid", ctypes.c_uint32),
        ("fd", ctypes.c_uint32),
        ("fd_last", ctypes.c_uint32),
        ("payload_len", ctypes.c_uint32),
        ("lost_bytes", ctypes.c_uint32),
        ("kind", ctypes.c_uint16),
        ("family", ctypes.c_uint16),
        ("dport", ctypes.c_uint16),
        ("flags", ctypes.c_uint16),
        ("daddr", ctypes.c_uint8 * 16),
        ("comm", ctypes.c_char * 16),
    ]


HEADER_SIZE = ctypes.sizeof(EventHeader)


def format_addr(raw: bytes) -> str:
    """16 bytes of address: v4-mapped IPv6 is shown as IPv4."""
    addr = ipaddress.IPv6Address(bytes(raw))
    mapped = addr.ipv4_mapped
    return str(mapped) if mapped is not None else str(addr)


def addr_key_bytes(text: str) -> bytes:
    """The 16-byte form the kernel filters on (IPv4 as v4-mapped)."""
    addr = ipaddress.ip_address(text)
    if addr.version == 4:
        return b"\0" * 10 + b"\xff\xff" + addr.packed
    return addr.packed


split_argv = procfs.split_argv   # the kernel's exec cache holds argv as /proc does
