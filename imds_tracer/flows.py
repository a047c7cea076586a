"""Per-connection reassembly: chunks in, `Exchange`s (request head + response status) out.

A connection may carry several requests (keep-alive); one request may arrive in several
chunks (several send() calls, several TCP segments, retransmitted or out of order when the
source is a capture). Request bodies and response bodies are skipped by their length.
Memory is bounded: at most `max_flows` connections, MAX_HEAD bytes buffered per direction,
MAX_OUT_OF_ORDER segments held per direction.
"""
from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Callable, Hashable

from . import http
from .model import Chunk, Direction, Exchange, ProcessSnapshot

MAX_OUT_OF_ORDER = 64
MAX_PENDING = 64      # requests awaiting a response on one connection
SEQ_MOD = 1 << 32


@dataclass
class _Stream:
    """One direction of a connection."""
    buf: bytearray = field(default_factory=bytearray)
    skip: int = 0                  # body bytes still to pass over
    chunked: bool = False          # passing over a chunked body: wait for its last chunk
    resync: bool = False           # lost our place: wait for a chunk that starts a message
    next_seq: int | None = None
    held: dict = field(default_factory=dict)  # seq -> (bytes, lost), segments that came early
    truncated: bool = False        # bytes of the message being buffered were not captured
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
    pending: deque = field(default_factory=deque)  # [Exchange, emitted?]


