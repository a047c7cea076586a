"""What the long-running agent needs of BPF once the loader has handed it file descriptors:
map lookups through the bpf(2) syscall, and the event stream read straight from the BPF ring
buffer's or the per-CPU perf buffers' shared memory. ctypes and mmap only: no BCC, no LLVM.

Layouts used (all stable kernel ABI): `union bpf_attr` for the map commands
(uapi/linux/bpf.h); the ring buffer's consumer page (rw), producer page and twice-mapped data
area (ro), records with an 8-byte header whose length word carries BUSY and DISCARD bits
(kernel/bpf/ringbuf.c); `struct perf_event_mmap_page` data_head/data_tail and
PERF_RECORD_SAMPLE / PERF_RECORD_LOST records (uapi/linux/perf_event.h).
"""
from __future__ import annotations

import ctypes
import errno
import mmap
import os
import platform
import select
import struct
import time
from pathlib import Path
from typing import Callable, List, Tuple

SYS_BPF = {"x86_64": 321, "aarch64": 280, "ppc64le": 361, "s390x": 351, "riscv64": 280}
SYS_PERF_EVENT_OPEN = {"x86_64": 298, "aarch64": 241, "ppc64le": 319, "s390x": 331,
                       "riscv64": 241}
MAP_LOOKUP_ELEM, MAP_UPDATE_ELEM, MAP_DELETE_ELEM = 1, 2, 3
PERCPU_TYPES = {5, 6, 10}   # BPF_MAP_TYPE_PERCPU_HASH, PERCPU_ARRAY, LRU_PERCPU_HASH

_libc = ctypes.CDLL(None, use_errno=True)


def syscall_nr(table: dict, name: str) -> int:
    nr = table.get(platform.machine())
    if nr is None:
        raise OSError(errno.ENOSYS, f"{name} syscall number unknown on {platform.machine()}")
    return nr


class _ElemAttr(ctypes.Structure):
    _fields_ = [("map_fd", ctypes.c_uint32), ("pad", ctypes.c_uint32),
                ("key", ctypes.c_uint64), ("value", ctypes.c_uint64),
                ("flags", ctypes.c_uint64)]


def bpf(cmd: int, attr: ctypes.Structure) -> int:
    """bpf(2); raises OSError."""
    ret = _libc.syscall(syscall_nr(SYS_BPF, "bpf"), cmd, ctypes.byref(attr),
                        ctypes.sizeof(attr))
    if ret < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return ret


OBJ_GET_INFO_BY_FD = 15


class _InfoAttr(ctypes.Structure):
    _fields_ = [("fd", ctypes.c_uint32), ("info_len", ctypes.c_uint32),
                ("info", ctypes.c_uint64)]


def map_info(fd: int) -> dict:
    """type, id, key_size, value_size, max_entries of a map, as the kernel has them
    (struct bpf_map_info)."""
    info = ctypes.create_string_buffer(80)
    bpf(OBJ_GET_INFO_BY_FD, _InfoAttr(fd, 80, ctypes.addressof(info)))
    names = ("type", "id", "key_size", "value_size", "max_entries")
    return dict(zip(names, struct.unpack_from("<5I", info.raw, 0)))


def possible_cpus() -> int:
    return _cpu_count("possible")


def online_cpus() -> List[int]:
    return _cpu_list("online")


def _cpu_list(which: str) -> List[int]:
    try:
        text = Path(f"/sys/devices/system/cpu/{which}").read_text().strip()
        out: List[int] = []
        for part in text.split(","):
            first, _, last = part.partition("-")
            out += range(int(first), int(last or first) + 1)
        return out
    except (OSError, ValueError):
        return list(range(os.cpu_count() or 1))


def _cpu_count(which: str) -> int:
    return max(_cpu_list(which)) + 1


