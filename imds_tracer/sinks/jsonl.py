"""JSON lines: one object per request, the keys of SPEC §2 "Outputs" (a contract for tools)."""
from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict
from datetime import datetime, timezone

from ..clients import advice_text
from ..model import ProcessInfo, RequestRecord
from .files import RotatingFile


def _proc(info: ProcessInfo) -> dict:
    return {"pid": info.pid, "comm": info.comm,
            "argv": list(info.argv) if info.argv is not None else None,
            "argv_truncated": info.argv_truncated}


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
        "argv_truncated": process.argv_truncated if process else False,
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
        "user_agent": record.user_agent,
        "reads": record.reads,
        "fallback": record.fallback,
        "client": _client(record),
        "owner": None if record.owner is None else asdict(record.owner),
    }


def _client(record: RequestRecord) -> dict | None:
    c = record.client
    if c is None:
        return None
    return {"name": c.name, "version": c.version, "min_hardened": c.min_hardened,
            "advice": c.advice, "source": c.source,
            "advice_text": None if c.advice is None else advice_text(
                c.advice, c.name, record.provider, record.fallback)}


class JsonLinesSink:
    """To stdout with "-", else to a file rotated like the trace log (0600, whole lines)."""

    def __init__(self, target: str, max_bytes: int = 1024 * 1024, backups: int = 5,
                 on_failure=None):
        self.target = target
        self.on_failure = on_failure
        self.file = None
        if target != "-":
            path = os.path.abspath(target)
            self.file = RotatingFile(os.path.dirname(path), os.path.basename(path), max_bytes,
                                     backups, private_dir=False, on_failure=on_failure)

    def emit(self, record: RequestRecord) -> None:
        line = json.dumps(to_dict(record), separators=(",", ":"))
        if self.file is not None:
            self.file.add(line)  # written at flush()
            return
        try:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()
        except (OSError, ValueError):
            if self.on_failure is not None:
                self.on_failure(1)

    def flush(self) -> None:
        if self.file is not None:
            self.file.flush()

    def drops(self, counts: dict[str, int], ts: float) -> None:
        pass  # counted in metrics and summarised in the trace log

    def reopen(self) -> None:
        if self.file is not None:
            self.file.reopen()

    def close(self) -> None:
        if self.file is not None:
            self.flush()
            self.file.close()
            return
        try:
            sys.stdout.flush()
        except (OSError, ValueError):
            pass
