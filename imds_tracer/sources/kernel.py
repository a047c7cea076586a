"""Shared BCC glue for the kernel sources: compile and load `bpf/*.c`, read the event stream,
turn events into pipeline chunks, count what the kernel lost, and pick a backend.

`bcc` is imported lazily (inside functions): the rest of the package, and the unit tests,
import this module without BCC installed.

Event contract: `bpf/event.h`; `EventHeader` below is its ctypes mirror
(tests/unit/test_event_layout.py pins the two together).
"""
from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import logging
import os
import platform
import re
import time
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Hashable, List, NamedTuple

from ..model import Chunk, Direction, ProcessSnapshot
from .base import Batch, SourceError, SourceItem
from .bcc_module import import_bcc

if TYPE_CHECKING:
    from ..config import Config

log = logging.getLogger("imds_tracer")

# imds_tracer/bpf is a symlink to ../bpf in a checkout and a directory in an installed
# package: found relative to this module, never to the working directory.
BPF_DIR = Path(__file__).resolve().parent.parent / "bpf"

EV_CONNECT, EV_SEND, EV_RECV, EV_CLOSE, EV_TGID_RESET, EV_PACKET = 1, 2, 3, 4, 5, 6
F_ARGV_TRUNCATED, F_NO_ARGV = 0x1, 0x2
CNT_OUTPUT_FAILED, CNT_SENDS_TRUNCATED, CNT_STALE_FD, CNT_ARGV_TRUNCATED = range(4)
AF_INET, AF_INET6 = 2, 10
RESPONSE_BYTES = 256
ARGV_BUF = 1024 + 256   # IMDS_ARGV_BUF in bpf/common.h


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


def split_argv(payload: bytes) -> tuple[str, ...]:
    parts = payload.split(b"\0")
    if parts and parts[-1] == b"":
        parts.pop()
    return tuple(p.decode("utf-8", "backslashreplace") for p in parts)


def _next_pow2(n: int) -> int:
    p = 1
    while p < n:
        p <<= 1
    return p


def possible_cpus() -> int:
    try:
        text = Path("/sys/devices/system/cpu/possible").read_text().strip()
        last = 0
        for part in text.split(","):
            last = max(last, int(part.split("-")[-1]))
        return last + 1
    except (OSError, ValueError):
        return os.cpu_count() or 1


def compile_flags(config: "Config", *, use_perf: bool = False) -> list[str]:
    """-D settings for bpf/common.h from the config."""
    limit = int(config.max_payload)
    cap = max(_next_pow2(limit), 1024, RESPONSE_BYTES)
    ncpu = possible_cpus()
    ring_pages = _next_pow2(max(int(config.perf_pages) * ncpu, 8))
    flags = [
        f"-I{BPF_DIR}",
        f"-DIMDS_PAYLOAD_LIMIT={limit}",
        f"-DIMDS_PAYLOAD_CAP={cap}",
        f"-DIMDS_RESPONSE_BYTES={RESPONSE_BYTES}",
        f"-DIMDS_RING_PAGES={ring_pages}",
        f"-DIMDS_NCPU={ncpu}",
        "-Wno-unused-function",
    ]
    if use_perf:
        flags.append("-DIMDS_USE_PERF")
    child_off = tracepoint_field_offset("sched", "sched_process_fork", "child_pid")
    if child_off is not None:
        flags.append(f"-DIMDS_FORK_CHILD_PID_OFF={child_off}")
    return flags


def tracepoint_field_offset(category: str, event: str, field: str,
                            tracefs: Path = Path("/sys/kernel/tracing")) -> int | None:
    """Offset of a field in a tracepoint's record, from its format file (a stable ABI)."""
    try:
        text = (tracefs / "events" / category / event / "format").read_text()
    except OSError:
        return None
    match = re.search(r"field:[^;]*\b" + re.escape(field) + r"(\[\d*\])?;\s*offset:(\d+);", text)
    return int(match.group(2)) if match else None


def ringbuf_supported() -> bool:
    """BPF ring buffers: asked of the kernel (a map created and closed); by the version
    (mainline 5.8) only where the kernel will not say."""
    from .helpers import ProbeError, ringbuf_map_supported
    try:
        return ringbuf_map_supported()
    except ProbeError:
        match = re.match(r"(\d+)\.(\d+)", platform.release())
        return bool(match) and (int(match.group(1)), int(match.group(2))) >= (5, 8)


_LOCAL_INCLUDE = re.compile(r'^#include "([\w./-]+)"\s*$', re.M)


