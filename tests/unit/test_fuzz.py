"""Property tests (hypothesis): the parser, reassembly and the pcap reader never crash and
stay bounded, and reassembly is independent of how a byte stream was cut and delivered."""
from __future__ import annotations

import os
import random
import re
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from imds_tracer import http
from imds_tracer.agent import Agent
from imds_tracer.config import Config
from imds_tracer.flows import MAX_OUT_OF_ORDER, FlowTable
from imds_tracer.model import Chunk, Direction, Exchange, RequestHead
from imds_tracer.redact import SHOWN_HEADERS, escape, redact_raw
from imds_tracer.sinks.tracelog import format_line
from imds_tracer.sources.base import SourceError

DATA = Path(__file__).resolve().parents[1] / "data"
SCALE = int(os.environ.get("IMDS_FUZZ_SCALE", "1"))  # e.g. 50 for a long soak run
FAST = settings(max_examples=300 * SCALE, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SLOW = settings(max_examples=60 * SCALE, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
PRINTABLE = re.compile(r"[\x20-\x7e]*")

# bytes that look like HTTP more often than uniform noise does
http_ish = st.lists(st.sampled_from([
    b"GET ", b"PUT ", b"HEAD ", b"POST ", b"HTTP/1.1", b"HTTP/1.0 200 OK", b"\r\n", b"\n",
    b"\r\n\r\n", b": ", b":", b" ", b"\t", b"Content-Length: ", b"Transfer-Encoding: chunked",
    b"X-aws-ec2-metadata-token: ", b"Authorization: ", b"/latest/meta-data/", b"\x00",
    b"\x1b[31m", b"\xff\xfe", b"0", b"12", b"99999999999999999999", b"a" * 300,
]) | st.binary(max_size=40), max_size=60).map(b"".join)
any_bytes = st.binary(max_size=3000) | http_ish


# -- HTTP parser -------------------------------------------------------------------------
@FAST
@given(any_bytes)
def test_parser_never_raises_and_is_bounded(data):
    head = http.parse_request_head(data)
    if head is not None:
        assert isinstance(head, RequestHead)
        assert head.method.encode() in http.METHODS
        assert len(head.target) <= http.MAX_FIELD
        assert len(head.version) <= 16
        assert len(head.headers) <= http.MAX_HEADERS
        for name, value in head.headers:
            assert len(name) <= http.MAX_FIELD and len(value) <= http.MAX_FIELD
            assert "\n" not in name and "\n" not in value
    end = http.head_end(data)
    assert end == -1 or 0 < end <= len(data)
    http.could_start_request(data)
    http.could_start_response(data)
    status = http.parse_status(data)
    assert status is None or 100 <= status <= 999
    length = http.content_length(data)
    assert length is None or 0 <= length < 10 ** 16
    assert http.is_chunked(data) in (True, False)


@FAST
@given(any_bytes)
def test_quick_paths_agree_with_the_line_scan(data):
    """content_length/is_chunked answer early when the header name is absent: the answer must
    be the one the full line scan gives."""
    def scan(name):
        for line in http._lines(data)[1:http.MAX_HEADERS + 1]:
            key, sep, value = line.partition(b":")
            if sep and key.strip().lower() == name:
                return value
        return None
    value = scan(b"content-length")
    if value is None:
        assert http.content_length(data) is None
    chunked = scan(b"transfer-encoding")
    assert http.is_chunked(data) == (chunked is not None and b"chunked" in chunked.lower())


def _reference_parse(data: bytes):
    """The parser's definition, on bytes (the parser itself works on latin-1 text, where
    str.strip() would also strip \\x1c-\\x1f, \\x85 and \\xa0: it must not)."""
    lines = [ln[:-1] if ln.endswith(b"\r") else ln for ln in data[:http.MAX_HEAD].split(b"\n")]
    first = [p for p in lines[0].split(b" ") if p]
    if len(first) < 2 or first[0] not in http.METHODS:
        return None
    if len(first) >= 3 and first[-1].startswith(b"HTTP/"):
        version, target = first[-1], b" ".join(first[1:-1])
    else:
        version, target = b"", b" ".join(first[1:])
    def text(raw: bytes) -> str:
        return raw[:http.MAX_FIELD].decode("latin-1")

    headers = []
    for line in lines[1:]:
        if not line:
            break
        if line[:1] in (b" ", b"\t") and headers:
            name, value = headers[-1]
            headers[-1] = (name, (value + " " + text(line.strip()))[:http.MAX_FIELD])
            continue
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip():
            continue
        headers.append((text(name), text(value.strip(b" \t"))))
        if len(headers) >= http.MAX_HEADERS:
            break
    return (first[0].decode(), text(target), version[:16].decode("latin-1"), tuple(headers))


@FAST
@given(any_bytes | st.lists(st.sampled_from([b"GET / HTTP/1.1", b"\r\n", b"\n", b"A:", b" ",
                                             b"\x85", b"\xa0", b"\x1c", b"\x0b", b"\t", b"b"]),
                            max_size=40).map(b"".join))
@example(b"GET / HTTP/1.1\r\n\x85A: b\r\nB\xa0: c\r\n\x1c folded\xa0\r\nC: \x85d\xa0\r\n\r\n")
def test_parser_matches_its_byte_definition(data):
    head = http.parse_request_head(data)
    got = head and (head.method, head.target, head.version, head.headers)
    assert got == _reference_parse(data)
    if head is not None:
        for name, value in head.headers:
            assert head.header(name.upper()) == next(v for n, v in head.headers
                                                     if n.lower() == name.lower())


# -- escaping ----------------------------------------------------------------------------
def _reference_escape(text: str, extra: str = "") -> str:
    out = []
    for ch in text:
        code = ord(ch)
        if ch == "\\":
            out.append("\\\\")
        elif code < 0x20 or code > 0x7e or ch in extra:
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
        else:
            out.append(ch)
    return "".join(out)


@FAST
@given(st.text(max_size=200), st.sampled_from(["", " ", ")", " ():", "]"]))
def test_escape_is_printable_and_matches_its_definition(text, extra):
    out = escape(text, extra)
    assert PRINTABLE.fullmatch(out)
    assert not any(ch in out for ch in extra if ch not in "\\x0123456789abcdefu")
    assert out == _reference_escape(text, extra)


@FAST
@given(any_bytes, st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghij0123456789+/=",
                          min_size=20, max_size=60),
       st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz-", min_size=1,
               max_size=30).filter(lambda n: n.lower() not in SHOWN_HEADERS))
