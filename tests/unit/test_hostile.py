"""Hostile input through the real pipeline and every sink (trace log, JSON lines, Prometheus
text, console): control characters, ANSI sequences, NUL, non-ASCII and forged log-line
fragments in paths, header names and values, comm and argv; multi-kilobyte heads; secrets.

What must hold: one request = one trace-log line (and one JSON object, one console line);
no raw control or non-ASCII character in any output; the level and process fields of a line
cannot be moved by what a process sent; heads are bounded; no token or Authorization value
appears anywhere.
"""
from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import time
from datetime import timedelta

import pytest
from prometheus_client import generate_latest

from imds_tracer import report
from imds_tracer.agent import Agent
from imds_tracer.config import Config
from imds_tracer.enrich import Enricher
from imds_tracer.http import MAX_HEAD
from imds_tracer.model import Chunk, Direction, FlowClosed, ProcessSnapshot
from imds_tracer.sinks.tracelog import _field
from imds_tracer.sinks.console import ConsoleSink

AWS, ALIYUN = "169.254.169.254", "100.100.100.200"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
# printable ASCII only, plus the newline that ends each line
CLEAN = re.compile(rb"[\x20-\x7e\n]*")
FORGED = b"\n[2026-11-23T11:52:49+00:00] [WARNING] normal-mode provider=aws GET /forged"

SECRETS = {
    "aws": "AQAEAHostileSecretTokenAWS0001aaaaaaaaaaaaaaaaaaaa==",
    "aws_upper": "AQAEAHostileSecretTokenAWS0002bbbbbbbbbbbbbbbbbbb==",
    "aws_nodelim": "AQAEAHostileSecretTokenAWS0003noequalsatallcccccccc",
    "aliyun": "AliyunHostileSecretToken0004dddddddddddddddddddddddd",
    "huawei": "HuaweiHostileSecretToken0005eeeeeeeeeeeeeeeeeeeeeeee",
    "bearer": "BearerHostileSecret0006ffffffffffffffffffffffffff",
    "basic": "QmFzaWNIb3N0aWxlU2VjcmV0MDAwNzpwYXNzd29yZA==",
    "proxy": "ProxyAuthHostileSecret0008gggggggggggggggggggg",
    "cookie": "CookieHostileSecret0009hhhhhhhhhhhhhhhhhhhhhhhh",
    "folded": "FoldedHostileSecret0010iiiiiiiiiiiiiiiiiiiiiiiii",
    "dup": "DuplicateHostileSecret0011jjjjjjjjjjjjjjjjjjjjj",
    "raw": "RawUnparsedHostileSecret0012kkkkkkkkkkkkkkkkkkkk",
    "raw_cr": "RawBareCrHostileSecret0013lllllllllllllllllllll",
    "truncated": "TruncatedHeadHostileSecret0014mmmmmmmmmmmmmmmmmmm",
}
S = {k: v.encode() for k, v in SECRETS.items()}


def _req(line: bytes, *headers: bytes, eol: bytes = b"\r\n") -> bytes:
    return eol.join([line, *headers]) + eol + eol


