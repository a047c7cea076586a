"""Per-connection reassembly: chunks in, `Exchange`s (request head + response status) out.

A connection may carry several requests (keep-alive); one request may arrive in several
chunks (several send() calls, several TCP segments, retransmitted or out of order when the
source is a capture). Request bodies and response bodies are skipped by their length.
Memory is bounded: at most `max_flows` connections (a `ConnTable`: the least recently used
is finished and counted as "flow_table_full" to make room), MAX_HEAD bytes buffered per
direction, MAX_OUT_OF_ORDER segments held per direction.

Data flows one way: every method returns what it completed, in order: `Exchange`s to log
and `Dropped` counts; the pipeline handles them.

Nothing lost blinds a connection: bytes that never come (a segment missing from a capture, a
packet the kernel could not hand over) are given up on when more than MAX_OUT_OF_ORDER
segments wait behind them, when they are GAP_WAIT seconds late, or when the connection ends;
the stream then resumes at the next request (or response) line, the request cut by the gap is
logged as truncated and the gap counted ("stream_gap"). A head is judged when it is complete:
at its blank line, when the connection closes, or when the connection has been idle
`flow_idle` seconds; a client pausing inside its head is waited for.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Hashable, List, Sequence, Union

from . import http
from .conntable import ConnTable
from .model import Chunk, Direction, Dropped, Exchange, ProcessSnapshot

Finished = Sequence[Union[Exchange, Dropped]]   # what a FlowTable call completed, in order

MAX_OUT_OF_ORDER = 64
GAP_WAIT = 2.0        # seconds a hole in a stream is waited for before it is skipped
MAX_PENDING = 64      # requests awaiting a response on one connection
SEQ_MOD = 1 << 32


@dataclass
class _Stream:
    """One direction of a connection."""
    buf: bytearray = field(default_factory=bytearray)
    skip: int = 0                  # body bytes still to pass over
    chunked: bool = False          # passing over a chunked body: wait for its last chunk
    resync: bool = False           # lost our place: wait for the next message start
    next_seq: int | None = None
    held: dict = field(default_factory=dict)  # seq -> (bytes, lost), segments that came early
    held_since: float = 0.0        # when the oldest of them came
    gap: bool = False              # bytes given up on: the responses waited for are unsure
    started: float = 0.0           # time of the first chunk of the message being buffered


@dataclass
class _Flow:
    dst_ip: str
    dst_port: int
    source: str
    process: ProcessSnapshot | None
    last_seen: float
    request: _Stream = field(default_factory=_Stream)
    response: _Stream = field(default_factory=_Stream)
    pending: deque = field(default_factory=deque)  # [Exchange, emitted?, head complete at]


GAVE_UP_AFTER = 0.2  # seconds between a request and the client's FIN that mean "timed out"


class FlowTable:
    """Reassembles chunks. Each call returns what it finished (`Finished`): exchanges to log
    and drops to count, in the order they happened."""

    def __init__(self, *, response_wait: float = 2.0, flow_idle: float = 300.0,
                 max_flows: int = 65536):
        self.response_wait = response_wait
        self.flow_idle = flow_idle
        self._flows: ConnTable[_Flow] = ConnTable(max_flows)
        self._out: List[Union[Exchange, Dropped]] = []

    def __len__(self) -> int:
        return len(self._flows)

    def _emit(self, exchange: Exchange) -> None:
        self._out.append(exchange)

    def _drop(self, kind: str) -> None:
        self._out.append(Dropped(kind, 1))

    def _finished(self) -> Finished:
        out = self._out
        if not out:
            return ()
        self._out = []
        return out

    # -- input -------------------------------------------------------------------------
    def feed(self, chunk: Chunk) -> Finished:
        key = chunk.flow
        flow = self._flows.get(key)
        if flow is None:
            if not chunk.data and not chunk.lost and chunk.seq is None:
                return ()
            flow = self._open(chunk)
        else:
            flow.last_seen = chunk.ts
            if chunk.process is not None and chunk.direction is Direction.REQUEST:
                flow.process = chunk.process  # a forked child may share the connection
        if chunk.direction is Direction.REQUEST:
            stream, consume = flow.request, self._consume_request
        else:
            stream, consume = flow.response, self._consume_response
        if chunk.seq is None:  # a kernel source: the bytes come in order, once
            consume(flow, key, stream, chunk.data, chunk.lost, chunk.ts)
        else:
            for data, lost in self._in_order(stream, chunk):
                consume(flow, key, stream, data, lost, chunk.ts)
        return self._finished()

    def _skip_gaps(self, flow: _Flow, key, ts: float, now: float | None = None) -> None:
        """Give up on the bytes missing before held segments (all of them, or those waited
        for GAP_WAIT seconds by `now`) and go on with what follows."""
        for stream, consume in ((flow.request, self._consume_request),
                                (flow.response, self._consume_response)):
            while stream.held and (now is None or now - stream.held_since >= GAP_WAIT):
                for data, lost in self._skip_gap(stream):
                    consume(flow, key, stream, data, lost, ts)

    def close(self, key: Hashable, ts: float) -> Finished:
        """The connection ended: whatever it still holds is logged now."""
        flow = self._flows.pop(key)
        if flow is not None:
            self._finish(key, flow)
        return self._finished()

    def client_gave_up(self, key: Hashable, ts: float) -> Finished:
        """The client closed its side (FIN) while requests wait for an answer: one it waited
        GAVE_UP_AFTER for is logged now as unanswered (the client timed out; what it does
        next, e.g. a token-less fallback, must come after it in the log). A response that
        still comes is counted like one after `response_wait`. A client half-closing right
        after sending (shutdown(SHUT_WR)) keeps waiting for its answer."""
        flow = self._flows.get(key)
        if flow is None:
            return ()
        for entry in flow.pending:
            if not entry[1] and ts - entry[0].ts >= GAVE_UP_AFTER:
                entry[1] = True
                self._emit(entry[0])
        return self._finished()

    def tick(self, now: float) -> Finished:
        """Log requests whose response did not come in time; skip holes waited for long
        enough; forget idle connections (logging a head they left unfinished)."""
        idle = []
        for key, flow in self._flows.items():
            if now - flow.last_seen >= self.flow_idle:
                idle.append(key)
                continue
            if flow.request.held or flow.response.held:
                self._skip_gaps(flow, key, now, now)
            for entry in flow.pending:
                if not entry[1] and now - entry[2] >= self.response_wait:
                    entry[1] = True
                    self._emit(entry[0])
        for key in idle:
            self._finish(key, self._flows.pop(key))
        return self._finished()

    def flush(self) -> Finished:
        """End of input: log everything still held."""
        for key in self._flows.keys():
            self._finish(key, self._flows.pop(key))
        return self._finished()

    # -- internals ---------------------------------------------------------------------
    def _open(self, chunk: Chunk) -> _Flow:
        flow = _Flow(chunk.dst_ip, chunk.dst_port, chunk.source, chunk.process, chunk.ts)
        evicted = self._flows.put(chunk.flow, flow)
        if evicted is not None:
            self._drop("flow_table_full")
            self._finish(*evicted)
        return flow

    def _in_order(self, stream: _Stream, chunk: Chunk):
        """Yield (data, lost) in stream order: duplicates trimmed, early segments held (a
        capture: chunks with a TCP sequence number)."""
        if stream.next_seq is None:
            stream.next_seq = chunk.seq  # the first byte, or SYN + 1 from an empty chunk
        # a segment covers its captured bytes and the `lost` ones after them (cut by the snap
        # length or by the kernel's copy limit): both advance the stream
        if not chunk.data and not chunk.lost:
            return
        offset = (stream.next_seq - chunk.seq) % SEQ_MOD
        if offset >= SEQ_MOD // 2:  # starts after what we expect: hold it
            if not stream.held:
                stream.held_since = chunk.ts
            stream.held[chunk.seq] = (chunk.data, chunk.lost)
            if len(stream.held) > MAX_OUT_OF_ORDER:
                yield from self._skip_gap(stream)  # too much waits behind the hole
            return
        if offset >= len(chunk.data) + chunk.lost:
            return  # a retransmission of bytes we have
        yield self._advance(stream, chunk.data, chunk.lost, offset)
        yield from self._release(stream)

    def _skip_gap(self, stream: _Stream):
        """The bytes before the nearest held segment are not coming: yield them as lost (the
        consumers resync after them), then what the held segments make whole."""
        seq = min(stream.held, key=lambda s: (s - stream.next_seq) % SEQ_MOD)
        gap = (seq - stream.next_seq) % SEQ_MOD
        self._drop("stream_gap")
        stream.next_seq = seq
        stream.gap = True
        yield b"", gap
        yield from self._release(stream)

    def _release(self, stream: _Stream):
        """Held segments that now continue the stream, in order."""
        while stream.held:
            progressed = False
            for seq in list(stream.held):
                offset = (stream.next_seq - seq) % SEQ_MOD
                if offset >= SEQ_MOD // 2:
                    continue
                data, lost = stream.held.pop(seq)
                progressed = True
                if offset < len(data) + lost:
                    yield self._advance(stream, data, lost, offset)
            if not progressed:
                break

    @staticmethod
    def _advance(stream: _Stream, data: bytes, lost: int, offset: int) -> tuple[bytes, int]:
        """The part of a segment past `offset` bytes already seen; moves next_seq past it."""
        if offset < len(data):
            data = data[offset:]
        else:
            lost -= offset - len(data)
            data = b""
        stream.next_seq = (stream.next_seq + len(data) + lost) % SEQ_MOD
        return data, lost

    def _consume_request(self, flow: _Flow, key, stream: _Stream, data: bytes, lost: int,
                         ts: float) -> None:
        """`data`, then `lost` bytes that were not captured (cut by a copy limit, or a hole)."""
        if stream.skip:
            data, lost = self._skip_body(stream, data, lost)
            if data is None:
                return
        if stream.resync:
            at = http.request_start(data)
            if at < 0:
                return
            data = data[at:]
            stream.resync = False
        if not stream.buf:
            stream.started = ts
        stream.buf += data
        self._request_heads(flow, key, stream, ts)
        if lost:
            cut = self._cut(stream, lost)
            if cut:   # the head being buffered: what was captured of it
                self._head(flow, key, cut, stream.started, truncated=True)

    def _request_heads(self, flow: _Flow, key, stream: _Stream, ts: float) -> None:
        """Every complete request head in the buffer (bodies passed over by their length)."""
        while stream.buf and not stream.skip:
            buf = stream.buf
            if not http.could_start_request(buf):
                self._head(flow, key, bytes(buf[:256]), stream.started, unparsed=True)
                buf.clear()
                stream.resync = True
                return
            end = http.head_end(buf)
            if end < 0:
                if len(buf) > http.MAX_HEAD:
                    self._head(flow, key, bytes(buf), stream.started, truncated=True)
                    buf.clear()
                    stream.resync = True
                return
            head = bytes(buf[:end])
            self._head(flow, key, head, stream.started, done=ts)
            del buf[:end]
            stream.started = ts
            body, chunked = http.body_framing(head)
            if chunked:
                stream.resync = True  # rare for metadata clients: find the next request
                buf.clear()
                return
            body = body or 0
            taken = min(body, len(buf))
            del buf[:taken]
            stream.skip = body - taken

    def _consume_response(self, flow: _Flow, key, stream: _Stream, data: bytes, lost: int,
                          ts: float) -> None:
        if stream.gap:
            # responses were lost, how many is unknown: the requests waiting are logged with
            # no status rather than each with the status of another
            stream.gap = False
            for entry in flow.pending:
                if not entry[1]:
                    entry[1] = True
                    self._emit(entry[0])
            flow.pending.clear()
        if stream.skip:
            data, lost = self._skip_body(stream, data, lost)
            if data is None:
                return
        if stream.resync or stream.chunked:
            at = http.response_start(data)
            if at < 0:
                if stream.chunked and data.endswith(b"0\r\n\r\n"):
                    stream.chunked = False
                return
            data = data[at:]
            stream.resync = stream.chunked = False
        stream.buf += data
        self._response_heads(flow, stream)
        if lost:
            cut = self._cut(stream, lost)
            if cut:   # the status line is all we need; the rest was not captured
                self._status(flow, http.parse_status(cut))

    def _response_heads(self, flow: _Flow, stream: _Stream) -> None:
        """Every complete response head in the buffer, each given to the request it answers."""
        while stream.buf and not stream.skip and not stream.chunked:
            buf = stream.buf
            if not http.could_start_response(buf):
                buf.clear()
                stream.resync = True
                return
            end = http.head_end(buf)
            if end < 0:
                if len(buf) > http.MAX_HEAD:
                    self._status(flow, http.parse_status(bytes(buf)))
                    buf.clear()
                    stream.resync = True
                return
            head = bytes(buf[:end])
            del buf[:end]
            status = http.parse_status(head)
            head_request = self._status(flow, status)
            if status is not None and (100 <= status < 200 or status in (204, 304)):
                continue
            if head_request:
                continue
            body, chunked = http.body_framing(head)
            if chunked:
                stream.chunked = not bytes(buf).endswith(b"0\r\n\r\n")
                buf.clear()
                return
            if body is None:
                buf.clear()
                stream.resync = True  # body runs to close, or we cannot tell: next "HTTP/"
                return
            taken = min(body, len(buf))
            del buf[:taken]
            stream.skip = body - taken

    @classmethod
    def _skip_body(cls, stream: _Stream, data: bytes, lost: int):
        """Pass over the rest of a body (stream.skip > 0). Returns the bytes after it (None
        when there are none) and how many uncaptured bytes follow those."""
        if stream.skip < len(data):
            data = data[stream.skip:]
            stream.skip = 0
            return data, lost
        stream.skip -= len(data)
        if lost:
            cls._cut(stream, lost)   # the body ended inside them: the next start is gone
        return None, 0

    @staticmethod
    def _cut(stream: _Stream, lost: int) -> bytes:
        """`lost` uncaptured bytes follow what was consumed. Inside a body they are passed
        over; otherwise the message being buffered is cut there (its captured bytes are
        returned, to be logged as cut) and the stream resumes at the next message start."""
        if stream.skip >= lost:
            stream.skip -= lost
            return b""
        cut = b"" if stream.resync else bytes(stream.buf)
        stream.skip = 0
        stream.buf.clear()
        stream.resync = True
        return cut

    def _head(self, flow: _Flow, key, raw: bytes, ts: float, *, truncated: bool = False,
              unparsed: bool = False, done: float | None = None) -> None:
        """A request head that began at `ts` and was complete at `done` (default: ts)."""
        head = None if unparsed else http.parse_request_head(raw)
        exchange = Exchange(flow=key, ts=ts, dst_ip=flow.dst_ip, dst_port=flow.dst_port,
                            source=flow.source, process=flow.process, head=head,
                            raw=raw[:256] if head is None else b"", truncated=truncated)
        if head is None:
            self._emit(exchange)  # not HTTP: no response of its own to wait for
            return
        if len(flow.pending) >= MAX_PENDING:
            old = flow.pending.popleft()
            if not old[1]:
                self._emit(old[0])
        flow.pending.append([exchange, False, ts if done is None else done])

    def _status(self, flow: _Flow, status: int | None) -> bool:
        """Give a response status to the oldest request waiting; True if it was a HEAD."""
        if status is not None and 100 <= status < 200:
            return False
        if flow.pending:
            exchange, emitted, _done = flow.pending.popleft()
            if not emitted:
                exchange.status = status
                self._emit(exchange)
            return exchange.head is not None and exchange.head.method == "HEAD"
        return False

    def _finish(self, key, flow: _Flow) -> None:
        self._skip_gaps(flow, key, flow.last_seen)
        stream = flow.request
        if stream.buf and not stream.resync:
            self._head(flow, key, bytes(stream.buf), stream.started, truncated=True)
            stream.buf.clear()
        for exchange, emitted, _done in flow.pending:
            if not emitted:
                self._emit(exchange)
        flow.pending.clear()