class FlowTable:
    """Reassembles chunks. Finished exchanges go to `emit`; losses go to `drop(kind, n)`."""

    def __init__(self, emit: Callable[[Exchange], None], drop: Callable[[str, int], None], *,
                 response_wait: float = 2.0, flow_idle: float = 300.0,
                 max_flows: int = 65536):
        self._emit = emit
        self._drop = drop
        self.response_wait = response_wait
        self.flow_idle = flow_idle
        self.max_flows = max_flows
        self._flows: OrderedDict[Hashable, _Flow] = OrderedDict()

    def __len__(self) -> int:
        return len(self._flows)

    # -- input -------------------------------------------------------------------------
    def feed(self, chunk: Chunk) -> None:
        key = chunk.flow
        flow = self._flows.get(key)
        if flow is None:
            if not chunk.data and not chunk.lost and chunk.seq is None:
                return
            flow = self._open(chunk)
        else:
            self._flows.move_to_end(key)
            flow.last_seen = chunk.ts
            if chunk.process is not None and chunk.direction is Direction.REQUEST:
                flow.process = chunk.process  # a forked child may share the connection
        if chunk.direction is Direction.REQUEST:
            stream, consume = flow.request, self._consume_request
        else:
            stream, consume = flow.response, self._consume_response
        if chunk.seq is None:  # a kernel source: the bytes come in order, once
            consume(flow, key, stream, chunk.data, chunk.lost, chunk.ts)
            return
        for data, lost in self._in_order(stream, chunk):
            consume(flow, key, stream, data, lost, chunk.ts)

    def close(self, key: Hashable, ts: float) -> None:
        """The connection ended: whatever it still holds is logged now."""
        flow = self._flows.pop(key, None)
        if flow is not None:
            self._finish(key, flow)

    def tick(self, now: float) -> None:
        """Log requests whose response did not come in time; forget idle connections."""
        idle = []
        for key, flow in self._flows.items():
            if now - flow.last_seen >= self.flow_idle:
                idle.append(key)
                continue
            for entry in flow.pending:
                if not entry[1] and now - entry[0].ts >= self.response_wait:
                    entry[1] = True
                    self._emit(entry[0])
            stream = flow.request
            if stream.buf and now - stream.started >= self.response_wait:
                # a head that never completed (client stalled, or bytes not captured)
                self._head(flow, key, bytes(stream.buf), stream.started, truncated=True)
                stream.buf.clear()
                stream.resync = True
        for key in idle:
            self.close(key, now)

    def flush(self) -> None:
        """End of input: log everything still held."""
        for key in list(self._flows):
            self.close(key, 0.0)

    # -- internals ---------------------------------------------------------------------
    def _open(self, chunk: Chunk) -> _Flow:
        if len(self._flows) >= self.max_flows:
            old_key, old = self._flows.popitem(last=False)
            self._drop("flow_table_full", 1)
            self._finish(old_key, old)
        flow = _Flow(chunk.dst_ip, chunk.dst_port, chunk.source, chunk.process, chunk.ts)
        self._flows[chunk.flow] = flow
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
            if len(stream.held) < MAX_OUT_OF_ORDER:
                stream.held[chunk.seq] = (chunk.data, chunk.lost)
            else:
                self._drop("out_of_order_overflow", 1)
            return
        if offset >= len(chunk.data) + chunk.lost:
            return  # a retransmission of bytes we have
        yield self._advance(stream, chunk.data, chunk.lost, offset)
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
        if stream.skip:
            data, lost = self._skip_body(stream, data, lost)
            if data is None:
                return
        if stream.resync:
            if not http.could_start_request(data):
                return
            stream.resync = False
        if not stream.buf:
            stream.started = ts
            stream.truncated = False
        stream.buf += data
        if lost:
            stream.truncated = True
        while stream.buf and not stream.skip:
            buf = stream.buf
            if not http.could_start_request(buf):
                self._head(flow, key, bytes(buf[:256]), stream.started, unparsed=True)
                buf.clear()
                stream.resync = True
                return
            end = http.head_end(buf)
            if end < 0:
                if len(buf) > http.MAX_HEAD or stream.truncated:
                    self._head(flow, key, bytes(buf), stream.started, truncated=True)
                    buf.clear()
                    stream.resync = True
                return
            head = bytes(buf[:end])
            self._head(flow, key, head, stream.started, truncated=stream.truncated)
            del buf[:end]
            stream.truncated = False
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
        self._account_lost(stream, lost)

    def _consume_response(self, flow: _Flow, key, stream: _Stream, data: bytes, lost: int,
                          ts: float) -> None:
        if stream.skip:
            data, lost = self._skip_body(stream, data, lost)
            if data is None:
                return
        if stream.resync or stream.chunked:
            if not data.startswith(b"HTTP/1."):
                if stream.chunked and data.endswith(b"0\r\n\r\n"):
                    stream.chunked = False
                return
            stream.resync = stream.chunked = False
        stream.buf += data
        while stream.buf and not stream.skip and not stream.chunked:
            buf = stream.buf
            if not http.could_start_response(buf):
                buf.clear()
                stream.resync = True
                return
            end = http.head_end(buf)
            if end < 0:
                if len(buf) > http.MAX_HEAD or lost:
                    # the status line is all we need; the rest was not captured
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
        self._account_lost(stream, lost)

    @staticmethod
    def _skip_body(stream: _Stream, data: bytes, lost: int):
        """Pass over the rest of a body (stream.skip > 0). Returns the bytes after it (None
        when there are none) and how many uncaptured bytes follow those."""
        if stream.skip < len(data):
            data = data[stream.skip:]
            stream.skip = 0
            return data, lost
        stream.skip -= len(data)
        if stream.skip >= lost:
            stream.skip -= lost
        else:  # the body ended inside bytes not captured: the next message's start is gone
            stream.skip = 0
            stream.resync = True
        return None, 0

    @staticmethod
    def _account_lost(stream: _Stream, lost: int) -> None:
        """Bytes of this chunk that the source did not copy follow what we consumed."""
        if not lost:
            return
        if stream.skip >= lost:
            stream.skip -= lost
        else:
            stream.skip = 0
            stream.buf.clear()
            stream.resync = True

    def _head(self, flow: _Flow, key, raw: bytes, ts: float, *, truncated: bool = False,
              unparsed: bool = False) -> None:
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
        flow.pending.append([exchange, False])

    def _status(self, flow: _Flow, status: int | None) -> bool:
        """Give a response status to the oldest request waiting; True if it was a HEAD."""
        if status is not None and 100 <= status < 200:
            return False
        if flow.pending:
            exchange, emitted = flow.pending.popleft()
            if not emitted:
                exchange.status = status
                self._emit(exchange)
            return exchange.head is not None and exchange.head.method == "HEAD"
        return False

    def _finish(self, key, flow: _Flow) -> None:
        stream = flow.request
        if stream.buf and not stream.resync:
            self._head(flow, key, bytes(stream.buf), stream.started, truncated=True)
            stream.buf.clear()
        for exchange, emitted in flow.pending:
            if not emitted:
                self._emit(exchange)
        flow.pending.clear()
