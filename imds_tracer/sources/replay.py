"""Replay: pcap / pcapng files (read with scapy's raw readers) into the same pipeline.

Packets are not dissected by scapy: the link layer is unpacked here with struct, and the IP
and TCP layers by `packets.TcpDemux`, the same code the cgroup backend feeds live packets to.
"""
from __future__ import annotations

import logging
import os
import struct
import sys
import time

from .base import SourceError
from .packets import TcpDemux

# Link types (tcpdump.org/linktypes.html)
LINK_NULL, LINK_ETHERNET, LINK_RAW, LINK_LOOP = 0, 1, 101, 108
LINK_SLL, LINK_SLL2, LINK_IPV4, LINK_IPV6 = 113, 276, 228, 229
ETH_IPV4, ETH_IPV6, ETH_VLAN, ETH_QINQ = 0x0800, 0x86DD, 0x8100, 0x88A8
TICK_EVERY = 1.0   # seconds of capture time between pipeline ticks
# a packet stamped outside these (1900-01-01 .. 9999-12-31) makes the capture unreadable:
# no sink could write the time of its request
MIN_TS, MAX_TS = -2208988800.0, 253402214400.0

_u16 = struct.Struct("!H").unpack_from


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

    def __init__(self, addresses, ports, progress: bool | None = None,
                 max_conns: int = 65536):
        self.demux = TcpDemux(addresses, ports, "replay", max_conns)
        self.progress = sys.stderr.isatty() if progress is None else progress
        self.stats = ReplayStats()
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
                if not MIN_TS <= ts <= MAX_TS:
                    raise ValueError(f"packet {self.stats.packets + 1} is stamped {ts:.0f} s "
                                     "from 1970, outside the years 1900-9999")
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
        if self.demux.ip_packet(data, off, version, ts, pipeline):
            stats.matched += 1

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
