"""Our pcap / pcapng reader (sources/pcapfile.py): the same records scapy's raw readers give
for every capture of the corpus, both byte orders, nanoseconds, gzip, pcapng's time
resolutions and packet blocks; lengths from the file bounded before anything is read; and
the one connection table (conntable.py) the demultiplexer and reassembly share."""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import pytest

from imds_tracer.conntable import ConnTable
from imds_tracer.sources.pcapfile import CaptureError, open_capture, records

DATA = Path(__file__).resolve().parents[1] / "data"
CAPTURES = sorted(p for p in DATA.glob("*.pcap*"))


def read_all(path) -> list:
    with open_capture(str(path)) as fh:
        return list(records(fh))


@pytest.mark.parametrize("path", CAPTURES, ids=lambda p: p.name)
def test_records_are_scapys(path):
    from scapy.utils import RawPcapNgReader, RawPcapReader

    theirs = []
    reader = RawPcapReader(str(path))
    ng = isinstance(reader, RawPcapNgReader)
    for data, meta in reader:
        if ng:
            theirs.append((meta.linktype, ((meta.tshigh << 32) | meta.tslow) / meta.tsresol,
                           data, meta.wirelen))
        else:
            theirs.append((reader.linktype, meta.sec + meta.usec / (1e9 if reader.nano
                                                                     else 1e6), data,
                           meta.wirelen))
    reader.close()
    ours = read_all(path)
    assert len(ours) == len(theirs) > 0
    for (link, ts, data, wire), (their_link, their_ts, their_data, their_wire) in zip(ours,
                                                                                     theirs):
        assert (link, data, wire) == (their_link, their_data, their_wire)
        assert ts == pytest.approx(their_ts, abs=1e-6)


def pcap(endian: str, nano: bool, packets, linktype: int = 101) -> bytes:
    magic = 0xA1B23C4D if nano else 0xA1B2C3D4
    out = struct.pack(endian + "IHHiIII", magic, 2, 4, 0, 0, 65535, linktype)
    for sec, frac, data, *wire in packets:   # wire: the length sent, when more was
        out += struct.pack(endian + "IIII", sec, frac, len(data), *(wire or [len(data)])) + data
    return out


@pytest.mark.parametrize("endian", ["<", ">"])
@pytest.mark.parametrize("nano", [False, True])
def test_pcap_byte_orders_and_nanoseconds(tmp_path, endian, nano):
    path = tmp_path / "x.pcap"
    path.write_bytes(pcap(endian, nano, [(1795000000, 250, b"\x45abc", 70000),
                                         (1795000001, 0, b"")]))
    (link, ts, data, wire), (_link, ts2, empty, _wire) = read_all(path)
    assert (link, data, wire, empty) == (101, b"\x45abc", 70000, b"")
    assert ts == pytest.approx(1795000000 + 250 / (1e9 if nano else 1e6), abs=1e-9)
    assert ts2 == 1795000001


def test_gzip_compressed_capture(tmp_path):
    path = tmp_path / "x.pcap.gz"
    path.write_bytes(gzip.compress((DATA / "aws.pcap").read_bytes()))
    assert read_all(path) == read_all(DATA / "aws.pcap")


def block(endian: str, kind: int, body: bytes) -> bytes:
    body += b"\0" * (-len(body) % 4)
    length = 12 + len(body)
    return struct.pack(endian + "II", kind, length) + body + struct.pack(endian + "I", length)


def shb(endian: str) -> bytes:
    return block(endian, 0x0A0D0D0A, struct.pack(endian + "IHHq", 0x1A2B3C4D, 1, 0, -1))


def idb(endian: str, linktype: int, tsresol: int | None = None) -> bytes:
    options = b""
    if tsresol is not None:
        options = struct.pack(endian + "HHB3x", 9, 1, tsresol) + struct.pack(endian + "HH", 0, 0)
    return block(endian, 1, struct.pack(endian + "HHI", linktype, 0, 0) + options)


def epb(endian: str, iface: int, ticks: int, data: bytes, wire: int = 0) -> bytes:
    return block(endian, 6, struct.pack(endian + "IIIII", iface, ticks >> 32,
                                        ticks & 0xFFFFFFFF, len(data), wire or len(data))
                 + data)


