"""The trace log operators grep: one line per request, the level in brackets.

    [2026-11-23T11:52:49+00:00] [WARNING] normal-mode provider=aliyun GET /latest/meta-data/
    instance-id dst=100.100.100.200:80 status=200 (pid:1234:curl argv:curl http://...)
    called by -> (pid:1200:bash argv:-bash) -> (pid:1:systemd argv:/sbin/init) container=-

Every field from the wire or from a process is already escaped (redact.escape_fields); each
goes through `_field`, which escapes the delimiters of this format (space, ")" in argv) and
the word WARNING, so a line cannot be forged and `report` can parse it back. The file rotates by size; the directory is
0700 and the files 0600; a removed directory is recreated; a write that fails (disk full) is
counted, and writing resumes when it can. Lines are written by flush() (the pipeline's tick,
flush), reopen() and close().
"""
from __future__ import annotations

import functools
from datetime import datetime

from ..model import ProcessInfo, RequestRecord
from ..redact import delimit
from .files import DirectoryLock, RotatingFile

LOG_NAME = "imds-trace.log"
ARGV_CUT = "...[truncated]"  # ends an argv the kernel kept only the start of
MODE_WORDS = {"normal": "normal-mode", "hardened": "hardened-mode", "n/a": "no-token-mode",
              "unknown": "unknown-mode"}


def _field(text: str, delimiters: str) -> str:
    """A field a process controls (path, argv, comm), already escaped: its delimiters escaped
    too, and the word WARNING spelled with an escape, so that the operators' plain
    `grep WARNING` matches the level of normal-mode lines and nothing a process wrote."""
    text = delimit(text, delimiters)
    return text.replace("WARNING", "WARN\\x49NG") if "WARNING" in text else text


def timestamp(ts: float) -> str:
    second = int(ts)
    if 0 <= ts - second < 0.999999:
        # datetime rounds ts to the microsecond: below this it stays within `second`, whose
        # text is made once (localtime() per line cost more than the rest of the line)
        return _second_iso(second)
    return _local_iso(datetime.fromtimestamp(ts).replace(microsecond=0))


@functools.lru_cache(maxsize=8)
def _second_iso(second: int) -> str:
    return _local_iso(datetime.fromtimestamp(second))


@functools.lru_cache(maxsize=8)
def _local_iso(naive: datetime) -> str:
    # astimezone() asks the C library for the zone each call: once per second is enough
    return naive.astimezone().isoformat(timespec="seconds")


def _proc(info: ProcessInfo | None) -> str:
    if info is None:
        return "(pid:-:- argv:-)"
    return _proc_text(info.pid, info.comm, info.argv, info.argv_truncated)


@functools.lru_cache(maxsize=1024)
def _proc_text(pid: int | None, comm: str | None, argv: tuple[str, ...] | None,
               argv_truncated: bool) -> str:
    # made once per process: the same few senders and parents make most of the requests
    # (keyed by plain values: a ProcessInfo key would cost a Python __hash__ per line)
    pid_text = "-" if pid is None else str(pid)
    comm = _field(comm or "-", " ():")
    argv_text = " ".join(_field(a, ")") for a in argv) if argv else "-"
    if argv_truncated:
        argv_text += " " + ARGV_CUT
    return f"(pid:{pid_text}:{comm} argv:{argv_text})"


def container_text(record: RequestRecord) -> str:
    c = record.container
    if c is None:
        return "-"
    text = f"{c.runtime}:{(c.id or '-')[:12]}"
    return _field(text + (f"/pod:{c.pod_uid}" if c.pod_uid else ""), " ")


def format_line(record: RequestRecord) -> str:
    parts = [f"[{timestamp(record.time)}] [{record.level}] "
             f"{MODE_WORDS.get(record.mode, 'unknown-mode')} "
             f"provider={_field(record.provider, ' ')}"]
    if record.problems:
        parts.append("problems=" + _field(",".join(record.problems), " "))
    if record.method is not None:
        parts.append(f"{_field(record.method, ' ')} {_field(record.path or '', ' ') or '-'}")
    else:
        parts.append(f"unparsed={_field(record.raw_excerpt or '', ' ')[:120] or '-'}")
    dst = _field(f"[{record.dst_ip}]" if ":" in record.dst_ip else record.dst_ip, " ")
    status = record.status if record.status is not None else "-"
    parts.append(f"dst={dst}:{record.dst_port} status={status}")
    if record.truncated:
        parts.append("truncated")
    if record.note:
        parts.append(f"note={_field(record.note, ' ')}")
    parts.append(_proc(record.process))
    if record.parents:
        parts.append("called by -> " + " -> ".join(map(_proc, record.parents)))
    parts.append(f"container={container_text(record)}")
    parts.extend(findings_fields(record))
    return " ".join(parts)


# owner fields of the line, in order: (key in the line, Owner attribute)
OWNER_FIELDS = (("unit", "unit"), ("pkg", "package"), ("k8s_ns", "k8s_namespace"),
                ("k8s_pod", "k8s_pod"), ("k8s_container", "k8s_container"),
                ("cname", "container_name"), ("image", "image"))


def findings_fields(record: RequestRecord) -> tuple[str, ...]:
    """What to do about a request (issue 11), after container=: reads=, client=, advice=,
    fallback=, the owner's fields, and last the User-Agent in quotes. Absent ones are left
    out; every value a process controls is escaped and delimited."""
    return _findings_text(record.reads, record.client, record.fallback, record.owner,
                          record.user_agent)


@functools.lru_cache(maxsize=1024)
def _findings_text(reads, c, fallback, owner, user_agent) -> tuple[str, ...]:
    # made once per sender and kind of request: a busy client repeats all of these
    out = []
    if reads:
        out.append(f"reads={_field(reads, ' ')}")
    if c is not None:
        name = _field(c.name, " /") if c.name else "unknown"
        out.append(f"client={name}" + (f"/{_field(c.version, ' ')}" if c.version else ""))
        if c.advice:
            out.append(f"advice={_field(c.advice, ' ')}")
    if fallback:
        out.append(f"fallback={_field(fallback, ' ')}")
    if owner is not None:
        for key, attr in OWNER_FIELDS:
            value = getattr(owner, attr)
            if value:
                out.append(f"{key}={_field(value, ' ')}")
    if user_agent is not None:
        out.append(f'ua="{_field(user_agent, chr(34))}"')
    return tuple(out)


class TraceLogSink:
    def __init__(self, directory: str, max_bytes: int = 1024 * 1024, backups: int = 5,
                 on_failure=None):
        # on_failure: called with the number of lines lost
        self.lock = DirectoryLock(directory)  # before anything is written there
        try:
            self.file = RotatingFile(directory, LOG_NAME, max_bytes, backups,
                                     on_failure=on_failure)
        except BaseException:
            self.lock.release()
            raise

    def _write(self, line: str) -> None:
        self.file.add(line)

    def flush(self) -> None:
        self.file.flush()

    def emit(self, record: RequestRecord) -> None:
        self._write(format_line(record))

    def drops(self, counts: dict[str, int], ts: float) -> None:
        what = ", ".join(f"{kind}={n}" for kind, n in sorted(counts.items()))
        self._write(f"[{timestamp(ts)}] [ERROR] agent dropped {what} "
                    "(see imds_tracer_lost_events_total / imds_tracer_dropped_total)")

    def reopen(self) -> None:
        self.file.reopen()

    def close(self) -> None:
        self.flush()
        self.file.close()
        self.lock.release()