# (request bytes, dst, comm, argv)
HOSTILE = [
    # control characters, ANSI, NUL, lone CR, NEL and a forged line in the target
    (_req(b"GET /latest/meta-data/\x1b[31mred\x1b[0m\x00nul\x0bvt\x0cff\rcr\x85nel"
          b"\x7fdel\xe2\x80\xae HTTP/1.1", b"Host: " + AWS.encode()), AWS, "curl", ("curl",)),
    (_req(b"GET /latest/meta-data/a" + FORGED.replace(b"\n", b"\r") + b" HTTP/1.1"),
     AWS, "curl", ("curl",)),
    # header names and values with control characters and forged fragments
    (_req(b"GET /latest/meta-data/ HTTP/1.1", b"X-\x1b[2JEvil\x00Name: v",
          b"X-Evil: a\rb\x00c\x1b]0;title\x07d" + FORGED.replace(b"\n", b"\r"),
          b"X-Unicode: \xc3\xa9\xe2\x80\xa8\xf0\x9f\x92\xa5"), AWS, "python3", ("python3",)),
    # comm and argv that try to close the process field, add a parent, or break the line
    (_req(b"GET /latest/meta-data/iam/ HTTP/1.1"), AWS, "ev il:)(\n",
     ("/usr/bin/evil\n[2026-11-23T11:52:49+00:00] [WARNING] forged",
      "x) called by -> (pid:1:systemd argv:/sbin/init", "\x1b[31m\x00\u202e\u2028",
      " container=docker:0123")),
    # secrets: every credential header, odd cases, folded, duplicated
    (_req(b"GET /latest/meta-data/ HTTP/1.1", b"X-aws-ec2-metadata-token: " + S["aws"]),
     AWS, "aws", ("aws",)),
    (_req(b"GET /latest/meta-data/ HTTP/1.1", b"x-AWS-EC2-METADATA-TOKEN:" + S["aws_upper"]),
     AWS, "aws", ("aws",)),
    (_req(b"GET /latest/meta-data/ HTTP/1.1", b"X-aws-ec2-metadata-token: " + S["aws_nodelim"]),
     AWS, "aws", ("aws",)),
    (_req(b"GET /latest/meta-data/ HTTP/1.1",
          b"X-aliyun-ecs-metadata-token: " + S["aliyun"]), ALIYUN, "aliyun", ("aliyun",)),
    (_req(b"GET /openstack/latest/meta_data.json HTTP/1.1", b"X-Metadata-Token: " + S["huawei"]),
     AWS, "cloud-init", ("cloud-init",)),
    (_req(b"GET /opc/v2/instance/ HTTP/1.1", b"Authorization: Bearer " + S["bearer"]),
     AWS, "oci", ("oci",)),
    (_req(b"GET /latest/meta-data/ HTTP/1.1", b"Authorization: Basic " + S["basic"],
          b"Proxy-Authorization: Basic " + S["proxy"], b"Cookie: session=" + S["cookie"]),
     AWS, "curl", ("curl",)),
    (_req(b"GET /latest/meta-data/ HTTP/1.1", b"X-aws-ec2-metadata-token: first",
          b"\t" + S["folded"]), AWS, "curl", ("curl",)),
    (_req(b"GET /latest/meta-data/ HTTP/1.1", b"X-aws-ec2-metadata-token: " + S["dup"],
          b"x-aws-ec2-metadata-token: " + S["dup"]), AWS, "curl", ("curl",)),
    # not a request: the raw excerpt is kept, secrets blanked
    (b"XYZZY /nothing\r\nAuthorization: Bearer " + S["raw"] + b"\r\n\r\n", AWS, "nc", ("nc",)),
    (b"JUNK\rX-aws-ec2-metadata-token: " + S["raw_cr"] + b"\r\r\n\r\n", AWS, "nc", ("nc",)),
    # multi-kilobyte heads: long header, many headers, long target
    (_req(b"GET /latest/meta-data/ HTTP/1.1", b"X-Long: " + b"\x1b" * 12000),
     AWS, "curl", ("curl",)),
    (_req(b"GET /latest/meta-data/ HTTP/1.1",
          *[b"X-H%d: \x00\x00\x00\x00" % i for i in range(400)]), AWS, "curl", ("curl",)),
    (_req(b"GET /latest/" + b"\x00" * 20000 + b" HTTP/1.1"), AWS, "curl", ("curl",)),
]
# a head that never ends (bigger than MAX_HEAD): logged truncated, its secret still hidden
ENDLESS = (b"GET /latest/meta-data/ HTTP/1.1\r\nX-aws-ec2-metadata-token: " + S["truncated"]
           + b"\r\n" + b"X-Pad: " + b"\x01" * (MAX_HEAD + 4000))


class Outputs:
    def __init__(self, tmp):
        self.log_dir = tmp / "logs"
        self.json = tmp / "out.jsonl"
        self.console = io.StringIO()
        config = Config(log_dir=str(self.log_dir), json=str(self.json), metrics_addr=None,
                        console=False)
        agent = Agent(config, backend="tracepoint", metrics=True, enrich=Enricher())
        self.pipeline, self.metrics = agent.pipeline, agent.metrics
        self.pipeline.sinks.append(ConsoleSink(self.console))

    def feed(self, flow, data, dst, process, ts, response=True):
        items = [Chunk(flow, Direction.REQUEST, data, ts, dst, 80, "tracepoint", process=process)]
        if response:
            items.append(Chunk(flow, Direction.RESPONSE, OK, ts, dst, 80, "tracepoint"))
        self.pipeline.take(items + [FlowClosed(flow, ts)])

    def finish(self):
        self.pipeline.flush(time.time())
        self.pipeline.close()
        log = b"".join(p.read_bytes() for p in sorted(self.log_dir.glob("imds-trace.log*")))
        return {"log": log, "json": self.json.read_bytes(),
                "console": self.console.getvalue().encode("utf-8"),
                "metrics": generate_latest(self.metrics.registry)}


