"""What the evidence supports, as an exit code that means what it says.

    0  SAFE: the agent watched the whole window (no gap longer than GAP_TOLERANCE), lost
       nothing that could hide a request, every log line was read, and no normal-mode
       request was seen.
    1  NOT SAFE: a normal-mode request was seen (or a WARNING line could not be read).
    2  error (bad arguments, unreadable files).
    3  NOT ENOUGH EVIDENCE: no normal-mode request seen, but the watch does not cover the
       window: no evidence file (the agent never ran on this log dir, or the logs are a
       replay's), a watch that started after the window did or has gaps (agent down), events
       lost, or lines that could not be read.

Coverage comes from the agent's evidence file (`imds_tracer.evidence`): its watch intervals,
clipped to the window.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

EXIT_SAFE, EXIT_NOT_SAFE, EXIT_ERROR, EXIT_UNSURE = 0, 1, 2, 3
WORDS = {EXIT_SAFE: "safe", EXIT_NOT_SAFE: "not-safe", EXIT_UNSURE: "not-enough-evidence"}
GAP_TOLERANCE = 600.0   # seconds the agent may be away (a restart, an upgrade) unremarked
# drops that can hide a request from the verdict; cut heads and long sends are still logged
LOSS_KINDS = frozenset({"kernel_lost", "user_lost", "stream_gap", "flow_table_full",
                        "log_write", "event_error"})


@dataclass
class Coverage:
    evidence: bool                 # an evidence file was found
    watched: float = 0.0           # seconds of the window the agent watched
    gaps: list = field(default_factory=list)   # (from, to) epoch seconds it did not
    starts: int = 0                # agent starts in the window
    unclean: int = 0               # of those, runs that ended without a clean stop
    lost: dict = field(default_factory=dict)   # loss kind -> count in the window
    records: int = 0               # requests the agent logged in the window


def coverage(doc: dict | None, start: float, now: float) -> Coverage:
    """How well the agent's watch intervals cover [start, now]."""
    if doc is None:
        return Coverage(False, gaps=[(start, now)])
    cov = Coverage(True)
    spans = []
    for interval in doc.get("intervals", []):
        try:
            begin, last = float(interval["start"]), float(interval["last"])
        except (KeyError, TypeError, ValueError):
            continue
        if last < start or begin > now:
            continue
        spans.append((begin, last, interval))
    spans.sort(key=lambda s: s[0])
    cursor = start
    for n, (begin, last, interval) in enumerate(spans):
        if begin - cursor > GAP_TOLERANCE:
            cov.gaps.append((cursor, begin))
        cov.watched += max(0.0, min(last, now) - max(begin, cursor))
        cursor = max(cursor, last)
        cov.starts += 1
        if not interval.get("stopped") and n < len(spans) - 1:
            cov.unclean += 1
        cov.records += int(interval.get("records") or 0)
        for kind, count in (interval.get("drops") or {}).items():
            if kind in LOSS_KINDS and isinstance(count, int) and count > 0:
                cov.lost[kind] = cov.lost.get(kind, 0) + count
    if now - cursor > GAP_TOLERANCE:
        cov.gaps.append((cursor, now))
    return cov


def decide(normal: int, unreadable_warnings: int, unreadable: int, cov: Coverage,
           line_drops: dict) -> tuple[int, list[str]]:
    """The exit code and the reasons for it (not-safe or not-enough-evidence)."""
    if normal or unreadable_warnings:
        reasons = []
        if unreadable_warnings:
            reasons.append(f"{unreadable_warnings} WARNING line(s) that report could not read")
        return EXIT_NOT_SAFE, reasons
    reasons = []
    if not cov.evidence:
        reasons.append("no evidence file (imds-evidence.json): the agent has not watched "
                       "this log directory (replayed logs are no watch)")
    elif cov.gaps:
        missing = sum(b - a for a, b in cov.gaps)
        reasons.append(f"the agent did not watch {_span(missing)} of the window "
                       f"({len(cov.gaps)} gap(s), the first from {_when(cov.gaps[0][0])} to "
                       f"{_when(cov.gaps[0][1])})")
    lost = dict(cov.lost)
    for kind, count in line_drops.items():
        if kind in LOSS_KINDS:
            lost[kind] = max(lost.get(kind, 0), count)
    if lost:
        reasons.append("events were lost (" + ", ".join(
            f"{k}={v}" for k, v in sorted(lost.items())) + ")")
    if unreadable:
        reasons.append(f"{unreadable} log line(s) could not be read")
    return (EXIT_UNSURE if reasons else EXIT_SAFE), reasons


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).astimezone().isoformat(timespec="seconds")


def _span(seconds: float) -> str:
    from .report import _ago  # report imports this module: the one duration format
    return _ago(timedelta(seconds=seconds))