class BpfMap:
    """A BPF map by file descriptor. Keys and values are bytes of the map's sizes."""

    def __init__(self, fd: int, key_size: int, value_size: int, max_entries: int,
                 map_type: int = 0):
        self.fd = fd
        self.key_size = key_size
        self.value_size = value_size
        self.max_entries = max_entries
        self.percpu = map_type in PERCPU_TYPES
        # a per-CPU lookup fills one 8-aligned value per possible CPU
        self._stride = (value_size + 7) // 8 * 8
        self._value = ctypes.create_string_buffer(
            self._stride * possible_cpus() if self.percpu else value_size)

    def _attr(self, key: bytes, value=None, flags: int = 0) -> tuple:
        if len(key) != self.key_size:
            raise ValueError(f"key of {len(key)} bytes for a map of {self.key_size}-byte keys")
        kbuf = ctypes.create_string_buffer(key, len(key))
        vbuf = value if value is not None else self._value
        return _ElemAttr(self.fd, 0, ctypes.addressof(kbuf), ctypes.addressof(vbuf), flags), \
            kbuf

    def lookup(self, key: bytes) -> bytes | None:
        """The value (for a per-CPU map: every CPU's, concatenated 8-aligned), or None."""
        return self._value.raw if self._present(MAP_LOOKUP_ELEM, key) else None

    def lookup_percpu_u64(self, key: bytes) -> int:
        """Sum over CPUs of a per-CPU u64 value (0 when absent)."""
        raw = self.lookup(key)
        if raw is None:
            return 0
        return sum(struct.unpack_from("<Q", raw, off)[0]
                   for off in range(0, len(raw), self._stride))

    def update(self, key: bytes, value: bytes, flags: int = 0) -> None:
        vbuf = ctypes.create_string_buffer(value, len(value))
        attr, _keep = self._attr(key, vbuf, flags)
        bpf(MAP_UPDATE_ELEM, attr)

    def delete(self, key: bytes) -> bool:
        return self._present(MAP_DELETE_ELEM, key)

    def _present(self, cmd: int, key: bytes) -> bool:
        """`cmd` on `key`; False when the map has no such key (ENOENT)."""
        attr, _keep = self._attr(key)
        try:
            bpf(cmd, attr)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return False
            raise
        return True


Callback = Callable[[bytes], None]

RINGBUF_BUSY, RINGBUF_DISCARD, RINGBUF_HDR = 1 << 31, 1 << 30, 8
MAX_RECORDS = 4096   # per poll, per buffer


class _Reader:
    """What both readers share: `poll`, and `drained_at`, the monotonic time by which every
    record the kernel had written was handed over (the start of the last pass that emptied
    the buffers)."""

    epoll: select.epoll
    drained_at: float   # set when the reader opens: nothing was written before it

    def poll(self, timeout_ms: int, callback: Callback) -> int:
        """Hands the records available (at most MAX_RECORDS per buffer) to `callback`; waits
        up to timeout_ms for the first. Returns the number of records."""
        start = time.monotonic()
        count, drained = self._consume(callback)
        if count == 0 and timeout_ms > 0:
            self.epoll.poll(timeout_ms / 1000.0)
            start = time.monotonic()
            count, drained = self._consume(callback)
        if drained:
            self.drained_at = start
        return count

    def _consume(self, callback: Callback) -> Tuple[int, bool]:
        """(records handed over, whether the buffers are now empty)."""
        raise NotImplementedError


