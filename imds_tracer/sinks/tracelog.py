"""The trace log operators grep: one line per request, the level in brackets.

    [2026-11-23T11:52:49+00:00] [WARNING] normal-mode provider=aliyun GET /latest/meta-data/
    instance-id dst=100.100.100.200:80 status=200 (pid:1234:curl argv:curl http://...)
    called by -> (pid:1200:bash argv:-bash) -> (pid:1:systemd argv:/sbin/init) container=-

Every field from the wire or from a process is already escaped (redact.escape); the
delimiters of this format (space in the target, ")" in argv) are escaped too, so a line
cannot be forged and `report` can parse it back. The file rotates by size; the directory is
0700 and the files 0600; a removed directory is recreated; a write that fails (disk full) is
counted, and writing resumes when it can.
"""
from __future__ import annotations

import errno
import functools
import os
from datetime import datetime

from ..model import ProcessInfo, RequestRecord
from ..redact import delimit

LOG_NAME = "imds-trace.log"
MODE_WORDS = {"normal": "normal-mode", "hardened": "hardened-mode", "n/a": "no-token-mode",
              "unknown": "unknown-mode"}


def timestamp(ts: float) -> str:
    return _local_iso(datetime.fromtimestamp(ts).replace(microsecond=0))


@functools.lru_cache(maxsize=8)
def _local_iso(naive: datetime) -> str:
    # astimezone() asks the C library for the zone each call: once per second is enough
    return naive.astimezone().isoformat(timespec="seconds")


def _proc(info: ProcessInfo | None) -> str:
    if info is None:
        return "(pid:-:- argv:-)"
    pid = "-" if info.pid is None else str(info.pid)
    comm = delimit(info.comm or "-", " ():")
    argv = " ".join(delimit(a, ")") for a in info.argv) if info.argv else "-"
    return f"(pid:{pid}:{comm} argv:{argv})"


def container_text(record: RequestRecord) -> str:
    c = record.container
    if c is None:
        return "-"
    text = f"{c.runtime}:{(c.id or '-')[:12]}"
    return text + (f"/pod:{c.pod_uid}" if c.pod_uid else "")


def format_line(record: RequestRecord) -> str:
    parts = [f"[{timestamp(record.time)}]", f"[{record.level}]",
             MODE_WORDS.get(record.mode, "unknown-mode"), f"provider={record.provider}"]
    if record.problems:
        parts.append("problems=" + ",".join(record.problems))
    if record.method is not None:
        parts.append(delimit(record.method, " "))
        parts.append(delimit(record.path or "", " ") or "-")
    else:
        parts.append(f"unparsed={delimit(record.raw_excerpt or '', ' ')[:120] or '-'}")
    dst = f"[{record.dst_ip}]" if ":" in record.dst_ip else record.dst_ip
    parts.append(f"dst={dst}:{record.dst_port}")
    parts.append(f"status={record.status if record.status is not None else '-'}")
    if record.truncated:
        parts.append("truncated")
    if record.note:
        parts.append(f"note={delimit(record.note, ' ')}")
    parts.append(_proc(record.process))
    if record.parents:
        parts.append("called by -> " + " -> ".join(_proc(p) for p in record.parents))
    parts.append(f"container={container_text(record)}")
    return " ".join(parts)


class RotatingFile:
    """Append-only text file with size rotation, safe modes and failure counting."""

    def __init__(self, directory: str, name: str, max_bytes: int, backups: int):
        self.directory = directory
        self.path = os.path.join(directory, name)
        self.max_bytes = max_bytes
        self.backups = backups
        self.failed = 0          # lines that could not be written
        self._fd: int | None = None
        self._size = 0
        self._broken = False     # the last write failed: reopen before the next
        self._half_line = False  # a cut line could not be taken back: start on a new line
        self._open()

    def _open(self) -> None:
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        os.chmod(self.directory, 0o700)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.fchmod(fd, 0o600)
        self._fd = fd
        self._size = os.fstat(fd).st_size

    def _close(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None

    def reopen(self) -> None:
        """After logrotate moved the file away (SIGHUP), or after a failure."""
        self._close()
        try:
            self._open()
            self._broken = False
        except OSError:
            self._broken = True

    def _rotate(self) -> None:
        self._close()
        if self.backups == 0:
            os.unlink(self.path)
        else:
            for i in range(self.backups - 1, 0, -1):
                src = f"{self.path}.{i}"
                if os.path.exists(src):
                    os.replace(src, f"{self.path}.{i + 1}")
            os.replace(self.path, f"{self.path}.1")
        self._open()

    def write(self, line: str) -> bool:
        data = (line + "\n").encode("utf-8", "replace")
        try:
            if self._broken or self._fd is None or not os.path.exists(self.path):
                self.reopen()  # the directory or file was removed: make it again
                if self._broken:
                    raise OSError(errno.EIO, "cannot reopen")
            if self._size and self._size + len(data) > self.max_bytes:
                self._rotate()
            if self._half_line:
                data = b"\n" + data
            written = os.write(self._fd, data)
            self._size += written
            if written != len(data):
                self._take_back(written)
                raise OSError(errno.ENOSPC, "short write")
            self._half_line = False
            return True
        except OSError:
            self.failed += 1
            self._broken = True
            return False

    def _take_back(self, count: int) -> None:
        """Remove the start of a line that did not fit (disk full): left there, the next line
        would be glued to it. If that fails, the next line starts with a newline instead."""
        try:
            os.ftruncate(self._fd, max(0, os.fstat(self._fd).st_size - count))
            self._size = max(0, self._size - count)
        except OSError:
            self._half_line = True

    def close(self) -> None:
        self._close()


class TraceLogSink:
    def __init__(self, directory: str, max_bytes: int = 1024 * 1024, backups: int = 5,
                 on_failure=None):
        self.file = RotatingFile(directory, LOG_NAME, max_bytes, backups)
        self.on_failure = on_failure   # called with the number of lines lost
        self._failed_reported = 0

    def _write(self, line: str) -> None:
        if not self.file.write(line) and self.on_failure is not None:
            self.on_failure(1)

    def emit(self, record: RequestRecord) -> None:
        self._write(format_line(record))

    def drops(self, counts: dict[str, int], ts: float) -> None:
        what = ", ".join(f"{kind}={n}" for kind, n in sorted(counts.items()))
        self._write(f"[{timestamp(ts)}] [ERROR] agent dropped {what} "
                    "(see imds_tracer_lost_events_total / imds_tracer_dropped_total)")

    def reopen(self) -> None:
        self.file.reopen()

    def close(self) -> None:
        self.file.close()
