"""The live agent's durable summary: every normal-mode offender it saw and when it watched.

Trace-log lines rotate away and a restart leaves no mark in them; this file does not. It lives
beside the logs (`<log dir>/imds-evidence.json`), is rewritten whole every WRITE_EVERY seconds
and at exit (a temporary file, fsync, rename: a reader sees the old or the new file, never half
of one; SIGKILL loses at most WRITE_EVERY seconds), and is bounded: MAX_OFFENDERS offenders
(later ones are folded into one "more offenders" entry, so none is forgotten as a verdict) and
MAX_INTERVALS watch intervals (older ones are dropped and `forgotten_before` says until when
coverage is unknown). Each start of the agent opens a new interval: its `start`, its `last`
heartbeat, whether it `stopped` cleanly, and the losses counted during it. `report` finds the
file with nothing else given and merges it with the lines (`imds_tracer.verdict`).

    {"version": 2, "forgotten_before": null,
     "intervals": [{"start": 1764400000.0, "last": 1764400600.0, "stopped": true,
                    "records": 1234, "drops": {"kernel_lost": 3}}],
     "offenders": [{"key": ["unit:cron.service", "curl/7.88.1", "aws"],
                    "executable": "curl", "argv": "curl http://...", "container": "-",
                    "package": "curl", "user_agent": "curl/7.88.1", "reads": "user-data",
                    "advice": "tool", "count": 12, "succeeded": 12,
                    "first": 1764400100.0, "last": 1764400500.0}]}

An offender's key is report's work-list key (owner, client, provider), read back from the
trace-log line the record makes, so the file and the lines merge row by row.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from datetime import datetime, timezone

from .model import RequestRecord
from .sinks.tracelog import format_line

log = logging.getLogger("imds_tracer")

EVIDENCE_NAME = "imds-evidence.json"
VERSION = 2
WRITE_EVERY = 5.0        # seconds between rewrites (the heartbeat)
MAX_OFFENDERS = 1000
MAX_INTERVALS = 2000
MORE = "(more offenders)"
UNREADABLE = "(unreadable)"
DETAILS = ("executable", "argv", "container", "package", "user_agent")
FINDINGS = ("reads", "fallback", "advice")   # the line's findings fields an entry keeps


def record_row(record: RequestRecord) -> tuple[tuple, dict, dict]:
    """The work-list key, details and findings of a record, read back from the trace-log
    line it makes: the evidence and the lines group offenders by the same text."""
    from .report import parse_line, warning_row   # report imports this module
    match = parse_line(format_line(record).rstrip("\n"))
    if match is None:   # never expected: keep counting it, under a key of its own
        return (UNREADABLE, "unknown", record.provider), {}, {}
    return warning_row(match)


def path(log_dir: str) -> str:
    return os.path.join(log_dir, EVIDENCE_NAME)


def load(log_dir: str) -> dict | None:
    """The evidence in a log directory; None when there is none. A file that cannot be read
    as evidence raises ValueError (with the reason) or OSError."""
    try:
        with open(path(log_dir), "rb") as fh:
            data = fh.read(64 * 1024 * 1024)
    except FileNotFoundError:
        return None
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise ValueError(f"{path(log_dir)}: not valid JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("version") != VERSION or \
            not isinstance(doc.get("intervals"), list) or \
            not isinstance(doc.get("offenders"), list):
        raise ValueError(f"{path(log_dir)}: not an imds-tracer evidence file (version "
                         f"{VERSION})")
    return doc


def offenders_since(doc: dict | None, start: float):
    """(key, {count, succeeded, first, last, details, findings}) of the offenders of an
    evidence file last seen at or after `start` (epoch seconds); times as datetimes. Entries
    that do not read as offenders are passed over."""
    for o in (doc or {}).get("offenders", []):
        try:
            first, last = float(o["first"]), float(o["last"])
            key = tuple(str(part) for part in o["key"])
            if len(key) != 3:
                continue
            details = {name: o.get(name) for name in DETAILS}
            entry = {"count": int(o["count"]), "succeeded": int(o.get("succeeded", 0)),
                     "first": datetime.fromtimestamp(first, timezone.utc),
                     "last": datetime.fromtimestamp(last, timezone.utc),
                     "details": {k: v for k, v in details.items() if isinstance(v, str)},
                     "findings": {k: str(o[k]) for k in FINDINGS if o.get(k)}}
        except (KeyError, TypeError, ValueError, OverflowError, OSError):
            continue
        if last >= start:
            yield key, entry


class EvidenceSink:
    """A pipeline sink (live agent only): counts offenders and losses, rewrites the file."""

    def __init__(self, log_dir: str, now: float | None = None):
        self.log_dir = log_dir
        self.failed_writes = 0
        now = time.time() if now is None else now
        try:
            doc = load(log_dir)
        except (OSError, ValueError) as exc:
            # what it held is unknown: start again, and say from when coverage is known
            log.warning("evidence file unusable, starting a new one: %s", exc)
            doc = {"forgotten_before": now}
        doc = doc or {}
        self.forgotten_before = doc.get("forgotten_before")
        self.intervals = [i for i in doc.get("intervals", []) if isinstance(i, dict)]
        self.offenders = {}
        for o in doc.get("offenders", []):
            if isinstance(o, dict) and isinstance(o.get("key"), list):
                self.offenders[tuple(map(str, o["key"]))] = o
        self.current = {"start": now, "last": now, "stopped": False, "records": 0,
                        "drops": {}}
        self.intervals.append(self.current)
        self._last_write = 0.0
        self.write(now)

    # -- the sink contract --------------------------------------------------------------
    def emit(self, record: RequestRecord) -> None:
        self.current["records"] += 1
        if record.mode != "normal":
            return
        key, details, findings = record_row(record)
        entry = self.offenders.get(key)
        if entry is None:
            if len(self.offenders) >= MAX_OFFENDERS:
                key, details, findings = (MORE, "unknown", record.provider), {}, {}
                entry = self.offenders.get(key)
            if entry is None:
                entry = self.offenders[key] = {
                    "key": list(key), **details, "count": 0, "succeeded": 0,
                    "first": record.time, "last": record.time}
        for name in FINDINGS:   # a fallback seen once explains the row (report does the same)
            if findings.get(name) and (name != "fallback" or not entry.get(name)):
                entry[name] = findings[name]
        entry["count"] += 1
        entry["first"] = min(entry["first"], record.time)
        entry["last"] = max(entry["last"], record.time)
        if record.status is not None and 200 <= record.status < 300:
            entry["succeeded"] += 1

    def count_drop(self, kind: str, count: int) -> None:
        drops = self.current["drops"]
        drops[kind] = drops.get(kind, 0) + count

    def drops(self, counts: dict[str, int], ts: float) -> None:
        pass  # counted as they happen, in count_drop

    def flush(self) -> None:
        now = time.time()
        if now - self._last_write >= WRITE_EVERY:
            self.write(now)

    def reopen(self) -> None:
        self.write(time.time())

    def close(self) -> None:
        self.current["stopped"] = True
        self.write(time.time())

    # -- the file ---------------------------------------------------------------------------
    def write(self, now: float) -> bool:
        """Rewrite the file atomically; False (counted, logged once) when it failed."""
        self._last_write = now
        self.current["last"] = max(self.current["last"], now)
        if len(self.intervals) > MAX_INTERVALS:
            dropped = self.intervals[:len(self.intervals) - MAX_INTERVALS]
            self.intervals = self.intervals[len(dropped):]
            self.forgotten_before = max(i.get("last", 0) for i in dropped)
        doc = {"version": VERSION, "forgotten_before": self.forgotten_before,
               "intervals": self.intervals, "offenders": list(self.offenders.values())}
        data = json.dumps(doc, separators=(",", ":")).encode()
        target = path(self.log_dir)
        tmp = f"{target}.tmp"
        try:
            os.makedirs(self.log_dir, mode=0o700, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, target)
            dir_fd = os.open(self.log_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            if not self.failed_writes:
                log.error("cannot write %s: %s (the verdict will lack this evidence)",
                          target, exc.strerror or exc)
            self.failed_writes += 1
            return False
        return True