def bpf_source(filename: str, _seen: set | None = None) -> str:
    """bpf/<filename> with its local #include "..." files inlined.

    BCC rewrites map calls (`map.lookup(...)`) in the main file only; helpers in a header that
    touch maps must therefore reach BCC as part of the main text.
    """
    seen = set() if _seen is None else _seen
    text = (BPF_DIR / filename).read_text()

    def inline(match):
        name = match.group(1)
        if name in seen:
            return ""
        seen.add(name)
        return f"/* ---- {name} ---- */\n" + bpf_source(name, seen)

    return _LOCAL_INCLUDE.sub(inline, text)


def load_bpf(filename: str, cflags: list[str]):
    """Compile bpf/<filename> with BCC. Raises SourceError with a one-line reason."""
    BPF = import_bcc().BPF  # lazy on purpose: raises SourceError naming the package
    path = BPF_DIR / filename
    try:
        text = bpf_source(filename)
    except OSError as exc:
        raise SourceError(f"cannot read {path}: {exc.strerror}") from None
    build = Path("/lib/modules") / platform.release() / "build"
    if not os.path.exists(build):
        raise SourceError(f"no kernel headers at {build} (BCC needs them to compile "
                          f"{filename}); install linux-headers; see imds-tracer doctor")
    with _captured_stderr() as captured:
        try:
            return BPF(text=text.encode(), cflags=cflags)
        except Exception as exc:  # BCC raises bare Exception on compile/load errors
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            why = _first_error(captured())
            raise SourceError(f"loading {filename} failed: {first}"
                              + (f" ({why})" if why else "")
                              + "; see imds-tracer doctor") from None


