"""btf.py against a hand-built BTF blob (no kernel needed), and the /proc/net/tcp parser of
the start-up scan."""
import struct

import pytest

from imds_tracer.sources import btf as btfmod
from imds_tracer.sources.tracepoint import parse_proc_net_tcp


def build_btf():
    strings = b"\0"
    def s(name):
        nonlocal strings
        off = len(strings)
        strings += name.encode() + b"\0"
        return off
    types = b""
    def t(name_off, kind, vlen, size_or_type, kind_flag=0):
        return struct.pack("<III", name_off, (kind_flag << 31) | (kind << 24) | vlen, size_or_type)
    # [1] INT u8 ; [2] INT u64 ; [3] PTR -> 1 ; [4] TYPEDEF size_t -> 2
    types += t(s("u8"), btfmod.INT, 0, 1) + struct.pack("<I", 8)
    types += t(s("u64"), btfmod.INT, 0, 8) + struct.pack("<I", 64)
    types += t(0, btfmod.PTR, 0, 1)
    types += t(s("size_t"), btfmod.TYPEDEF, 0, 2)
    # [5] anon UNION { ptr ubuf; ptr __iov; } size 8
    types += t(0, btfmod.UNION, 2, 8) + struct.pack("<III", s("ubuf"), 3, 0) + struct.pack("<III", s("__iov"), 3, 0)
    # [6] anon STRUCT { union@0; size_t count@64 } size 16
    types += t(0, btfmod.STRUCT, 2, 16) + struct.pack("<III", 0, 5, 0) + struct.pack("<III", s("count"), 4, 64)
    # [7] STRUCT iov_iter { u8 iter_type@0; size_t iov_offset@64; anon@128; u64 nr_segs@256 }
    types += (t(s("iov_iter"), btfmod.STRUCT, 4, 40)
              + struct.pack("<III", s("iter_type"), 1, 0) + struct.pack("<III", s("iov_offset"), 4, 64)
              + struct.pack("<III", 0, 6, 128) + struct.pack("<III", s("nr_segs"), 2, 256))
    # [8] ENUM iter_type { ITER_UBUF=0, ITER_IOVEC=1 }
    types += t(s("iter_type"), btfmod.ENUM, 2, 4) + struct.pack("<Ii", s("ITER_UBUF"), 0) + struct.pack("<Ii", s("ITER_IOVEC"), 1)
    hdr = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(types), len(types), len(strings))
    return hdr + types + strings


def test_offsets_through_anonymous_members():
    b = btfmod.Btf(build_btf())
    assert b.member_offset("iov_iter", "iter_type") == 0
    assert b.member_offset("iov_iter", "iov_offset") == 8
    assert b.member_offset("iov_iter", "ubuf") == 16
    assert b.member_offset("iov_iter", "__iov") == 16
    assert b.member_offset("iov_iter", "count") == 24
    assert b.member_offset("iov_iter", "nr_segs") == 32
    assert b.member_size("iov_iter", "iter_type") == 1
    assert b.enum_value("iter_type", "ITER_IOVEC") == 1
    assert not b.has_member("iov_iter", "iov")
    with pytest.raises(btfmod.BtfError):
        b.member_offset("iov_iter", "nope")
    with pytest.raises(btfmod.BtfError):
        b.find(btfmod.STRUCT, "sock")


def test_bad_magic():
    with pytest.raises(btfmod.BtfError):
        btfmod.Btf(b"\0" * 64)


@pytest.mark.skipif(not btfmod.VMLINUX_BTF.exists(), reason="no kernel BTF here")
def test_running_kernel_has_what_the_kprobe_backend_needs():
    consts = btfmod.kprobe_constants(btfmod.Btf.load())
    assert set(btfmod.KPROBE_OFFSETS) <= set(consts)


PROC_NET_TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: FEA9FEA9:9880 FEA9FEA9:0050 01 00000000:00000000 00:00000000 00000000     0        0 40212 1 0000000000000000 20 4 30 10 -1
   1: 00000000:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 40100 1 0000000000000000 100 0 0 10 0
"""
PROC_NET_TCP6 = """\
  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: C20E00FD000000000000000054020000:A2B4 C20E00FD000000000000000054020000:0050 01 00000000:00000000 00:00000000 00000000     0        0 51000 1 0000000000000000 20 4 30 10 -1
   1: 0000000000000000FFFF00007F000001:1F90 0000000000000000FFFF0000C8646464:0050 02 00000000:00000000 00:00000000 00000000     0        0 51001 1 0000000000000000 20 4 30 10 -1
"""


def test_proc_net_tcp_parsing():
    rows = list(parse_proc_net_tcp(PROC_NET_TCP))
    assert rows[0] == (40212, "169.254.169.254", 80, "01")
    assert rows[1][1:3] == ("0.0.0.0", 0)
    rows6 = list(parse_proc_net_tcp(PROC_NET_TCP6))
    assert rows6[0] == (51000, "fd00:ec2::254", 80, "01")
    assert rows6[1] == (51001, "100.100.100.200", 80, "02")   # v4-mapped shown as IPv4
