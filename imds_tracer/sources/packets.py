"""IP packets of metadata connections -> chunks, written to a `base.Batch`. Shared by pcap replay and by the
cgroup backend, whose kernel program hands over packets as a capture would.

Headers are unpacked with struct, and a packet not to or from a watched address is passed
over before any object is built (what makes a million-packet replay quick). Requests and
responses are told apart by the server's (address, port) and by who sent the SYN, never by
address alone: on a namespace's loopback client and server share the address. Sequence
numbers go with every chunk, so `flows.FlowTable` puts retransmitted, duplicated and
reordered segments back in order.
"""
from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from typing import Hashable

from ..conntable import ConnTable
from ..model import Chunk, Direction, ProcessSnapshot

TCP_FIN, TCP_SYN, TCP_RST, TCP_ACK = 0x01, 0x02, 0x04, 0x10

_u16 = struct.Struct("!H").unpack_from
_tcp = struct.Struct("!HHIIBB").unpack_from


@dataclass
class _Conn:
    key: tuple
    server_ip: str
    server_port: int
    client_fin: bool = False
    server_fin: bool = False


class TcpDemux:
    """Turns TCP segments into chunks and connection ends into closes, written to `out` (a
    `sources.base.Batch`: feed / close_flow / client_gave_up).

    `scope` separates connections that share a 4-tuple (live: the socket cookie, since two
    network namespaces can use the same addresses at once; replay: None). At most `max_conns`
    connections are followed (a `ConnTable`); the least recently used is closed to make room
    for a new one.
    """

    def __init__(self, addresses, ports, source: str, max_conns: int = 65536):
        self.addresses = frozenset(ipaddress.ip_address(a).packed for a in addresses)
        self.ports = frozenset(int(p) for p in ports)
        self.source = source
        self._conns: ConnTable[_Conn] = ConnTable(max_conns)

    def __len__(self) -> int:
        return len(self._conns)

    def ip_packet(self, data: bytes, off: int, version: int, ts: float, out, *,
                  wire_len: int = 0, scope: Hashable = None,
                  process: ProcessSnapshot | None = None) -> bool:
        """One IP packet starting at data[off], of which `data` may hold only the first bytes:
        `wire_len` is the length of all of `data` as sent (0: unknown). True when it belonged
        to a watched address.

        The IP header's length says where the packet ends, except in a GSO packet bigger
        than 64 KiB (BIG TCP: on loopback and fast NICs since Linux 6.3), which carries 0
        there: then only `wire_len` tells how much of it was not captured."""
        if version == 4:
            if len(data) < off + 20 or data[off + 9] != 6:
                return False
            ihl = (data[off] & 0x0F) * 4
            total = _u16(data, off + 2)[0]
            if _u16(data, off + 6)[0] & 0x1FFF:
                return False  # a later fragment: no TCP header
            src, dst = data[off + 12:off + 16], data[off + 16:off + 20]
            end = off + total if total else max(wire_len, len(data))
            off += ihl
        else:
            if len(data) < off + 40 or data[off + 6] != 6:
                return False
            src, dst = data[off + 8:off + 24], data[off + 24:off + 40]
            total = _u16(data, off + 4)[0]
            end = off + 40 + total if total else max(wire_len, len(data))
            off += 40
        addresses = self.addresses
        if src not in addresses and dst not in addresses:
            return False
        if len(data) < off + 20:
            return False
        sport, dport, seq, _ack, doff, flags = _tcp(data, off)
        start = off + (doff >> 4) * 4
        payload = data[start:min(end, len(data))]
        lost = max(0, end - max(len(data), start))   # cut by the snap length / copy limit
        self._segment(scope, src, sport, dst, dport, seq, flags, payload, lost, ts, out,
                      process)
        return True

    def _segment(self, scope, src, sport, dst, dport, seq, flags, payload, lost, ts, out,
                 process) -> None:
        fwd = (scope, src, sport, dst, dport)
        rev = (scope, dst, dport, src, sport)
        conn = self._conns.get(fwd) or self._conns.get(rev)
        if flags & TCP_SYN:
            if not flags & TCP_ACK:                      # client -> server: a new connection
                if conn is not None:
                    self._end(conn, out, ts)             # the 4-tuple is being reused
                if dst not in self.addresses or dport not in self.ports:
                    return
                conn = self._new(fwd, dst, dport, out, ts)
                direction = Direction.REQUEST
            elif conn is None:
                return
            else:
                direction = Direction.RESPONSE
            # data starts at SYN + 1: a segment arriving early is then held, not taken first
            out.feed(Chunk(conn.key, direction, b"", ts, conn.server_ip, conn.server_port,
                           self.source, process, seq=(seq + 1) & 0xFFFFFFFF))
            return
        if conn is None:
            if not payload and not lost:
                return
            if dst in self.addresses and dport in self.ports:
                conn = self._new(fwd, dst, dport, out, ts)
            elif src in self.addresses and sport in self.ports:
                conn = self._new(rev, src, sport, out, ts)
            else:
                return
        request = conn.key == fwd
        if payload or lost:
            out.feed(Chunk(conn.key, Direction.REQUEST if request else Direction.RESPONSE,
                           bytes(payload), ts, conn.server_ip, conn.server_port,
                           self.source, process, seq=seq, lost=lost))
        if flags & TCP_RST:
            self._end(conn, out, ts)
        elif flags & TCP_FIN:
            if request:
                conn.client_fin = True
                out.client_gave_up(conn.key, ts)
            else:
                conn.server_fin = True
            if conn.server_fin:   # the server has answered all it will
                self._end(conn, out, ts)

    def _new(self, key: tuple, server: bytes, port: int, out, ts: float) -> _Conn:
        conn = _Conn(key, str(ipaddress.ip_address(server)), port)
        evicted = self._conns.put(key, conn)
        if evicted is not None:
            out.close_flow(evicted[0], ts)
        return conn

    def _end(self, conn: _Conn, out, ts: float) -> None:
        self._conns.pop(conn.key)
        out.close_flow(conn.key, ts)