def test_redact_raw_hides_header_values_and_control_characters(junk, token, name):
    # any header name but the few shown ones: the rule, not a list of secret names
    data = junk + f"\r\n{name}: ".encode() + token.encode() + b"\r\n" + junk
    out = escape(redact_raw(data))
    assert PRINTABLE.fullmatch(out)
    assume(token not in _reference_escape(junk.decode("latin-1")))
    assert token not in out


# -- reassembly --------------------------------------------------------------------------
token = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-._~%/", min_size=1, max_size=40)
header = st.tuples(st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz-",
                           min_size=1, max_size=30).filter(
                               lambda n: n.lower() not in ("content-length",
                                                           "transfer-encoding")),
                   st.text(alphabet=" !#$%&'()*+,-./0123456789;<=>?@ABCXYZabcxyz[]^_`{|}~",
                           max_size=60).map(str.strip))


@st.composite
def request(draw) -> bytes:
    method = draw(st.sampled_from(["GET", "PUT", "POST", "HEAD", "DELETE"]))
    target = "/" + draw(token)
    headers = draw(st.lists(header, max_size=8))
    body = draw(st.binary(max_size=80)) if method in ("PUT", "POST") else b""
    eol = draw(st.sampled_from(["\r\n", "\n"]))
    lines = [f"{method} {target} HTTP/1.1"] + [f"{n}: {v}" for n, v in headers]
    if body or draw(st.booleans()):
        lines.append(f"Content-Length: {len(body)}")
    return (eol.join(lines) + eol + eol).encode("latin-1") + body


def expected_heads(requests: list[bytes]) -> list[RequestHead]:
    return [http.parse_request_head(r[:http.head_end(r)]) for r in requests]


def reassemble(chunks: list[Chunk]) -> list:
    table = FlowTable()
    done = [item for chunk in chunks for item in table.feed(chunk)] + list(table.flush())
    out = [item for item in done if isinstance(item, Exchange)]
    assert len(out) == len(done), done   # nothing dropped
    assert not any(e.truncated for e in out)
    return [e.head for e in out]


def cuts(draw, size: int, most: int) -> list[int]:
    points = draw(st.lists(st.integers(1, max(1, size - 1)), max_size=most))
    return sorted({p for p in points if 0 < p < size} | {0, size})


@SLOW
@given(st.lists(request(), min_size=1, max_size=6), st.data())
def test_sends_split_anywhere_yield_the_same_requests(requests, data):
    """Kernel sources: one connection's sends, in order, cut at arbitrary places."""
    stream = b"".join(requests)
    points = cuts(data.draw, len(stream), 30)
    chunks = [Chunk(1, Direction.REQUEST, stream[a:b], float(i), "169.254.169.254", 80, "test")
              for i, (a, b) in enumerate(zip(points, points[1:]))]
    assert reassemble(chunks) == expected_heads(requests)


@SLOW
@given(st.lists(request(), min_size=1, max_size=6), st.data(),
       st.integers(0, 2 ** 32 - 1))
