"""The agent's side of the kernel backends: the event stream the loader's programs write
(ring buffer or perf buffers, read by `bpfsys`) decoded into pipeline items -- Chunk,
FlowClosed, Dropped -- with the per-connection process facts, and the kernel's process caches
(argv at exec, parent at fork) for enrichment. Compiling and attaching are the loader's
(`loader.py`, a short-lived child: the only code that imports BCC); the event layout is
`events.py`; which backend runs is `select.py`.
"""
from __future__ import annotations

import contextlib
import logging
import os
import struct
import time
from typing import TYPE_CHECKING, Hashable, List

from .. import procfs
from ..conntable import ConnTable
from ..model import Chunk, Direction, ProcessSnapshot
from . import bpfsys, caps
from .base import Batch, SourceError, SourceItem
from .events import (ARGV_BUF, CNT_ARGV_TRUNCATED, CNT_OUTPUT_FAILED, CNT_SENDS_TRUNCATED,
                     CNT_SLOTS, CNT_STALE_FD, EV_CLOSE, EV_CONNECT, EV_RECV, EV_SEND,
                     EV_TGID_RESET, F_ARGV_TRUNCATED, F_NO_ARGV, HEADER_SIZE, EventHeader,
                     format_addr, split_argv)
from .helpers import raise_memlock, ringbuf_supported
from .loader import LoaderProcess, spec_of

if TYPE_CHECKING:
    from ..config import Config

log = logging.getLogger("imds_tracer")

NOTE_EVERY = 60.0   # seconds between log lines about the kernel's bookkeeping counters


class ConnInfo:
    __slots__ = ("flow", "tgid", "fd", "argv", "ppid", "dst_ip", "dst_port", "argv_truncated")

    def __init__(self, flow, tgid, fd, argv, ppid, dst_ip, dst_port, argv_truncated=False):
        self.flow = flow
        self.tgid = tgid
        self.fd = fd
        self.argv = argv
        self.argv_truncated = argv_truncated
        self.ppid = ppid
        self.dst_ip = dst_ip
        self.dst_port = dst_port


