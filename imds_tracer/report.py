"""`imds-tracer report`: the work list of the trace logs -- one row per owner (systemd unit,
container or pod, else executable) and client, with the client's version, the fix, the
fallback diagnosis and what it reads, most urgent first -- and whether hardened-only mode can
be enforced. The offenders come from the lines and from the agent's evidence file (which
outlives rotation); exit codes: `imds_tracer.verdict` (0 safe, 1 not safe, 2 error, 3 not
enough evidence)."""
from __future__ import annotations

import glob
import gzip
import json
import os
import re
import sys
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from . import evidence, verdict as judge
from .classify import READ_KINDS
from .clients import advice_text
from .sinks.tracelog import LOG_NAME

RECOMMENDED_DAYS = 14   # what the Alibaba and AWS docs advise watching before enforcing

_LINE = re.compile(
    r"^\[(?P<time>[^\]]+)\] \[(?P<level>[A-Z]+)\] (?P<mode>\S+) provider=(?P<provider>\S+) "
    r"(?:problems=(?P<problems>\S+) )?(?:unparsed=\S+|(?P<method>\S+) (?P<path>\S+)) "
    r"dst=(?P<dst>\S+) status=(?P<status>\S+) (?:truncated )?(?:note=\S+ )?"
    r"\(pid:(?P<pid>[^:]*):(?P<comm>\S*) argv:(?P<argv>.*?)\)(?: called by -> .*)? "
    r'container=(?P<container>\S+)(?P<findings>(?: [a-z0-9_]+=[^\s"]\S*)*)'
    r'(?: ua="(?P<ua>[^"]*)")?$')
