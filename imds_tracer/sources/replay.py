"""Replay: pcap / pcapng files (read with scapy's raw readers) into the same pipeline.

Packets are not dissected by scapy: the link, IP and TCP headers are unpacked here with
struct, and everything not to or from a watched address and port is passed over before any
object is built, which is what makes a million-packet capture quick. Requests and responses
are told apart by the server's (address, port) and by who sent the SYN, never by address
alone: on a loopback capture client and server share the address.
"""
from __future__ import annotations

import ipaddress
import logging
import os
import struct
import sys
import time
from dataclasses import dataclass

from ..model import Chunk, Direction
from .base import SourceError

# Link types (tcpdump.org/linktypes.html)
LINK_NULL, LINK_ETHERNET, LINK_RAW, LINK_LOOP = 0, 1, 101, 108
LINK_SLL, LINK_SLL2, LINK_IPV4, LINK_IPV6 = 113, 276, 228, 229
ETH_IPV4, ETH_IPV6, ETH_VLAN, ETH_QINQ = 0x0800, 0x86DD, 0x8100, 0x88A8
TCP_FIN, TCP_SYN, TCP_RST, TCP_ACK = 0x01, 0x02, 0x04, 0x10
TICK_EVERY = 1.0   # seconds of capture time between pipeline ticks

_u16 = struct.Struct("!H").unpack_from
_tcp = struct.Struct("!HHIIBB").unpack_from


@dataclass(slots=True)
class _Conn:
    key: tuple
    server_ip: str
    server_port: int
    client_fin: bool = False
    server_fin: bool = False


class ReplayStats:
    def __init__(self):
        self.packets = 0
        self.matched = 0


def _ip_payload(linktype: int, data: bytes) -> tuple[int, int] | None:
    """(IP version, offset of the IP header) for a link-layer frame, or None."""
    if linktype == LINK_ETHERNET:
        off = 12
        etype = _u16(data, off)[0] if len(data) >= 14 else 0
        while etype in (ETH_VLAN, ETH_QINQ) and len(data) >= off + 6:
            off += 4
            etype = _u16(data, off)[0]
        off += 2
    elif linktype == LINK_SLL:
        if len(data) < 16:
            return None
        etype, off = _u16(data, 14)[0], 16
    elif linktype == LINK_SLL2:
        if len(data) < 20:
            return None
        etype, off = _u16(data, 0)[0], 20
    elif linktype in (LINK_NULL, LINK_LOOP):
        if len(data) < 5:
            return None
        off = 4
        etype = ETH_IPV4 if data[4] >> 4 == 4 else ETH_IPV6 if data[4] >> 4 == 6 else 0
    elif linktype in (LINK_RAW, LINK_IPV4, LINK_IPV6, 12, 14):
        if not data:
            return None
        off = 0
        etype = ETH_IPV4 if data[0] >> 4 == 4 else ETH_IPV6 if data[0] >> 4 == 6 else 0
    else:
        return None
    if etype == ETH_IPV4:
        return 4, off
    if etype == ETH_IPV6:
        return 6, off
    return None