def test_segments_reordered_and_duplicated_yield_the_same_requests(requests, data, isn):
    """Captures: TCP segments cut anywhere, delivered out of order, some more than once,
    some overlapping; sequence numbers may wrap."""
    stream = b"".join(requests)
    points = cuts(data.draw, len(stream), MAX_OUT_OF_ORDER // 2 - 2)
    segments = [(isn + a + 1) % 2 ** 32 for a in points[:-1]]
    pieces = [(seq, stream[a:b]) for seq, a, b in zip(segments, points, points[1:])]
    dups = data.draw(st.lists(st.sampled_from(pieces), max_size=6))
    # overlapping retransmissions: a piece extended into the next one
    overlaps = []
    for i in data.draw(st.lists(st.integers(0, len(points) - 2), max_size=3)):
        a, b = points[i], min(len(stream), points[i + 1] + 7)
        overlaps.append(((isn + a + 1) % 2 ** 32, stream[a:b]))
    order = pieces + dups + overlaps
    random.Random(data.draw(st.integers(0, 2 ** 31))).shuffle(order)
    syn = Chunk(1, Direction.REQUEST, b"", 0.0, "169.254.169.254", 80, "test",
                seq=(isn + 1) % 2 ** 32)
    chunks = [syn] + [Chunk(1, Direction.REQUEST, payload, float(i), "169.254.169.254", 80,
                            "test", seq=seq) for i, (seq, payload) in enumerate(order)]
    assert reassemble(chunks) == expected_heads(requests)


@FAST
@given(st.lists(st.tuples(st.booleans(), any_bytes, st.integers(0, 3000),
                          st.integers(0, 40)), max_size=25))
def test_flow_table_survives_anything_and_holds_little(feeds):
    """Random bytes in both directions, with losses and several connections: no exception,
    every request head bounded, buffers bounded."""
    done = []
    table = FlowTable(max_flows=4)
    for i, (is_request, payload, lost, flow) in enumerate(feeds):
        done += table.feed(Chunk(flow % 6, Direction.REQUEST if is_request
                                 else Direction.RESPONSE, payload, float(i),
                                 "169.254.169.254", 80, "test", lost=lost % 7))
        done += table.tick(float(i))
        assert len(table) <= 4
        for _key, f in table._flows.items():
            assert len(f.request.buf) <= http.MAX_HEAD + 3000
            assert len(f.response.buf) <= http.MAX_HEAD + 3000
    done += table.flush()
    for exchange in (item for item in done if isinstance(item, Exchange)):
        assert len(exchange.raw) <= 256
        if exchange.head is not None:
            assert len(exchange.head.headers) <= http.MAX_HEADERS


# -- pcap reader -------------------------------------------------------------------------
class _Lines:
    """A sink that formats every record, as the trace log does."""

    def __init__(self):
        self.lines = []

    def emit(self, record):
        self.lines.append(format_line(record))

    def drops(self, counts, ts):
        pass

    def reopen(self):
        pass

    def close(self):
        pass


SEEDS = sorted(p.read_bytes() for p in DATA.glob("*.pcap*"))


def _replay_bytes(blob: bytes):
    sink = _Lines()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "x.pcap")
        with open(path, "wb") as fh:
            fh.write(blob)
        agent = Agent(Config(log_dir=tmp, cloud="none"))
        pipeline = agent.pipeline
        pipeline.sinks.append(sink)
        try:
            agent.replay_file(path)
        except SourceError as exc:
            assert "\n" not in str(exc)
        pipeline.flush()
        agent.close()
    assert pipeline.requests <= max(1, agent.replayed_packets) * 2
    for line in sink.lines:
        assert PRINTABLE.fullmatch(line), line
        assert len(line) < 40_000
    return agent, sink


@SLOW
@given(st.sampled_from(SEEDS), st.lists(st.tuples(st.integers(0, 10 ** 6), st.integers(0, 255)),
                                        min_size=1, max_size=20), st.integers(0, 10 ** 6))
def test_pcap_reader_survives_mutated_captures(seed, flips, cut):
    blob = bytearray(seed)
    for pos, value in flips:
        blob[pos % len(blob)] = value
    if cut % 3 == 0:
        blob = blob[:cut % len(blob)]
    _replay_bytes(bytes(blob))


@SLOW
@given(st.binary(max_size=4000))
def test_pcap_reader_survives_random_bytes(blob):
    _replay_bytes(blob)


@SLOW
@given(st.binary(max_size=2000))
def test_pcap_reader_survives_random_records_after_a_valid_header(body):
    # pcap header (Ethernet) followed by noise: records with random lengths and contents
    header = bytes.fromhex("d4c3b2a1020004000000000000000000ffff000001000000")
    _replay_bytes(header + body)


def test_seed_captures_still_replay():
    for seed in SEEDS:
        agent, _sink = _replay_bytes(seed)
        assert agent.replayed_packets > 0