@pytest.fixture
def hostile_process():
    """A live process whose argv (read from /proc by the enricher) is hostile."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                             "\n[2026-11-23T11:52:49+00:00] [WARNING] forged",
                             "\x1b[2J\x1b[31mred", "a) called by -> (pid:1:x argv:y",
                             "\u202eevil\u2028"])
    deadline = time.monotonic() + 10
    while b"forged" not in open(f"/proc/{proc.pid}/cmdline", "rb").read():
        assert time.monotonic() < deadline, "child did not exec"
        time.sleep(0.01)
    yield proc
    proc.kill()
    proc.wait()


@pytest.fixture
def outputs(tmp_path, hostile_process):
    out = Outputs(tmp_path)
    now = time.time()
    for i, (data, dst, comm, argv) in enumerate(HOSTILE):
        # pids that do not exist: the kernel's comm and argv are what gets printed
        snap = ProcessSnapshot(pid=4_000_000 + i, comm=comm, argv=argv, ppid=None)
        out.feed(i, data, dst, snap, now + i)
    with open(f"/proc/{hostile_process.pid}/comm") as fh:
        comm = fh.read().strip()
    live = ProcessSnapshot(pid=hostile_process.pid, comm=comm, ppid=os.getpid())
    out.feed("live", _req(b"GET /latest/meta-data/ HTTP/1.1"), AWS, live, now + 100)
    out.feed("endless", ENDLESS, AWS, ProcessSnapshot(pid=4_100_000, comm="curl"), now + 101,
             response=False)
    out.expected = len(HOSTILE) + 2
    out.result = out.finish()
    return out


def _request_lines(log: bytes) -> list[bytes]:
    return [line for line in log.split(b"\n") if line and b"] agent dropped " not in line]


def test_every_output_is_printable_ascii_lines(outputs):
    for name, data in outputs.result.items():
        bad = CLEAN.fullmatch(data) is None
        assert not bad, (name, [hex(b) for b in data if b < 0x20 and b != 10 or b > 0x7e][:10])


def test_one_request_is_one_line_everywhere(outputs):
    result = outputs.result
    assert outputs.pipeline.requests == outputs.expected
    lines = _request_lines(result["log"])
    assert len(lines) == outputs.expected
    assert len(result["console"].decode().splitlines()) == outputs.expected
    records = [json.loads(line) for line in result["json"].decode().splitlines()]
    assert len(records) == outputs.expected
    # str.splitlines splits on more than \n (\x85, \u2028...): none of those got through
    assert len(result["log"].decode().splitlines()) == len(result["log"].split(b"\n")) - 1


def test_level_and_process_fields_cannot_be_forged(outputs):
    """Each trace-log line parses as one request, with the level, pid, argv and container the
    pipeline decided (the JSON object of the same request says which), however much of a
    log line the process put into its path, headers or argv."""
    lines = _request_lines(outputs.result["log"])
    records = [json.loads(line) for line in outputs.result["json"].decode().splitlines()]
    for line, record in zip(lines, records):
        match = report._LINE.match(line.decode())
        assert match, line[:300]
        assert match.group("level") == record["level"]
        assert match.group("pid") == str(record["pid"])
        assert match.group("container") == "-"
        if record["argv"]:
            # the argv field ends where the agent ended it: ")" inside argv is escaped
            assert match.group("argv") == " ".join(_field(a, ")") for a in record["argv"])
        # the level field is the second bracket group, right after the time
        assert re.match(rb"^\[[^\]]*\] \[(INFO|WARNING|ERROR)\] ", line)
    levels = [r["level"] for r in records]
    assert levels.count("WARNING") == sum(1 for r in records if r["mode"] == "normal")
    anchored = [line for line in lines if re.match(rb"^\[[^\]]*\] \[WARNING\] ", line)]
    assert len(anchored) == levels.count("WARNING")


def test_report_counts_exactly_the_normal_mode_requests(outputs):
    records = [json.loads(line) for line in outputs.result["json"].decode().splitlines()]
    summary = report.summarise(str(outputs.log_dir), timedelta(days=1))
    assert summary.unreadable_lines == 0
    assert summary.normal_requests == sum(1 for r in records if r["mode"] == "normal")


def test_hostile_argv_read_from_proc_is_escaped(outputs, hostile_process):
    records = [json.loads(line) for line in outputs.result["json"].decode().splitlines()]
    live = [r for r in records if r["pid"] == hostile_process.pid]
    assert len(live) == 1
    argv = live[0]["argv"]
    # shown by the redaction rule (a word survives, the rest is <redacted>), then escaped
    assert argv[3].endswith(" forged") and "[WARNING]" not in argv[3]
    assert argv[4] == "<redacted>" and argv[6] == "<redacted>"


def test_no_secret_in_any_output(outputs):
    for name, data in outputs.result.items():
        for key, secret in SECRETS.items():
            # also a recognisable part of it, in case a value was cut rather than hidden
            for needle in (secret, secret[8:32]):
                assert needle.encode() not in data, f"{key} secret in {name} output"


def test_heads_are_bounded(outputs):
    for line in _request_lines(outputs.result["log"]):
        assert len(line) < 24 * 1024
    for line in outputs.result["json"].split(b"\n"):
        # a head is cut at MAX_HEAD bytes; escaping at most quadruples it, JSON adds "\\"
        assert len(line) < 6 * MAX_HEAD + 8192
    records = [json.loads(line) for line in outputs.result["json"].decode().splitlines()]
    assert any(r["truncated"] for r in records)  # the endless head
    many = [r for r in records if "X-H0" in r["headers"]]
    assert many and len(many[0]["headers"]) <= 100