class RingBufferReader(_Reader):
    """Consumer of a BPF_MAP_TYPE_RINGBUF map (kernel >= 5.8) by its fd."""

    def __init__(self, map_fd: int, data_size: int):
        page = mmap.PAGESIZE
        self.size = data_size
        self.mask = data_size - 1
        self.consumer = mmap.mmap(map_fd, page, mmap.MAP_SHARED,
                                  mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        # the producer page, then the data area. The kernel maps it twice in a row so that
        # no record wraps, but each copy counts in the RSS: once, and a record that runs
        # past the end is read in two pieces.
        self.producer = mmap.mmap(map_fd, page + data_size, mmap.MAP_SHARED,
                                  mmap.PROT_READ, offset=page)
        self.data = memoryview(self.producer)[page:]
        self.epoll = select.epoll()
        self.epoll.register(map_fd, select.EPOLLIN)
        self.drained_at = time.monotonic()

    def _consume(self, callback: Callback) -> Tuple[int, bool]:
        """Up to MAX_RECORDS of what was committed when it started: a producer faster than
        the reader must not grow one poll's batch without bound (the rest waits in the ring;
        what no longer fits there is counted lost by the kernel side)."""
        count = 0
        cons = struct.unpack_from("<Q", self.consumer, 0)[0]
        prod = struct.unpack_from("<Q", self.producer, 0)[0]
        while cons < prod and count < MAX_RECORDS:
            off = cons & self.mask
            word = struct.unpack_from("<I", self.data, off)[0]
            if word & RINGBUF_BUSY:   # reserved, not yet committed
                return count, True
            length = word & ~(RINGBUF_BUSY | RINGBUF_DISCARD)
            if not word & RINGBUF_DISCARD:
                start = off + RINGBUF_HDR   # headers are 8-aligned: never split
                end = start + length
                if end <= self.size:
                    callback(bytes(self.data[start:end]))
                else:
                    callback(bytes(self.data[start:]) + bytes(self.data[:end - self.size]))
                count += 1
            cons += (length + RINGBUF_HDR + 7) & ~7
            struct.pack_into("<Q", self.consumer, 0, cons)
        return count, cons >= prod

    def close(self) -> None:
        self.epoll.close()
        self.data.release()
        self.producer.close()
        self.consumer.close()


PERF_RECORD_LOST, PERF_RECORD_SAMPLE = 2, 9
_DATA_HEAD, _DATA_TAIL = 1024, 1032   # offsets in struct perf_event_mmap_page


class _PerfRing:
    def __init__(self, fd: int, pages: int):
        self.fd = fd
        self.size = pages * mmap.PAGESIZE
        self.map = mmap.mmap(fd, mmap.PAGESIZE + self.size, mmap.MAP_SHARED,
                             mmap.PROT_READ | mmap.PROT_WRITE)

    def _bytes(self, pos: int, n: int) -> bytes:
        start = mmap.PAGESIZE + pos % self.size
        end = start + n
        limit = mmap.PAGESIZE + self.size
        if end <= limit:
            return self.map[start:end]
        return self.map[start:limit] + self.map[mmap.PAGESIZE:mmap.PAGESIZE + end - limit]

    def consume(self, callback: Callback, lost: Callable[[int], None]) -> int:
        head = struct.unpack_from("<Q", self.map, _DATA_HEAD)[0]
        tail = struct.unpack_from("<Q", self.map, _DATA_TAIL)[0]
        count = 0
        while tail < head and count < MAX_RECORDS:
            rtype, _misc, size = struct.unpack("<IHH", self._bytes(tail, 8))
            if size < 8:
                break
            if rtype == PERF_RECORD_SAMPLE:
                raw = self._bytes(tail + 8, size - 8)
                (n,) = struct.unpack_from("<I", raw, 0)
                callback(raw[4:4 + n])
                count += 1
            elif rtype == PERF_RECORD_LOST:
                lost(struct.unpack_from("<QQ", self._bytes(tail + 8, 16))[1])
            tail += size
        struct.pack_into("<Q", self.map, _DATA_TAIL, tail)
        return count


class PerfBufferReader(_Reader):
    """Consumer of per-CPU perf event buffers (PERF_COUNT_SW_BPF_OUTPUT) by their fds, for
    kernels without BPF ring buffers."""

    def __init__(self, fds: List[int], pages: int, lost: Callable[[int], None]):
        self.rings = [_PerfRing(fd, pages) for fd in fds]
        self.lost = lost
        self.epoll = select.epoll()
        for ring in self.rings:
            self.epoll.register(ring.fd, select.EPOLLIN)
        self.drained_at = time.monotonic()

    def _consume(self, callback: Callback) -> Tuple[int, bool]:
        counts = [ring.consume(callback, self.lost) for ring in self.rings]
        return sum(counts), max(counts, default=0) < MAX_RECORDS

    def close(self) -> None:
        self.epoll.close()
        for ring in self.rings:
            ring.map.close()


class _PerfEventAttr(ctypes.Structure):
    _fields_ = [("type", ctypes.c_uint32), ("size", ctypes.c_uint32),
                ("config", ctypes.c_uint64), ("sample_period", ctypes.c_uint64),
                ("sample_type", ctypes.c_uint64), ("read_format", ctypes.c_uint64),
                ("flags", ctypes.c_uint64), ("wakeup_events", ctypes.c_uint32),
                ("bp_type", ctypes.c_uint32), ("pad", ctypes.c_uint8 * 64)]


PERF_TYPE_SOFTWARE, PERF_COUNT_SW_BPF_OUTPUT, PERF_SAMPLE_RAW = 1, 10, 1 << 10
PERF_FLAG_FD_CLOEXEC = 1 << 3


def open_bpf_output(cpu: int) -> int:
    """A perf event a BPF program can write to on `cpu` (what BCC's open_perf_buffer makes).
    Raises OSError."""
    attr = _PerfEventAttr(type=PERF_TYPE_SOFTWARE, size=ctypes.sizeof(_PerfEventAttr),
                          config=PERF_COUNT_SW_BPF_OUTPUT, sample_period=1,
                          sample_type=PERF_SAMPLE_RAW, wakeup_events=1)
    fd = _libc.syscall(syscall_nr(SYS_PERF_EVENT_OPEN, "perf_event_open"), ctypes.byref(attr),
                       -1, cpu, -1, PERF_FLAG_FD_CLOEXEC)
    if fd < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return fd
