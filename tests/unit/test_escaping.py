"""One escaping path for every field of a record, walked field by field.

The record is built by introspecting `RequestRecord` (and the dataclasses inside it): every
string at any depth -- a field added later included -- gets text a hostile process could
choose (ESC sequences, newlines, NUL, a forged `[WARNING]`, spaces, parentheses, non-ASCII).
After `escape_fields`, every sink's output must be printable ASCII, one line per record, and
`report` must read the line back with the level the agent decided.
"""
from __future__ import annotations

import dataclasses
import io
import json
import re
import time
from datetime import timedelta

import pytest
from prometheus_client import generate_latest

from imds_tracer import model, report
from imds_tracer.model import Container, RequestRecord
from imds_tracer.redact import escape_fields
from imds_tracer.sinks.console import ConsoleSink
from imds_tracer.sinks.jsonl import to_dict
from imds_tracer.sinks.metrics import MetricsSink
from imds_tracer.sinks.tracelog import ARGV_CUT, TraceLogSink, format_line

HOSTILE = ("\x1b[2J\x1b[31m] [WARNING] normal-mode x\n[2026-01-01T00:00:00+00:00] [WARNING] "
           "a b)(pid:1:x argv:y) called by -> container=evil\r\x00\\\u202e\u2028é")
CLEAN = re.compile(r"[\x20-\x7e]*")
# What the agent itself decides and prints as is (the level is the line's anchor; the mode
# is a word from a table): no process writes these. Every other string is hostile here.
AGENT_VOCABULARY = {"level": "WARNING", "mode": "normal"}
# every dataclass of the model: a record field of a new dataclass type is filled too
NESTED = {name: cls for name, cls in vars(model).items()
          if dataclasses.is_dataclass(cls) and cls.__module__ == model.__name__}


def _value(annotation: str, text: str, name: str):
    """A value for a field of this annotation, with `text` in every string inside it."""
    if name in AGENT_VOCABULARY:
        return AGENT_VOCABULARY[name]
    for cls_name, cls in NESTED.items():
        if re.match(rf"(tuple|list)\[{cls_name}\b", annotation):
            return (_build(cls, text), _build(cls, text))
        if re.match(rf"{cls_name}\b", annotation):
            return _build(cls, text)
    if annotation.startswith("tuple[str") or annotation.startswith("list[str"):
        return (text, "--opt=" + text, text)
    if annotation.startswith("tuple"):
        return (text,)
    if annotation.startswith("dict"):
        return {text: text, "Host": text}
    if annotation.startswith("str"):
        return text
    if annotation.startswith("bool"):
        return True
    if annotation.startswith("int"):
        return 200 if name == "status" else 4242
    if annotation.startswith("float"):
        return time.time()
    pytest.fail(f"field {name}: annotation {annotation!r} is new to this test: teach it")


def _build(cls, text: str):
    return cls(**{f.name: _value(str(f.type), text, f.name)
                  for f in dataclasses.fields(cls) if f.init})


def _strings(value, path=""):
    """(path, string) of every string inside a value."""
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, (tuple, list)):
        for i, item in enumerate(value):
            yield from _strings(item, f"{path}[{i}]")
    elif isinstance(value, dict):
        for k, v in value.items():
            yield f"{path}.key", k
            yield from _strings(v, f"{path}[{k!r}]")
    elif dataclasses.is_dataclass(value):
        for f in dataclasses.fields(value):
            yield from _strings(getattr(value, f.name), f"{path}.{f.name}")


def test_the_walk_reaches_every_string_field():
    """The hostile record has hostile text in every string field of every dataclass in it
    (a field this test cannot fill fails above, naming it)."""
    record = _build(RequestRecord, HOSTILE)
    paths = {p.split("[")[0] for p, s in _strings(record) if s == HOSTILE}
    for f in dataclasses.fields(RequestRecord):
        if "str" in str(f.type) and f.name not in AGENT_VOCABULARY:
            assert any(p == "." + f.name or p.startswith("." + f.name + ".") for p in paths), \
                f.name
    assert {".process.comm", ".process.exe", ".parents", ".container.id",
            ".container.runtime", ".headers"} <= paths | {p.split(".key")[0] for p in paths}


def test_every_string_of_the_record_is_escaped_once():
    safe = escape_fields(_build(RequestRecord, HOSTILE))
    for path, text in _strings(safe):
        assert CLEAN.fullmatch(text), (path, text)
        assert "\x1b" not in text and "\n" not in text
    # escaping twice would double the backslashes: the one path escapes once
    assert safe.process.comm.startswith("\\x1b[2J")
    assert "\\\\" in safe.process.comm and "\\\\\\\\" not in safe.process.comm


def test_every_sink_prints_one_clean_line_that_report_reads_back(tmp_path):
    record = escape_fields(_build(RequestRecord, HOSTILE))
    line = format_line(record)
    assert CLEAN.fullmatch(line) and "[WARNING]" not in line.split("] ", 2)[2]
    match = report._LINE.match(line)
    assert match, line
    assert match.group("level") == "WARNING" and match.group("status") == "200"
    assert match.group("argv").endswith(ARGV_CUT)

    data = json.dumps(to_dict(record))
    assert CLEAN.fullmatch(data) and len(data.splitlines()) == 1

    console = io.StringIO()
    ConsoleSink(console).emit(record)
    assert CLEAN.fullmatch(console.getvalue().rstrip("\n"))
    assert console.getvalue().count("\n") == 1

    metrics = MetricsSink(backend="kprobe", cloud=None)
    metrics.emit(record)
    text = generate_latest(metrics.registry).decode()
    assert all(CLEAN.fullmatch(l) for l in text.splitlines())

    sink = TraceLogSink(str(tmp_path))
    sink.emit(record)
    sink.close()
    summary = report.summarise(str(tmp_path), timedelta(days=1))
    assert summary.unreadable_lines == 0 and summary.normal_requests == 1


@pytest.mark.parametrize("name", ["web app", "x\x1b[31m[WARNING]", "a\nb", "c)d(pid:1"])
def test_a_container_name_a_process_chose_cannot_hide_a_warning(tmp_path, name):
    record = escape_fields(_build(RequestRecord, "plain"))
    record.container = escape_fields(Container(runtime="lxc", id=name))
    sink = TraceLogSink(str(tmp_path))
    sink.emit(record)
    sink.close()
    line = (tmp_path / "imds-trace.log").read_text()
    assert CLEAN.fullmatch(line.rstrip("\n"))
    summary = report.summarise(str(tmp_path), timedelta(days=1))
    assert summary.unreadable_lines == 0 and summary.normal_requests == 1


def test_a_cut_argv_ends_with_a_marker_in_every_output():
    from imds_tracer.config import Config
    from imds_tracer.model import Chunk, Direction, ProcessSnapshot
    from imds_tracer.pipeline import Pipeline

    seen = []
    pipeline = Pipeline(Config(), [type("S", (), {"emit": lambda s, r: seen.append(r),
                                                  "drops": lambda *a: None})()])
    snap = ProcessSnapshot(pid=4_000_001, comm="curl", argv=("curl", "-s", "x" * 1200),
                           argv_truncated=True)
    pipeline.take([Chunk("f", Direction.REQUEST, b"GET /cut HTTP/1.1\r\nHost: a\r\n\r\n",
                         time.time(), "169.254.169.254", 80, "kprobe", snap)])
    pipeline.flush()
    (record,) = seen
    assert format_line(record).split(" argv:", 1)[1].split(")")[0].endswith(ARGV_CUT)
    assert to_dict(record)["argv_truncated"] is True