class PcapReplay:
    """Feeds the chunks of capture files to a pipeline. Not a live `Source`: it runs once."""
    name = "replay"

    def __init__(self, addresses, ports, progress: bool | None = None):
        self.addresses = {ipaddress.ip_address(a).packed for a in addresses}
        self.ports = frozenset(ports)
        self.progress = sys.stderr.isatty() if progress is None else progress
        self.stats = ReplayStats()
        self._conns: dict[tuple, _Conn] = {}
        self._t0 = time.monotonic()
        logging.getLogger("scapy").setLevel(logging.ERROR)

    # -- files --------------------------------------------------------------------------
    def replay(self, path: str, pipeline) -> None:
        """Replay one file. Raises SourceError (one line) for unreadable or cut files,
        after feeding every packet that could be read."""
        from scapy.error import Scapy_Exception
        from scapy.utils import RawPcapNgReader, RawPcapReader

        try:
            size = os.path.getsize(path)
            reader = RawPcapReader(path)
        except OSError as exc:
            raise SourceError(f"{path}: {exc.strerror or exc}") from None
        except (Scapy_Exception, EOFError, ValueError, struct.error) as exc:
            raise SourceError(f"{path}: not a pcap or pcapng capture ({exc})") from None
        ng = isinstance(reader, RawPcapNgReader)
        consumed = 24  # pcap file header
        cut = False
        try:
            last_tick = None
            for data, meta in reader:
                if ng:
                    ts = ((meta.tshigh << 32) | meta.tslow) / meta.tsresol
                    linktype = meta.linktype
                else:
                    ts = meta.sec + meta.usec / (1e9 if reader.nano else 1e6)
                    linktype = reader.linktype
                    consumed += 16 + meta.caplen
                    if len(data) < min(meta.caplen, 65535):
                        cut = True
                self.packet(linktype, data, ts, pipeline)
                if last_tick is None or ts - last_tick >= TICK_EVERY:
                    pipeline.tick(ts)
                    last_tick = ts
        except (Scapy_Exception, struct.error, ValueError, OverflowError) as exc:
            raise SourceError(f"{path}: unreadable after {self.stats.packets} packets "
                              f"({exc})") from None
        finally:
            reader.close()
            self._show_progress(pipeline, final=True)
        if ng:
            cut = cut or not _pcapng_complete(path, size)
        elif not path.endswith(".gz") and consumed != size:
            cut = True
        if cut:
            raise SourceError(f"{path}: truncated capture: the last record is cut short "
                              f"({self.stats.packets} packets read before it)")

    # -- packets ------------------------------------------------------------------------
    def packet(self, linktype: int, data: bytes, ts: float, pipeline) -> None:
        stats = self.stats
        stats.packets += 1
        if self.progress and stats.packets % 50000 == 0:
            self._show_progress(pipeline)
        where = _ip_payload(linktype, data)
        if where is None:
            return
        version, off = where
        if version == 4:
            if len(data) < off + 20 or data[off + 9] != 6:
                return
            ihl = (data[off] & 0x0F) * 4
            total = _u16(data, off + 2)[0]
            if _u16(data, off + 6)[0] & 0x1FFF:
                return  # a later fragment: no TCP header
            src, dst = data[off + 12:off + 16], data[off + 16:off + 20]
            end = off + total if total else len(data)
            off += ihl
        else:
            if len(data) < off + 40 or data[off + 6] != 6:
                return
            src, dst = data[off + 8:off + 24], data[off + 24:off + 40]
            end = off + 40 + _u16(data, off + 4)[0]
            off += 40
        if src not in self.addresses and dst not in self.addresses:
            return
        if len(data) < off + 20:
            return
        sport, dport, seq, _ack, doff, flags = _tcp(data, off)
        payload = data[off + (doff >> 4) * 4:min(end, len(data))]
        stats.matched += 1
        self._segment(src, sport, dst, dport, seq, flags, payload, ts, pipeline)

    def _segment(self, src, sport, dst, dport, seq, flags, payload, ts, pipeline) -> None:
        fwd = (src, sport, dst, dport)
        rev = (dst, dport, src, sport)
        conn = self._conns.get(fwd) or self._conns.get(rev)
        if flags & TCP_SYN:
            if not flags & TCP_ACK:                      # client -> server: a new connection
                if conn is not None:
                    self._end(conn, pipeline, ts)        # the 4-tuple is being reused
                if dst not in self.addresses or dport not in self.ports:
                    return
                conn = self._new(fwd, dst, dport)
                direction = Direction.REQUEST
            elif conn is None:
                return
            else:
                direction = Direction.RESPONSE
            # data starts at SYN + 1: a segment arriving early is then held, not taken first
            pipeline.feed(Chunk(conn.key, direction, b"", ts, conn.server_ip, conn.server_port,
                                "replay", seq=(seq + 1) & 0xFFFFFFFF))
            return
        if conn is None:
            if not payload:
                return
            if dst in self.addresses and dport in self.ports:
                conn = self._new(fwd, dst, dport)
            elif src in self.addresses and sport in self.ports:
                conn = self._new(rev, src, sport)
            else:
                return
        request = conn.key == fwd
        if payload:
            pipeline.feed(Chunk(conn.key, Direction.REQUEST if request else Direction.RESPONSE,
                                bytes(payload), ts, conn.server_ip, conn.server_port,
                                "replay", seq=seq))
        if flags & TCP_RST:
            self._end(conn, pipeline, ts)
        elif flags & TCP_FIN:
            if request:
                conn.client_fin = True
            else:
                conn.server_fin = True
            if conn.server_fin:   # the server has answered all it will
                self._end(conn, pipeline, ts)

    def _new(self, key: tuple, server: bytes, port: int) -> _Conn:
        conn = _Conn(key, str(ipaddress.ip_address(server)), port)
        self._conns[key] = conn
        return conn

    def _end(self, conn: _Conn, pipeline, ts: float) -> None:
        self._conns.pop(conn.key, None)
        pipeline.close_flow(conn.key, ts)

    def _show_progress(self, pipeline, final: bool = False) -> None:
        if not self.progress:
            return
        now = time.monotonic()
        rate = self.stats.packets / max(now - self._t0, 1e-6)
        sys.stderr.write(f"\rreplay: {self.stats.packets:,} packets, {self.stats.matched:,} "
                         f"to metadata addresses, {pipeline.requests:,} requests, "
                         f"{rate:,.0f} packets/s")
        if final:
            sys.stderr.write("\n")
        sys.stderr.flush()


def _pcapng_complete(path: str, size: int) -> bool:
    """Walk the pcapng blocks by their lengths: do they end exactly at the end of file?"""
    try:
        with open(path, "rb") as fh:
            shb = fh.read(12)
            if shb[8:12] == b"\x4d\x3c\x2b\x1a":
                endian = "<"
            elif shb[8:12] == b"\x1a\x2b\x3c\x4d":
                endian = ">"
            else:
                return False
            pos = 0
            while pos < size:
                fh.seek(pos + 4)
                raw = fh.read(4)
                if len(raw) < 4:
                    return False
                length = struct.unpack(endian + "I", raw)[0]
                if length < 12 or length % 4:
                    return False
                pos += length
            return pos == size
    except OSError:
        return False
