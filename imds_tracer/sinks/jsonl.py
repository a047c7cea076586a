"""JSON lines: one object per request, the keys of SPEC §2 "Outputs" (a contract for tools)."""
from __future__ import annotations

import json
import os
import sys
from datetime import datetime, timezone

from ..model import ProcessInfo, RequestRecord


def _proc(info: ProcessInfo) -> dict:
    return {"pid": info.pid, "comm": info.comm,
            "argv": list(info.argv) if info.argv is not None else None}


def to_dict(record: RequestRecord) -> dict:
    process = record.process
    container = record.container
    return {
        "time": datetime.fromtimestamp(record.time, timezone.utc).isoformat(
            timespec="microseconds"),
        "level": record.level,
        "provider": record.provider,
        "mode": record.mode,
        "problems": list(record.problems),
        "method": record.method,
        "path": record.path,
        "http_version": record.version,
        "dst_ip": record.dst_ip,
        "dst_port": record.dst_port,
        "pid": process.pid if process else None,
        "comm": process.comm if process else None,
        "argv": list(process.argv) if process and process.argv is not None else None,
        "exe": process.exe if process else None,
        "uid": record.uid,
        "parents": [_proc(p) for p in record.parents],
        "container": None if container is None else {
            "runtime": container.runtime, "id": container.id, "pod_uid": container.pod_uid},
        "cgroup_id": record.cgroup_id,
        "source": record.source,
        "headers": record.headers,
        "status": record.status,
        "truncated": record.truncated,
        "note": record.note,
        "raw": record.raw_excerpt,
    }


class JsonLinesSink:
    """To a file (appended, 0600) or to stdout with "-"."""

    def __init__(self, target: str, on_failure=None):
        self.target = target
        self.on_failure = on_failure
        self._fh = None
        self._open()

    def _open(self) -> None:
        if self.target == "-":
            self._fh = sys.stdout
            return
        directory = os.path.dirname(os.path.abspath(self.target))
        os.makedirs(directory, exist_ok=True)
        fd = os.open(self.target, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._fh = os.fdopen(fd, "a", encoding="utf-8", buffering=1)

    def emit(self, record: RequestRecord) -> None:
        try:
            self._fh.write(json.dumps(to_dict(record), separators=(",", ":")) + "\n")
            if self._fh is sys.stdout:
                self._fh.flush()
        except (OSError, ValueError):
            if self.on_failure is not None:
                self.on_failure(1)

    def drops(self, counts: dict[str, int], ts: float) -> None:
        pass  # counted in metrics and summarised in the trace log

    def reopen(self) -> None:
        if self.target != "-":
            self.close()
            try:
                self._open()
            except OSError:
                pass

    def close(self) -> None:
        if self._fh is not None and self._fh is not sys.stdout:
            try:
                self._fh.close()
            except OSError:
                pass
        elif self._fh is sys.stdout:
            try:
                sys.stdout.flush()
            except (OSError, ValueError):
                pass