class KernelSource:
    """Common part of the BCC backends on the agent's side: the loader's descriptors, the
    event stream, decoding, drops, the process cache.

    Subclasses set `name`, `flow_tag`, `tracks_fds`, `unavailable_reason()` and may extend
    `handle_event`.
    """
    name = "kernel"
    flow_tag = "k"
    tracks_fds = True   # events name (tgid, fd); the cgroup backend knows sockets only

    def __init__(self, config: "Config"):
        self.config = config
        self.probes = 0
        self.use_perf = not ringbuf_supported()
        self.info: dict = {}             # what the loader found (backend facts)
        self.bpf_needs = 0               # capability the kernel wants for map calls
        self.load_seconds = 0.0
        self.load_phases: dict = {}      # seconds per loader step (loader.phases)
        self.maps: dict[str, bpfsys.BpfMap] = {}
        self._fds: List[int] = []
        self._output = None
        self._loader: LoaderProcess | None = None
        self._out = Batch()   # what the current poll has read
        self._conns: ConnTable[ConnInfo] = ConnTable(max(1024, int(config.max_flows)))
        self._counters_seen = [0] * CNT_SLOTS
        self._last_counter_read = 0.0
        self._last_note = 0.0
        self._clock_offset = time.time() - time.monotonic()
        self._last_ts_ns = 0    # the kernel time of the latest record handed over
        self.stats = {"events": 0, "connects": 0, "sends": 0, "recvs": 0, "closes": 0,
                      "resets": 0, "kernel_lost": 0, "argv_from_exec_cache": 0,
                      "argv_from_proc": 0, "argv_unknown": 0, "proc_argv_gone_at_connect": 0,
                      "stale_fds_forgotten": 0, "exec_argv_truncated": 0}

    # ---- lifecycle ---------------------------------------------------------------------
    def start(self) -> int:
        """Runs the loader, takes its descriptors and opens the event stream: the number of
        probes attached. Raises SourceError (then nothing is attached)."""
        if self._output is not None:   # open_source() returns a started source
            return self.probes
        # held while it runs: stop() (on an interrupt) kills it
        self._loader = LoaderProcess(self.name, spec_of(
            self.config, use_perf=self.use_perf, keep_caps=caps.AGENT_KEEPS))
        loaded = self._loader.receive()
        self._loader = None
        self.take_over(*loaded)
        return self.probes

    def take_over(self, manifest: dict, fds: List[int]) -> None:
        """Holds a load's descriptors (from the loader, or from loader.load_here in tests)
        and opens the event stream. Raises SourceError (then they are closed)."""
        self._fds = list(fds)
        try:
            self._open(manifest)
        except (OSError, ValueError, KeyError) as exc:
            self.stop()
            raise SourceError(f"{self.name} backend: the loader's descriptors are unusable: "
                              f"{getattr(exc, 'strerror', None) or exc}; see imds-tracer "
                              "doctor") from None

    def _open(self, manifest: dict) -> None:
        self.probes = int(manifest["probes"])
        self.info = manifest.get("info", {})
        self.bpf_needs = int(manifest.get("bpf_needs", 0))
        self.load_seconds = float(manifest.get("seconds", 0.0))
        self.load_phases = manifest.get("phases", {})
        for name, m in manifest["maps"].items():
            self.maps[name] = bpfsys.BpfMap(self._fds[m["fd"]], m["key_size"],
                                            m["value_size"], m["max_entries"], m["type"])
        output = manifest["output"]
        raise_memlock()   # perf buffers are mlocked pages (kernels before 5.11 count them)
        if "ring" in output:
            ring = output["ring"]
            self._output = bpfsys.RingBufferReader(self._fds[ring["fd"]], ring["max_entries"])
        else:
            self._output = bpfsys.PerfBufferReader([self._fds[i] for i in output["perf"]],
                                                   output["perf_pages"], self._on_perf_lost)
        self._clock_offset = time.time() - time.monotonic()

    @property
    def keep_caps(self) -> int:
        """The capabilities the running agent needs with this source (caps.AGENT_KEEPS)."""
        return caps.AGENT_KEEPS | self.bpf_needs

    def stop(self) -> None:
        """Detaches: closing the last descriptor of each link or perf event removes it."""
        if self._loader is not None:
            loader, self._loader = self._loader, None
            loader.cancel()
        output, self._output = self._output, None
        fds, self._fds = self._fds, []
        self.maps = {}
        if output is not None:
            with contextlib.suppress(Exception):
                output.close()
            log.info("%s backend stopped: %s", self.name,
                     " ".join(f"{k}={v}" for k, v in self.stats.items()))
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)

    # ---- reading -----------------------------------------------------------------------
    def poll(self, timeout_ms: int) -> List[SourceItem]:
        """What the kernel sent since the last poll (see sources/base.py)."""
        if self._output is None:
            return []
        self._out = out = Batch()
        self._output.poll(int(timeout_ms), self._dispatch)
        now = time.monotonic()
        if now - self._last_counter_read >= 1.0:
            self._last_counter_read = now
            self._report_counters(now)
        self._out = Batch()
        return out

    def _on_perf_lost(self, lost: int) -> None:
        self.stats["kernel_lost"] += lost
        self._out.drop("kernel_lost", int(lost), "perf buffer full (raise capture.perf_pages)")

    def read_counters(self) -> list[int]:
        """Sums of the kernel's per-CPU counters (see IMDS_CNT_* in bpf/event.h)."""
        table = self.maps["counters"]
        return [table.lookup_percpu_u64(struct.pack("<i", slot)) for slot in range(CNT_SLOTS)]

    def _report_counters(self, now: float) -> None:
        counts = self.read_counters()
        delta = [new - seen for new, seen in zip(counts, self._counters_seen)]
        self._counters_seen = counts
        if delta[CNT_OUTPUT_FAILED] > 0:
            self.stats["kernel_lost"] += delta[CNT_OUTPUT_FAILED]
            self._out.drop("kernel_lost", delta[CNT_OUTPUT_FAILED],
                           "ring buffer full (raise capture.perf_pages)")
        if delta[CNT_SENDS_TRUNCATED] > 0:
            self._out.drop("payload_truncated", delta[CNT_SENDS_TRUNCATED],
                           f"sends longer than capture.max_payload={self.config.max_payload} bytes")
        # bookkeeping, not loss: each record already says when its argv was cut
        # (argv_truncated), and a stale fd is a connection the process can no longer use
        self.stats["stale_fds_forgotten"] = counts[CNT_STALE_FD]
        self.stats["exec_argv_truncated"] = counts[CNT_ARGV_TRUNCATED]
        if (delta[CNT_STALE_FD] or delta[CNT_ARGV_TRUNCATED]) and now - self._last_note >= NOTE_EVERY:
            self._last_note = now
            log.info("%s backend: the kernel forgot %d tracked fd(s) of processes that exec'd "
                     "or exited, and cut the argv of %d exec(s) to the cache's %d bytes (so "
                     "far)", self.name, counts[CNT_STALE_FD], counts[CNT_ARGV_TRUNCATED],
                     ARGV_BUF)

    def _dispatch(self, raw: bytes) -> None:
        if len(raw) < HEADER_SIZE:
            return
        ev = EventHeader.from_buffer_copy(raw[:HEADER_SIZE])
        payload = raw[HEADER_SIZE:HEADER_SIZE + ev.payload_len]
        self.stats["events"] += 1
        self._last_ts_ns = max(self._last_ts_ns, ev.ts_ns)
        try:
            self.handle_event(ev, payload)
        except Exception as exc:  # noqa: BLE001 - one bad event must not stop the agent
            # where, not the message: that may quote what a process sent (a secret, ESC)
            tb = exc.__traceback__
            while tb.tb_next is not None:
                tb = tb.tb_next
            log.error("kernel event of kind %d dropped: %s in %s line %d", ev.kind,
                      type(exc).__name__, tb.tb_frame.f_code.co_name, tb.tb_lineno)
            self._out.drop("event_error", 1)

    def watermark(self) -> float:
        """The wall time up to which poll has returned every record the kernel wrote: the
        start of the last poll that emptied the buffer, or, when a burst left records in it,
        the latest record returned. Time-outs are judged by it, not by the clock: when the
        agent falls behind (a slow first lookup, a busy host), a response still in the
        buffer must not make its request 'unanswered', nor a segment there make a hole."""
        if self._output is None:
            return time.time()
        return max(self._output.drained_at + self._clock_offset,
                   self.wall_time(self._last_ts_ns))

    def wall_time(self, ts_ns: int) -> float:
        return ts_ns / 1e9 + self._clock_offset

    # ---- events -> source items ----------------------------------------------------------
    def flow_key(self, ev: EventHeader) -> Hashable:
        return (self.flow_tag, ev.tgid, ev.fd, ev.conn_id)

    def handle_event(self, ev: EventHeader, payload: bytes) -> None:
        kind = ev.kind
        if kind == EV_CONNECT:
            self.stats["connects"] += 1
            self._on_connect(ev, payload)
        elif kind in (EV_SEND, EV_RECV):
            self.stats["sends" if kind == EV_SEND else "recvs"] += 1
            info = self._conns.get(ev.conn_id) or self._remember(ev, None)
            self._out.feed(Chunk(
                flow=info.flow,
                direction=Direction.REQUEST if kind == EV_SEND else Direction.RESPONSE,
                data=payload,
                ts=self.wall_time(ev.ts_ns),
                dst_ip=info.dst_ip,
                dst_port=info.dst_port,
                source=self.name,
                process=self._snapshot(ev, info),
                lost=int(ev.lost_bytes),
            ))
        elif kind == EV_CLOSE:
            self.stats["closes"] += 1
            ts = self.wall_time(ev.ts_ns)
            if ev.conn_id:
                self._close(ev.conn_id, ts)
            else:  # close_range: every tracked fd of the process in [fd, fd_last]
                for conn_id, info in self._conns.items():
                    if info.tgid == ev.tgid and ev.fd <= info.fd <= ev.fd_last:
                        self._close(conn_id, ts)
                        self._forget_kernel_fd(info.tgid, info.fd)
        elif kind == EV_TGID_RESET:
            self.stats["resets"] += 1
            ts = self.wall_time(ev.ts_ns)
            for conn_id, info in self._conns.items():
                if info.tgid == ev.tgid:
                    self._close(conn_id, ts)
                    self._forget_kernel_fd(info.tgid, info.fd)

    def _on_connect(self, ev: EventHeader, payload: bytes) -> None:
        old = [cid for cid, info in self._conns.items()
               if info.tgid == ev.tgid and info.fd == ev.fd and cid != ev.conn_id] \
            if self.tracks_fds else ()
        for cid in old:  # the fd was reconnected without a close we saw
            self._close(cid, self.wall_time(ev.ts_ns))
        argv = None
        if not ev.flags & F_NO_ARGV and payload:
            argv = split_argv(payload)
        # what /proc would have told us now: measures how much the exec-time cache matters
        proc_argv = procfs.argv(ev.tgid).argv
        if proc_argv is None:
            self.stats["proc_argv_gone_at_connect"] += 1
        if argv is not None:
            self.stats["argv_from_exec_cache"] += 1
        elif proc_argv is not None:
            # exec'd before the agent started: the process is alive right now, usually
            argv = proc_argv
            self.stats["argv_from_proc"] += 1
        else:
            self.stats["argv_unknown"] += 1
        self._remember(ev, argv, truncated=bool(ev.flags & F_ARGV_TRUNCATED) and
                       argv is not None and argv is not proc_argv)

    def _remember(self, ev: EventHeader, argv, truncated: bool = False) -> ConnInfo:
        ppid = int(ev.ppid) or procfs.ppid(ev.tgid)
        info = ConnInfo(self.flow_key(ev), ev.tgid, ev.fd, argv, ppid,
                        format_addr(bytes(ev.daddr)), int(ev.dport), truncated)
        evicted = self._conns.put(ev.conn_id, info)
        if evicted is not None:
            self._out.close_flow(evicted[1].flow, time.time())
        return info

    def _close(self, conn_id: int, ts: float) -> None:
        info = self._conns.pop(conn_id)
        if info is not None:
            self._out.close_flow(info.flow, ts)

    def _forget_kernel_fd(self, tgid: int, fd: int) -> None:
        pass

    def _snapshot(self, ev: EventHeader, info: ConnInfo) -> ProcessSnapshot:
        if info.argv is None:
            info.argv = self.kernel_argv(ev.tgid) or procfs.argv(ev.tgid).argv
        return ProcessSnapshot(
            pid=int(ev.tgid), tid=int(ev.tid), uid=int(ev.uid),
            comm=ev.comm.decode("utf-8", "backslashreplace"),
            cgroup_id=int(ev.cgroup_id), ppid=info.ppid, argv=info.argv,
            argv_truncated=info.argv_truncated,
        )

    # ---- the kernel's process cache, for enrichment of exited processes ----------------
    def kernel_argv(self, pid: int) -> tuple[str, ...] | None:
        """argv the kernel saw at the process's last exec since the agent started, or None."""
        table = self.maps.get("argv_cache")
        raw = table.lookup(struct.pack("<I", pid)) if table is not None else None
        if raw is None:
            return None
        length = min(struct.unpack_from("<I", raw, 0)[0], ARGV_BUF)
        return split_argv(raw[8:8 + length]) or None   # struct imds_argv: len, argc, truncated

    def kernel_ppid(self, pid: int) -> int | None:
        """Parent at fork time, if the fork happened while the agent ran."""
        table = self.maps.get("parent_of")
        raw = table.lookup(struct.pack("<I", pid)) if table is not None else None
        return struct.unpack_from("<I", raw, 0)[0] if raw is not None else None

    def lookup_process(self, pid: int) -> tuple[int | None, tuple[str, ...] | None]:
        """(ppid, argv) from the kernel caches: for processes that are gone from /proc."""
        return self.kernel_ppid(pid), self.kernel_argv(pid)