_DROP = re.compile(r"^\[(?P<time>[^\]]+)\] \[ERROR\] agent dropped (?P<what>.*?) \(")
_SINCE = re.compile(r"^(\d+)([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class ReportError(Exception):
    pass


def parse_since(text: str) -> timedelta:
    match = _SINCE.match(text.strip())
    if not match:
        raise ReportError(f"--since {text!r}: expected a number and a unit, e.g. 14d, 12h, 30m")
    return timedelta(seconds=int(match.group(1)) * _UNITS[match.group(2)])


@dataclass
class Offender:
    """One row of the work list: an owner and the client it runs."""
    owner: str        # unit:foo.service, pod:ns/pod/container, container:name, exe:curl
    client: str       # name/version as the trace line says, or "unknown"
    provider: str
    executable: str = ""
    argv: str = ""
    container: str = "-"
    advice: str | None = None
    fallback: str | None = None
    reads: str = "other"   # the most urgent kind read (READ_KINDS order)
    package: str | None = None
    user_agent: str | None = None
    count: int = 0
    first: datetime | None = None
    last: datetime | None = None
    succeeded: int = 0   # the service answered 2xx: these break under hardened-only mode

    def see(self, when: datetime, status: str, fields: dict) -> None:
        self.count += 1
        self.first = when if self.first is None or when < self.first else self.first
        self.last = when if self.last is None or when > self.last else self.last
        if status.isdigit() and 200 <= int(status) < 300:
            self.succeeded += 1
        self.see_findings(fields)

    def see_findings(self, fields: dict) -> None:
        reads = fields.get("reads", "other")
        if READ_KINDS.index(reads if reads in READ_KINDS else "other") < \
                READ_KINDS.index(self.reads):
            self.reads = reads
        # a fallback seen once explains the row (the client is capable)
        if fields.get("fallback", "").startswith("token_put_") or self.fallback is None:
            self.fallback = fields.get("fallback", self.fallback)
            self.advice = fields.get("advice", self.advice)

    @property
    def fix(self) -> str:
        name = self.client.split("/", 1)[0]
        return advice_text(self.advice, None if name == "unknown" else name, self.provider,
                           self.fallback)

    def urgency(self) -> tuple:
        """What breaks first under hardened-only mode: credential readers, then requests
        that succeed today, then the busiest."""
        return (READ_KINDS.index(self.reads), -self.succeeded, -self.count, self.owner)


def owner_of(fields: dict, container: str, executable: str) -> str:
    """The row's owner, most specific first; never guessed from nothing."""
    if fields.get("k8s_pod"):
        return "pod:" + "/".join(fields.get(k, "-") for k in ("k8s_ns", "k8s_pod",
                                                               "k8s_container"))
    if fields.get("cname"):
        return "container:" + fields["cname"]
    if container != "-":
        return "container:" + container
    if fields.get("unit"):
        return "unit:" + fields["unit"]
    return "exe:" + executable


@dataclass
class Summary:
    offenders: dict = field(default_factory=dict)
    levels: dict = field(default_factory=dict)
    drops: dict = field(default_factory=dict)
    first: datetime | None = None
    last: datetime | None = None
    files: int = 0
    unreadable_lines: int = 0
    unreadable_warnings: int = 0   # of those, lines with a [WARNING] level: never "safe"
    unreadable_sample: list = field(default_factory=list)
    coverage: judge.Coverage | None = None

    @property
    def normal_requests(self) -> int:
        return sum(o.count for o in self.offenders.values())


def _open(path: str):
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def log_files(log_dir: str) -> list[str]:
    return sorted(glob.glob(os.path.join(log_dir, LOG_NAME + "*")))


def summarise(log_dir: str, since: timedelta, now: datetime | None = None) -> Summary:
    if not os.path.isdir(log_dir):
        raise ReportError(f"log directory {log_dir}: not found (--log-dir)")
    files = log_files(log_dir)
    try:
        doc = evidence.load(log_dir)
    except (OSError, ValueError) as exc:
        raise ReportError(str(getattr(exc, "strerror", None) or exc)) from None
    now = now or datetime.now(timezone.utc)
    start = now - since
    summary = Summary(files=len(files))
    summary.coverage = judge.coverage(doc, start.timestamp(), now.timestamp())
    for path in files:
        try:
            with _open(path) as fh:
                for line in fh:
                    _take(summary, line.rstrip("\n"), start)
        except (OSError, EOFError) as exc:
            raise ReportError(f"{path}: {getattr(exc, 'strerror', None) or exc}") from None
    for key, entry in evidence.offenders_since(doc, start.timestamp()):
        # the agent counted every request, the lines only those not rotated away: the larger
        # count, never the sum
        offender = summary.offenders.get(key)
        if offender is None:
            offender = summary.offenders[key] = Offender(*key, **entry["details"])
            offender.see_findings(entry["findings"])
        offender.count = max(offender.count, entry["count"])
        offender.succeeded = max(offender.succeeded, entry["succeeded"])
        for when in (entry["first"], entry["last"]):
            offender.first = when if offender.first is None or when < offender.first \
                else offender.first
            offender.last = when if offender.last is None or when > offender.last \
                else offender.last
    return summary


def _when(text: str) -> datetime | None:
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        return None


def _unreadable(summary: Summary, line: str) -> None:
    """A line report cannot parse: counted, a few shown, a WARNING one never "safe"."""
    summary.unreadable_lines += 1
    if "[WARNING]" in line:
        summary.unreadable_warnings += 1
    if len(summary.unreadable_sample) < 3:
        summary.unreadable_sample.append(ascii(line[:160]))


def _take(summary: Summary, line: str, start: datetime) -> None:
    match = _LINE.match(line)
    if match is None:
        drop = _DROP.match(line)
        when = _when(drop.group("time")) if drop else None
        if drop and when and when >= start:
            for item in drop.group("what").split(", "):
                kind, _, n = item.partition("=")
                if n.isdigit():
                    summary.drops[kind] = summary.drops.get(kind, 0) + int(n)
        elif line.strip() and not (drop and when):
            _unreadable(summary, line)
        return
    when = _when(match.group("time"))
    if when is None:
        _unreadable(summary, line)
        return
    if when < start:
        return
    summary.first = when if summary.first is None or when < summary.first else summary.first
    summary.last = when if summary.last is None or when > summary.last else summary.last
    level = match.group("level")
    summary.levels[level] = summary.levels.get(level, 0) + 1
    if level != "WARNING":
        return
    key, details, fields = warning_row(match)
    offender = summary.offenders.get(key)
    if offender is None:
        offender = summary.offenders[key] = Offender(*key, **details)
    offender.see(when, match.group("status"), fields)


def warning_row(match: re.Match) -> tuple[tuple, dict, dict]:
    """The work-list key (owner, client, provider) of a parsed WARNING line, the row's
    details and the line's findings fields. The evidence file keys its offenders with this
    too (from the line its record makes), so the two merge."""
    argv = match.group("argv")
    first_arg = argv.split(" ", 1)[0] if argv != "-" else match.group("comm")
    executable = os.path.basename(first_arg) or first_arg
    fields = dict(item.partition("=")[::2] for item in match.group("findings").split())
    container = match.group("container")
    key = (owner_of(fields, container, executable), fields.get("client", "unknown"),
           match.group("provider"))
    details = {"executable": executable, "argv": argv, "container": container,
               "package": fields.get("pkg"), "user_agent": match.group("ua")}
    return key, details, fields


def parse_line(line: str) -> re.Match | None:
    return _LINE.match(line)


def work_list(summary: Summary) -> list:
    return sorted(summary.offenders.values(), key=Offender.urgency)


def _ago(delta: timedelta) -> str:
    """14d, 3h12m, 45m, 30s."""
    secs = max(int(delta.total_seconds()), 0)
    days, rest = divmod(secs, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    if days:
        return f"{days}d" + (f"{hours}h" if hours else "")
    if hours:
        return f"{hours}h" + (f"{minutes}m" if minutes else "")
    return f"{minutes}m" if minutes else f"{seconds}s"


def _fmt(when: datetime | None) -> str:
    return when.isoformat(timespec="seconds") if when else "-"


def verdict(summary: Summary, since: timedelta) -> tuple[int, list[str]]:
    """The exit code (imds_tracer.verdict) and the lines that explain it."""
    cov = summary.coverage or judge.Coverage(False)
    code, reasons = judge.decide(summary.normal_requests, summary.unreadable_warnings,
                                 summary.unreadable_lines, cov, summary.drops)
    processes = len(summary.offenders)
    if code == judge.EXIT_SAFE:
        notes = [f"verdict: SAFE to enforce hardened-only mode: no normal-mode request in "
                 f"the last {_ago(since)}, watched throughout"]
    elif code == judge.EXIT_NOT_SAFE:
        notes = [f"verdict: NOT SAFE to enforce hardened-only mode: {processes} "
                 f"offender(s) made {summary.normal_requests} normal-mode request(s)"]
    else:
        notes = [f"verdict: NOT ENOUGH EVIDENCE: no normal-mode request seen in the last "
                 f"{_ago(since)}, but the watch does not cover it"]
    notes += [f"  because: {reason}" for reason in reasons]
    if summary.unreadable_lines:
        notes.append(f"caution: {summary.unreadable_lines} line(s) could not be read, e.g. "
                     + "; ".join(summary.unreadable_sample))
    if cov.evidence:
        notes.append(f"coverage: watched {_ago(timedelta(seconds=cov.watched))} of the "
                     f"{_ago(since)} window in {cov.starts} run(s) of the agent"
                     + (f", {cov.unclean} of them ended without a clean stop"
                        if cov.unclean else ""))
        logged = sum(summary.levels.values())
        if cov.records > logged:
            notes.append(f"rotated: {cov.records - logged} request line(s) the agent logged "
                         "in these runs are no longer in the logs; the evidence file keeps "
                         "their offenders")
    if summary.drops:
        lost = ", ".join(f"{k}={v}" for k, v in sorted(summary.drops.items()))
        notes.append(f"caution: the agent dropped events in this window ({lost}): "
                     "an offender may be missing")
    if since < timedelta(days=RECOMMENDED_DAYS):
        notes.append(f"caution: the window is {_ago(since)}; providers advise watching "
                     f"{RECOMMENDED_DAYS} days before enforcing hardened-only mode")
    return code, notes


def render_text(summary: Summary, since: timedelta, out=sys.stdout) -> int:
    code, notes = verdict(summary, since)
    total = sum(summary.levels.values())
    print(f"imds-tracer report: {summary.files} log file(s), window {_ago(since)}, "
          f"{total} request(s) from {_fmt(summary.first)} to {_fmt(summary.last)}", file=out)
    if summary.offenders:
        print("work list (most urgent first):", file=out)
        for n, o in enumerate(work_list(summary), 1):
            print(f"{n:>3}. {o.owner}  client={o.client}  reads={o.reads}  provider="
                  f"{o.provider}  requests={o.count} succeeded={o.succeeded}  "
                  f"{_fmt(o.first)} .. {_fmt(o.last)}", file=out)
            print(f"     fix: {o.fix}" + (f" [fallback={o.fallback}]" if o.fallback else ""),
                  file=out)
            detail = f"     argv: {o.argv}"
            if o.package:
                detail += f"  package: {o.package}"
            if o.user_agent:
                detail += f"  user-agent: {o.user_agent}"
            print(detail, file=out)
    levels = ", ".join(f"{k} {v}" for k, v in sorted(summary.levels.items())) or "none"
    print(f"requests by level: {levels}", file=out)
    for note in notes:
        print(note, file=out)
    return code


def render_json(summary: Summary, since: timedelta, out=sys.stdout) -> int:
    code, notes = verdict(summary, since)
    cov = summary.coverage or judge.Coverage(False)
    json.dump({
        "safe_to_enforce": code == judge.EXIT_SAFE,
        "verdict": judge.WORDS[code], "exit_code": code,
        "window_seconds": int(since.total_seconds()),
        "coverage": {"evidence_file": cov.evidence, "watched_seconds": int(cov.watched),
                     "gaps": [[_fmt(datetime.fromtimestamp(a, timezone.utc)),
                               _fmt(datetime.fromtimestamp(b, timezone.utc))]
                              for a, b in cov.gaps],
                     "agent_starts": cov.starts, "unclean_stops": cov.unclean,
                     "requests_logged": cov.records,
                     "lost": cov.lost},
        "unreadable_lines": summary.unreadable_lines,
        "first_seen": _fmt(summary.first), "last_seen": _fmt(summary.last),
        "requests_by_level": summary.levels,
        "normal_mode_requests": summary.normal_requests,
        "drops": summary.drops,
        "offenders": [{"owner": o.owner, "client": o.client, "advice": o.advice,
                       "fix": o.fix, "fallback": o.fallback, "reads": o.reads,
                       "executable": o.executable, "argv": o.argv, "container": o.container,
                       "package": o.package, "user_agent": o.user_agent,
                       "provider": o.provider, "count": o.count, "succeeded": o.succeeded,
                       "first_seen": _fmt(o.first), "last_seen": _fmt(o.last)}
                      for o in work_list(summary)],
        "notes": notes,
    }, out, indent=2)
    out.write("\n")
    return code
