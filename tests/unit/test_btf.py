"""btf.py against a hand-built BTF blob (no kernel needed), and the /proc/net/tcp parser of
the start-up scan."""
import struct

import pytest

from imds_tracer.sources import btf as btfmod
from imds_tracer.sources.adopt import parse_proc_net_tcp


class BtfBuilder:
    """A BTF blob made by hand, type by type (ids from 1, in the order added)."""

    def __init__(self):
        self.strings = b"\0"
        self.types = b""
        self.count = 0

    def _s(self, name):
        if not name:
            return 0
        off = len(self.strings)
        self.strings += name.encode() + b"\0"
        return off

    def _add(self, name, kind, vlen, size_or_type, tail=b""):
        self.types += struct.pack("<III", self._s(name), (kind << 24) | vlen, size_or_type) + tail
        self.count += 1
        return self.count

    def int_(self, name, size):
        return self._add(name, btfmod.INT, 0, size, struct.pack("<I", size * 8))

    def ptr(self, to):
        return self._add("", btfmod.PTR, 0, to)

    def typedef(self, name, to):
        return self._add(name, btfmod.TYPEDEF, 0, to)

    def struct(self, name, size, members, kind=btfmod.STRUCT):
        tail = b"".join(struct.pack("<III", self._s(m), t, bits) for m, t, bits in members)
        return self._add(name, kind, len(members), size, tail)

    def enum(self, name, values):
        tail = b"".join(struct.pack("<Ii", self._s(n), v) for n, v in values)
        return self._add(name, btfmod.ENUM, len(values), 4, tail)

    def blob(self):
        hdr = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(self.types), len(self.types),
                          len(self.strings))
        return hdr + self.types + self.strings


def build_btf():
    """iov_iter as since 6.4: u8 iter_type, ubuf/__iov in an anonymous union."""
    b = BtfBuilder()
    u8, u64 = b.int_("u8", 1), b.int_("u64", 8)
    ptr = b.ptr(u8)
    size_t = b.typedef("size_t", u64)
    union = b.struct("", 8, [("ubuf", ptr, 0), ("__iov", ptr, 0)], kind=btfmod.UNION)
    anon = b.struct("", 16, [("", union, 0), ("count", size_t, 64)])
    b.struct("iov_iter", 40, [("iter_type", u8, 0), ("iov_offset", size_t, 64), ("", anon, 128),
                              ("nr_segs", u64, 256)])
    b.enum("iter_type", [("ITER_UBUF", 0), ("ITER_IOVEC", 1)])
    return b.blob()


ITER_TYPE_5_10 = [("ITER_IOVEC", 4), ("ITER_KVEC", 8), ("ITER_BVEC", 16), ("ITER_PIPE", 32),
                  ("ITER_DISCARD", 64)]


def build_btf_5_10(enum_name="iter_type", values=ITER_TYPE_5_10):
    """iov_iter as in 4.20-5.13: `unsigned int type` (an enum iter_type bit | the direction),
    the iov pointer in an anonymous union, no ubuf."""
    b = BtfBuilder()
    uint, u64 = b.int_("unsigned int", 4), b.int_("long unsigned int", 8)
    ptr = b.ptr(uint)
    size_t = b.typedef("size_t", u64)
    union = b.struct("", 8, [("iov", ptr, 0), ("kvec", ptr, 0)], kind=btfmod.UNION)
    b.struct("iov_iter", 40, [("type", uint, 0), ("iov_offset", size_t, 64),
                              ("count", size_t, 128), ("", union, 192), ("nr_segs", u64, 256)])
    b.enum(enum_name, values)
    return b.blob()


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


def test_iter_type_layout_of_a_5_14_and_later_kernel():
    """A byte of its own, 0-based enum values, ITER_UBUF present (6.0+)."""
    layout = btfmod.iter_type_layout(btfmod.Btf(build_btf()))
    assert layout == {"IMDS_OFF_ITER_TYPE": 0, "IMDS_ITER_TYPE_SIZE": 1,
                      "IMDS_ITER_TYPE_MASK": 0xFF, "IMDS_ITER_IOVEC": 1, "IMDS_ITER_UBUF": 0}


def test_iter_type_layout_of_a_5_10_kernel():
    """The word shared with the direction bit: a writev's iterator holds ITER_IOVEC | WRITE =
    5, which the mask turns into ITER_IOVEC; no ITER_UBUF, no ubuf offset."""
    b = btfmod.Btf(build_btf_5_10())
    consts = btfmod.iter_type_layout(b)
    assert consts == {"IMDS_OFF_ITER_TYPE": 0, "IMDS_ITER_TYPE_SIZE": 4,
                      "IMDS_ITER_TYPE_MASK": 4 | 8 | 16 | 32 | 64, "IMDS_ITER_IOVEC": 4,
                      "IMDS_ITER_UBUF": -1}
    write_iovec, read_kvec = 4 | 1, 8 | 0
    assert write_iovec & consts["IMDS_ITER_TYPE_MASK"] == consts["IMDS_ITER_IOVEC"]
    assert read_kvec & consts["IMDS_ITER_TYPE_MASK"] != consts["IMDS_ITER_IOVEC"]
    assert b.member_offset("iov_iter", "iov") == 24 and not b.has_member("iov_iter", "ubuf")


@pytest.mark.parametrize("blob,complaint", [
    # 4.19 and older: the type values are an anonymous enum (ITER_IOVEC = 0, shared word)
    (build_btf_5_10(enum_name=""), "no enum iter_type"),
    # a shared word whose enum is not bit flags cannot be masked apart from the direction
    (build_btf_5_10(values=[("ITER_IOVEC", 0), ("ITER_KVEC", 1)]), "not bit flags"),
    (build_btf_5_10(values=[("ITER_KVEC", 8)]), "no ITER_IOVEC"),
], ids=["4.19-anonymous-enum", "shared-word-not-flags", "no-iovec"])
def test_iter_type_layout_refuses_what_it_cannot_read(blob, complaint):
    with pytest.raises(btfmod.BtfError, match=complaint):
        btfmod.iter_type_layout(btfmod.Btf(blob))


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