def _first_error(text: str) -> str:
    """The line of BCC's stderr that says why: a clang error or the verifier's verdict."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in lines:
        if "error:" in line:
            return line[:300]
    verifier = [line for line in lines if not line.startswith(("processed ", "HINT"))]
    for line in reversed(verifier):
        if not re.match(r"^\d+: \(", line) and not line.startswith(";"):
            return line[:300]
    return ""


@contextlib.contextmanager
def _captured_stderr():
    """BCC (C++) writes clang warnings and verifier logs straight to fd 2. Keep them out of
    the agent's stderr (the 6.1-vs-6.18 header warnings mean nothing for the tracepoint
    backend) but available for the error message; pass them through when debugging."""
    if log.isEnabledFor(logging.DEBUG):
        yield lambda: ""
        return
    import tempfile
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield lambda: (tmp.seek(0), tmp.read().decode("utf-8", "replace"))[1]
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def read_proc_argv(pid: int) -> tuple[str, ...] | None:
    try:
        data = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return split_argv(data) or None


def read_proc_ppid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


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
    """Common part of the two BCC backends: output channel, decoding, drops, process cache.

    Subclasses set `name`, `program` (file in bpf/), `flow_tag`, and implement `_attach()`
    (returns the number of probes attached) and optionally `_after_attach()`.
    """
    name = "kernel"
    program = ""
    flow_tag = "k"
    tracks_fds = True   # events name (tgid, fd); the cgroup backend knows sockets only

    def __init__(self, config: "Config"):
        self.config = config
        self.bpf = None
        self.probes = 0
        self.use_perf = not ringbuf_supported()
        self._out = Batch()   # what the current poll has read
        self._conns: OrderedDict[int, ConnInfo] = OrderedDict()
        self._max_conns = max(1024, int(getattr(config, "max_flows", 65536)))
        self._counters_seen = [0] * 4
        self._last_counter_read = 0.0
        self._clock_offset = time.time() - time.monotonic()
        self.stats = {"events": 0, "connects": 0, "sends": 0, "recvs": 0, "closes": 0,
                      "resets": 0, "kernel_lost": 0, "argv_from_exec_cache": 0,
                      "argv_from_proc": 0, "argv_unknown": 0, "proc_argv_gone_at_connect": 0}

    # ---- lifecycle ---------------------------------------------------------------------
    def start(self) -> int:
        if self.bpf is not None:  # open_source() returns a started source
            return self.probes
        self.bpf = load_bpf(self.program, self._cflags())
        try:
            self._fill_watched()
            self.probes = self._attach()
            if self.probes == 0:
                raise SourceError(self._no_probe_message())
            self._open_output()
            self._clock_offset = time.time() - time.monotonic()
            self._after_attach()
        except SourceError:
            self.stop()
            raise
        except Exception as exc:
            self.stop()
            raise SourceError(f"{self.name} backend: {exc}; see imds-tracer doctor") from None
        return self.probes

    def stop(self) -> None:
        bpf, self.bpf = self.bpf, None
        if bpf is not None:
            log.info("%s backend stopped: %s", self.name,
                     " ".join(f"{k}={v}" for k, v in self.stats.items()))
            with contextlib.suppress(Exception):
                bpf.cleanup()

    def _cflags(self) -> list[str]:
        return compile_flags(self.config, use_perf=self.use_perf)

    def _attach(self) -> int:
        raise NotImplementedError

    def _after_attach(self) -> None:
        pass

    def _attach_process_cache(self) -> int:
        """The fork tracepoint (exec's are TRACEPOINT_PROBEs, attached by BCC at load)."""
        try:
            self.bpf.attach_tracepoint(tp=b"sched:sched_process_fork", fn_name=b"imds_on_fork")
            return 1
        except Exception as exc:
            log.warning("sched:sched_process_fork not attached (%s): parents of processes "
                        "that exit early will be unknown", exc)
            return 0

    def _no_probe_message(self) -> str:
        return f"no {self.name} probe attached; see imds-tracer doctor"

    def _fill_watched(self) -> None:
        table = self.bpf[b"watched"]
        for addr in self.config.addresses:
            for port in self.config.ports:
                key = table.Key()
                ctypes.memmove(ctypes.byref(key), addr_key_bytes(addr), 16)
                key.port = int(port)
                table[key] = ctypes.c_uint8(1)

    def _open_output(self) -> None:
        events = self.bpf[b"events"]
        if self.use_perf:
            events.open_perf_buffer(self._on_perf_event, page_cnt=_next_pow2(self.config.perf_pages),
                                    lost_cb=self._on_perf_lost)
        else:
            events.open_ring_buffer(self._on_ring_event)

    # ---- reading -----------------------------------------------------------------------
    def poll(self, timeout_ms: int) -> List[SourceItem]:
        """What the kernel sent since the last poll (see sources/base.py)."""
        if self.bpf is None:
            return []
        self._out = out = Batch()
        if self.use_perf:
            self.bpf.perf_buffer_poll(timeout=int(timeout_ms))
        else:
            self.bpf.ring_buffer_poll(timeout=int(timeout_ms))
        now = time.monotonic()
        if now - self._last_counter_read >= 1.0:
            self._last_counter_read = now
            self._report_counters()
        self._out = Batch()
        return out

    def _on_ring_event(self, _ctx, data, size):
        self._dispatch(ctypes.string_at(data, size))
        return 0

    def _on_perf_event(self, _cpu, data, size):
        self._dispatch(ctypes.string_at(data, size))

    def _on_perf_lost(self, lost):
        self.stats["kernel_lost"] += lost
        self._out.drop("kernel_lost", int(lost), "perf buffer full (raise capture.perf_pages)")

    def read_counters(self) -> list[int]:
        """Sums of the kernel's per-CPU drop counters (see IMDS_CNT_* in bpf/event.h)."""
        table = self.bpf[b"counters"]
        out = []
        for slot in range(4):
            values = table[ctypes.c_int(slot)]
            out.append(sum(int(v) for v in values))
        return out

    def _report_counters(self) -> None:
        counts = self.read_counters()
        delta = [now - seen for now, seen in zip(counts, self._counters_seen)]
        self._counters_seen = counts
        if delta[CNT_OUTPUT_FAILED] > 0:
            self.stats["kernel_lost"] += delta[CNT_OUTPUT_FAILED]
            self._out.drop("kernel_lost", delta[CNT_OUTPUT_FAILED],
                          "ring buffer full (raise capture.perf_pages)")
        if delta[CNT_SENDS_TRUNCATED] > 0:
            self._out.drop("payload_truncated", delta[CNT_SENDS_TRUNCATED],
                          f"sends longer than capture.max_payload={self.config.max_payload} bytes")

    def _dispatch(self, raw: bytes) -> None:
        if len(raw) < HEADER_SIZE:
            return
        ev = EventHeader.from_buffer_copy(raw[:HEADER_SIZE])
        payload = raw[HEADER_SIZE:HEADER_SIZE + ev.payload_len]
        self.stats["events"] += 1
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
            info = self._conns.get(ev.conn_id)
            if info is None:
                info = self._remember(ev, None)
            else:
                self._conns.move_to_end(ev.conn_id)
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
                for conn_id, info in list(self._conns.items()):
                    if info.tgid == ev.tgid and ev.fd <= info.fd <= ev.fd_last:
                        self._close(conn_id, ts)
                        self._forget_kernel_fd(info.tgid, info.fd)
        elif kind == EV_TGID_RESET:
            self.stats["resets"] += 1
            ts = self.wall_time(ev.ts_ns)
            for conn_id, info in list(self._conns.items()):
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
        proc_argv = read_proc_argv(ev.tgid)
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
        ppid = int(ev.ppid) or read_proc_ppid(ev.tgid)
        info = ConnInfo(self.flow_key(ev), ev.tgid, ev.fd, argv, ppid,
                        format_addr(bytes(ev.daddr)), int(ev.dport), truncated)
        self._conns[ev.conn_id] = info
        while len(self._conns) > self._max_conns:
            _cid, evicted = self._conns.popitem(last=False)
            self._out.close_flow(evicted.flow, time.time())
        return info

    def _close(self, conn_id: int, ts: float) -> None:
        info = self._conns.pop(conn_id, None)
        if info is not None:
            self._out.close_flow(info.flow, ts)

    def _forget_kernel_fd(self, tgid: int, fd: int) -> None:
        pass

    def _snapshot(self, ev: EventHeader, info: ConnInfo) -> ProcessSnapshot:
        if info.argv is None:
            info.argv = self.kernel_argv(ev.tgid) or read_proc_argv(ev.tgid)
        return ProcessSnapshot(
            pid=int(ev.tgid), tid=int(ev.tid), uid=int(ev.uid),
            comm=ev.comm.decode("utf-8", "backslashreplace"),
            cgroup_id=int(ev.cgroup_id), ppid=info.ppid, argv=info.argv,
            argv_truncated=info.argv_truncated,
        )

    # ---- the kernel's process cache, for enrichment of exited processes ----------------
    def kernel_argv(self, pid: int) -> tuple[str, ...] | None:
        """argv the kernel saw at the process's last exec since the agent started, or None."""
        if self.bpf is None:
            return None
        table = self.bpf[b"argv_cache"]
        try:
            value = table[table.Key(pid)]
        except KeyError:
            return None
        raw = ctypes.string_at(ctypes.addressof(value.buf), min(int(value.len), ARGV_BUF))
        return split_argv(raw) or None

    def kernel_ppid(self, pid: int) -> int | None:
        """Parent at fork time, if the fork happened while the agent ran."""
        if self.bpf is None:
            return None
        table = self.bpf[b"parent_of"]
        try:
            return int(table[table.Key(pid)].value)
        except KeyError:
            return None

    def lookup_process(self, pid: int) -> tuple[int | None, tuple[str, ...] | None]:
        """(ppid, argv) from the kernel caches: for processes that are gone from /proc."""
        return self.kernel_ppid(pid), self.kernel_argv(pid)


def backend_classes() -> dict:
    """name -> source class, in the order --backend auto tries them: by cost to the rest of
    the machine. cgroup (socket hooks, nothing on the syscall path), kprobe (the TCP send
    path only), tracepoint (every read and write of every process)."""
    from .cgroup import CgroupSource
    from .kprobe import KprobeSource
    from .tracepoint import TracepointSource
    return {cls.name: cls for cls in (CgroupSource, KprobeSource, TracepointSource)}


class Selection(NamedTuple):
    source: "KernelSource"
    passed_over: List[str]   # "<backend>: <why it cannot run here>", in the order tried


def candidates(backend_name: str) -> list:
    """The source classes --backend NAME tries, in order. Raises SourceError."""
    backends = backend_classes()
    if backend_name == "auto":
        return list(backends.values())
    if backend_name in backends:
        return [backends[backend_name]]
    raise SourceError(f"unknown backend {backend_name!r} (use auto, {', '.join(backends)})")


def select_backend(config: "Config", backend_name: str, *, load: bool = True) -> Selection:
    """The started source for --backend auto|cgroup|kprobe|tracepoint, and why each backend
    tried before it could not run. `run` and `doctor` both call this: what doctor says auto
    would use is what run uses. With load=False, the first backend not ruled out by the
    checks that need no compile (not started: a guess that loading may still refute).
    Raises SourceError."""
    passed_over = []
    for cls in candidates(backend_name):
        why_not = cls.unavailable_reason()
        if why_not:
            if backend_name != "auto":
                raise SourceError(f"{cls.name} backend cannot run: {why_not}; "
                                  "use --backend auto; see imds-tracer doctor")
            passed_over.append(f"{cls.name}: {why_not}")
            continue
        source = cls(config)
        if not load:
            return Selection(source, passed_over)
        try:
            source.start()
        except SourceError as exc:
            if backend_name != "auto":
                raise
            passed_over.append(f"{cls.name}: {exc}")
            continue
        return Selection(source, passed_over)
    raise SourceError("no backend could start (" + "; ".join(passed_over)
                      + "); see imds-tracer doctor")


def open_source(config: "Config", backend_name: str) -> "KernelSource":
    """The started source; each backend `auto` passed over is logged in one line."""
    source, passed_over = select_backend(config, backend_name)
    for why in passed_over:
        log.warning("backend auto: not %s", why)
    if backend_name == "auto":
        log.info("backend auto: using %s (%d probes)", source.name, source.probes)
    return source
