"""Reading pcap and pcapng files (gzip-compressed too): records, not dissected packets.

Our own reader rather than scapy's: importing scapy.utils loads scapy's manufacturer
database and configuration, three times the time the rest of a small replay takes, and its
raw readers fail differently from one version to the next (Debian 11's 2.4.4 raises
IndexError and MemoryError on mangled files). This one reads records by their lengths, bounds
every length before reading it, and says what is wrong in one line (`CaptureError`).

Formats: pcap (https://www.ietf.org/archive/id/draft-ietf-opsawg-pcap-03.html) in both byte
orders, micro- and nanosecond; pcapng (draft-ietf-opsawg-pcapng): section headers in either
byte order, interfaces with `if_tsresol`, enhanced, simple and obsolete packet blocks.
"""
from __future__ import annotations

import struct
from typing import BinaryIO, Iterator, List, Tuple

Record = Tuple[int, float, bytes, int]   # (link type, seconds since the epoch, captured bytes,
                                         #  the packet's length on the wire)

PCAP_MAGICS = {b"\xd4\xc3\xb2\xa1": ("<", 1e6), b"\xa1\xb2\xc3\xd4": (">", 1e6),
               b"\x4d\x3c\xb2\xa1": ("<", 1e9), b"\xa1\xb2\x3c\x4d": (">", 1e9)}
PCAPNG_SHB = b"\x0a\x0d\x0d\x0a"
BYTE_ORDER_MAGIC = {b"\x4d\x3c\x2b\x1a": "<", b"\x1a\x2b\x3c\x4d": ">"}
BLOCK_IDB, BLOCK_OPB, BLOCK_SPB, BLOCK_EPB = 1, 2, 3, 6
OPT_END, OPT_TSRESOL = 0, 9
MAX_RECORD = 1 << 24   # bytes: more than any link's snap length; beyond it a length is garbage


class CaptureError(Exception):
    """The file cannot be read further. `cut`: it ends inside a record (the records before
    were read); else its content is not a capture (or no longer one)."""

    def __init__(self, message: str, *, cut: bool = False):
        super().__init__(message)
        self.cut = cut


def open_capture(path: str) -> BinaryIO:
    """The file, decompressed when it is gzip. Raises OSError."""
    fh = open(path, "rb")
    if fh.peek(2)[:2] == b"\x1f\x8b":
        import gzip   # only for compressed captures

        fh.close()
        return gzip.open(path, "rb")
    return fh


def records(fh: BinaryIO) -> Iterator[Record]:
    """Every record of a pcap or pcapng stream, in file order. Raises CaptureError, after
    yielding what could be read; a pcap record cut short is yielded before the error."""
    first = fh.read(4)
    if len(first) < 4:
        raise CaptureError("not a pcap or pcapng capture (the file is empty or too short)")
    if first in PCAP_MAGICS:
        return _pcap(fh, *PCAP_MAGICS[first])
    if first == PCAPNG_SHB:
        return _pcapng(fh, first)
    raise CaptureError(f"not a pcap or pcapng capture (it starts with {first.hex()})")


def _read(fh: BinaryIO, n: int, what: str) -> bytes:
    data = fh.read(n)
    if len(data) < n:
        raise CaptureError(f"the file ends inside {what}", cut=True)
    return data


def _pcap(fh: BinaryIO, endian: str, per_second: float) -> Iterator[Record]:
    header = fh.read(20)
    if len(header) < 20:
        raise CaptureError("not a pcap or pcapng capture (its file header is cut short)")
    linktype = struct.unpack(endian + "I", header[16:20])[0] & 0xFFFF
    return _pcap_records(fh, struct.Struct(endian + "IIII"), linktype, per_second)


def _pcap_records(fh: BinaryIO, record_header: struct.Struct, linktype: int,
                  per_second: float) -> Iterator[Record]:
    while True:
        raw = fh.read(16)
        if not raw:
            return
        if len(raw) < 16:
            raise CaptureError("the file ends inside a record header", cut=True)
        sec, frac, caplen, wire_len = record_header.unpack(raw)
        if caplen > MAX_RECORD:
            raise CaptureError(f"a record claims {caplen} bytes")
        data = fh.read(caplen)
        yield linktype, sec + frac / per_second, data, wire_len
        if len(data) < caplen:
            raise CaptureError("the file ends inside a record", cut=True)


def _pcapng(fh: BinaryIO, block_type: bytes) -> Iterator[Record]:
    endian, interfaces = "<", []   # (link type, units per second) by interface id
    last_ts = 0.0                  # a simple packet block has no time: the one before it
    while True:
        raw_length = _read(fh, 4, "a block header")
        if block_type == PCAPNG_SHB:   # a new section: its byte order, its interfaces
            endian = BYTE_ORDER_MAGIC.get(_read(fh, 4, "a section header"))
            if endian is None:
                raise CaptureError("a section header without its byte-order magic")
            interfaces = []
            _read(fh, _length(raw_length, endian) - 12, "a section header")
        else:
            kind = struct.unpack(endian + "I", block_type)[0]
            body = _read(fh, _length(raw_length, endian) - 12, "a block")
            _read(fh, 4, "a block")
            if kind == BLOCK_IDB:
                interfaces.append(_interface(body, endian))
            elif kind in (BLOCK_EPB, BLOCK_OPB, BLOCK_SPB):
                linktype, ts, data, wire_len = _packet(kind, body, endian, interfaces)
                last_ts = last_ts if ts is None else ts
                yield linktype, last_ts, data, wire_len
        block_type = fh.read(4)
        if not block_type:
            return
        if len(block_type) < 4:
            raise CaptureError("the file ends inside a block header", cut=True)


def _length(raw: bytes, endian: str) -> int:
    length = struct.unpack(endian + "I", raw)[0]
    if length < 12 or length % 4 or length > MAX_RECORD:
        raise CaptureError(f"a block claims a length of {length} bytes")
    return length


def _interface(body: bytes, endian: str) -> Tuple[int, float]:
    if len(body) < 8:
        raise CaptureError("an interface block is too short")
    linktype = struct.unpack(endian + "H", body[:2])[0]
    per_second = 1e6
    pos = 8
    while pos + 4 <= len(body):
        code, size = struct.unpack(endian + "HH", body[pos:pos + 4])
        if code == OPT_END:
            break
        if code == OPT_TSRESOL and size >= 1 and pos + 5 <= len(body):
            value = body[pos + 4]
            per_second = float(2 ** (value & 0x7F) if value & 0x80 else 10 ** value)
        pos += 4 + (size + 3) // 4 * 4
    return linktype, per_second


def _packet(kind: int, body: bytes, endian: str, interfaces: List):
    """(link type, time or None, data, length on the wire) of a packet block."""
    if kind == BLOCK_SPB:   # interface 0, no timestamp; the packet's length, then it, padded
        if not interfaces or len(body) < 4:
            raise CaptureError("a simple packet block without an interface")
        wire_len = struct.unpack(endian + "I", body[:4])[0]
        return interfaces[0][0], None, body[4:4 + wire_len], wire_len
    if len(body) < 20:
        raise CaptureError("a packet block is too short")
    if kind == BLOCK_EPB:
        iface, high, low, caplen, wire_len = struct.unpack(endian + "IIIII", body[:20])
    else:
        iface, _drops, high, low, caplen, wire_len = struct.unpack(endian + "HHIIII",
                                                                   body[:20])
    if iface >= len(interfaces):
        raise CaptureError(f"a packet of interface {iface}, which the file does not describe")
    linktype, per_second = interfaces[iface]
    return linktype, ((high << 32) | low) / per_second, body[20:20 + caplen], wire_len