@pytest.mark.parametrize("endian", ["<", ">"])
def test_pcapng_resolutions_interfaces_and_packet_blocks(tmp_path, endian):
    ns = 1795000000_123456789
    opb = block(endian, 2, struct.pack(endian + "HHIIII", 1, 0, (ns // 1000) >> 32,
                                       (ns // 1000) & 0xFFFFFFFF, 2, 9000) + b"\x60\x00")
    spb = block(endian, 3, struct.pack(endian + "I", 3) + b"\x45\x00\x00")
    other = block(endian, 5, b"statistics")   # a block kind we pass over
    path = tmp_path / "x.pcapng"
    path.write_bytes(shb(endian) + idb(endian, 1, tsresol=9) + idb(endian, 101)
                     + epb(endian, 0, ns, b"frame", 131072) + other + opb + spb)
    (link, ts, data, wire), (link2, ts2, data2, wire2), (link3, ts3, data3, wire3) = \
        read_all(path)
    assert (link, data, wire) == (1, b"frame", 131072) and ts == pytest.approx(ns / 1e9, abs=1e-6)
    assert (link2, data2, wire2) == (101, b"\x60\x00", 9000)
    assert ts2 == pytest.approx(ns / 1e9, abs=1e-5)
    assert (link3, data3, ts3, wire3) == (1, b"\x45\x00\x00", ts2, 3)   # no time of its own


@pytest.mark.parametrize("blob, words", [
    (b"", "not a pcap"),
    (b"\xd4\xc3\xb2\xa1\x02\x00", "not a pcap"),
    (b"GIF89a" + b"\0" * 40, "not a pcap"),
    # a record claiming 4 GiB: refused before anything is allocated
    (pcap("<", False, []) + struct.pack("<IIII", 0, 0, 0xFFFFFFF0, 0xFFFFFFF0), "claims"),
    (shb("<") + struct.pack("<II", 6, 7), "length of 7"),
    (shb("<") + epb("<", 0, 1, b"x"), "interface 0"),
])
def test_what_is_not_a_capture_is_one_line(tmp_path, blob, words):
    path = tmp_path / "bad"
    path.write_bytes(blob)
    with pytest.raises(CaptureError, match=words) as caught:
        read_all(path)
    assert "\n" not in str(caught.value) and not caught.value.cut


def test_a_cut_file_is_told_apart_after_its_records(tmp_path):
    whole = pcap("<", False, [(1, 0, b"\x45" * 40)] * 3)
    path = tmp_path / "cut.pcap"
    path.write_bytes(whole[:-10])
    with open_capture(str(path)) as fh:
        stream = records(fh)
        got = [next(stream) for _ in range(3)]
        with pytest.raises(CaptureError) as caught:
            next(stream)
    assert caught.value.cut and [len(d) for _l, _t, d, _w in got] == [40, 40, 30]
    ng = shb("<") + idb("<", 101) + epb("<", 0, 1, b"\x45" * 40)
    path.write_bytes(ng[:-6])
    with pytest.raises(CaptureError) as caught:
        read_all(path)
    assert caught.value.cut


@pytest.mark.parametrize("damage, words", [("cut", "truncated capture"),
                                           ("flipped", "unreadable after")])
def test_a_damaged_gzip_capture_is_one_line_after_what_it_held(tmp_path, damage, words):
    from imds_tracer.sources.base import SourceError
    from imds_tracer.sources.replay import PcapReplay

    blob = bytearray(gzip.compress((DATA / "aws.pcap").read_bytes()))
    if damage == "cut":
        del blob[len(blob) // 2:]
    else:
        for at in range(len(blob) // 2, len(blob) // 2 + 40):
            blob[at] ^= 0x5A
    path = tmp_path / "x.pcap.gz"
    path.write_bytes(bytes(blob))
    replay = PcapReplay(["169.254.169.254"], [80])
    with pytest.raises(SourceError, match=words) as caught:
        for _batch, _tick in replay.read(str(path)):
            pass
    assert "\n" not in str(caught.value) and replay.stats.packets > 0


def test_conn_table_pushes_out_the_least_recently_used():
    table = ConnTable(2)
    assert table.put("a", 1) is None and table.put("b", 2) is None
    assert table.get("a") == 1              # "a" is now the most recently used
    assert table.put("c", 3) == ("b", 2)    # so "b" goes, and the caller is told
    assert table.put("a", 10) is None and table.items() == [("c", 3), ("a", 10)]
    assert table.pop("c") == 3 and table.pop("c") is None and len(table) == 1
    assert table.get("zz") is None and "a" in table
