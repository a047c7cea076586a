"""Replay: pcap / pcapng files (sources/pcapfile.py) into batches for the same pipeline.

The link layer is unpacked here with struct, and the IP and TCP layers by
`packets.TcpDemux`, the same code the cgroup backend feeds live packets to.
"""
from __future__ import annotations

import struct
import sys
import time
import zlib
from typing import Iterator, Optional, Tuple

from .base import Batch, SourceError
from .packets import TcpDemux
from .pcapfile import CaptureError, open_capture, records

# Link types (tcpdump.org/linktypes.html)
LINK_NULL, LINK_ETHERNET, LINK_RAW, LINK_LOOP = 0, 1, 101, 108
LINK_SLL, LINK_SLL2, LINK_IPV4, LINK_IPV6 = 113, 276, 228, 229
ETH_IPV4, ETH_IPV6, ETH_VLAN, ETH_QINQ = 0x0800, 0x86DD, 0x8100, 0x88A8
TICK_EVERY = 1.0   # seconds of capture time between pipeline ticks
BATCH_PACKETS = 4096  # packets read before what they made goes to the pipeline
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
    """Reads capture files into batches for `Pipeline.take`. Not a live `Source`: it runs
    once over each file, and time is the capture's."""
    name = "replay"

    def __init__(self, addresses, ports, max_conns: int = 65536):
        self.demux = TcpDemux(addresses, ports, "replay", max_conns)
        self.stats = ReplayStats()

    def read(self, path: str) -> Iterator[Tuple[Batch, Optional[float]]]:
        """(batch, tick) for one file, in capture order: `tick` is the capture time at which
        the pipeline ticks after taking the batch (once per TICK_EVERY seconds of capture),
        None between ticks (a batch holds at most BATCH_PACKETS packets). Raises
        SourceError (one line) for an unreadable or cut file, after the batches of every
        packet that could be read."""
        try:
            fh = open_capture(path)
        except OSError as exc:
            raise SourceError(f"{path}: {exc.strerror or exc}") from None
        try:
            try:
                stream = records(fh)
            except CaptureError as exc:
                raise SourceError(f"{path}: {exc}") from None
            except (OSError, EOFError) as exc:   # a gzip file that is not one
                raise SourceError(f"{path}: not a pcap or pcapng capture ({exc})") from None
            yield from self._batches(path, stream)
        finally:
            fh.close()

    def _batches(self, path: str, stream) -> Iterator[Tuple[Batch, Optional[float]]]:
        stats, batch, last_tick, error = self.stats, Batch(), None, None
        try:
            for linktype, ts, data, wire_len in stream:
                if not MIN_TS <= ts <= MAX_TS:
                    raise ValueError(f"packet {stats.packets + 1} is stamped {ts:.0f} s "
                                     "from 1970, outside the years 1900-9999")
                self.packet(linktype, data, ts, batch, wire_len)
                if last_tick is None or ts - last_tick >= TICK_EVERY:
                    yield batch, ts
                    batch, last_tick = Batch(), ts
                elif stats.packets % BATCH_PACKETS == 0:
                    yield batch, None
                    batch = Batch()
        except (CaptureError, EOFError) as exc:   # EOFError: a gzip stream cut short
            error = (f"truncated capture: the last record is cut short ({stats.packets} "
                     "packets read before it)") if getattr(exc, "cut", True) else \
                f"unreadable after {stats.packets} packets ({exc})"
        except (ValueError, OSError, zlib.error) as exc:   # a time out of range; a damaged
            error = f"unreadable after {stats.packets} packets ({exc})"   # gzip stream
        yield batch, None
        if error:
            raise SourceError(f"{path}: {error}")

    def packet(self, linktype: int, data: bytes, ts: float, out: Batch,
               wire_len: int = 0) -> None:
        self.stats.packets += 1
        where = _ip_payload(linktype, data)
        if where is None:
            return
        version, off = where
        if self.demux.ip_packet(data, off, version, ts, out, wire_len=wire_len):
            self.stats.matched += 1


class Progress:
    """The replay's progress line on stderr, when it is a terminal (or asked for)."""
    EVERY = 50000   # packets between two lines

    def __init__(self, enabled: Optional[bool]):
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._t0 = time.monotonic()
        self._next = self.EVERY

    def show(self, stats: ReplayStats, requests: int, final: bool = False) -> None:
        if not self.enabled or (not final and stats.packets < self._next):
            return
        self._next = stats.packets + self.EVERY
        rate = stats.packets / max(time.monotonic() - self._t0, 1e-6)
        sys.stderr.write(f"\rreplay: {stats.packets:,} packets, {stats.matched:,} "
                         f"to metadata addresses, {requests:,} requests, "
                         f"{rate:,.0f} packets/s")
        if final:
            sys.stderr.write("\n")
        sys.stderr.flush()
