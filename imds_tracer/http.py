"""Tolerant HTTP/1.x head parsing: pure functions over bytes.

Tolerant means: any line ending (CRLF or LF), junk header lines skipped, a head cut short
still yields what it has. Bounded means: heads past MAX_HEAD bytes or MAX_HEADERS lines are
cut, so a hostile sender cannot make us hold or print more than that.
"""
from __future__ import annotations

import re

from .model import RequestHead

MAX_HEAD = 16 * 1024
MAX_HEADERS = 100
MAX_FIELD = 4096   # longest method/target/header value kept

METHODS = frozenset({b"GET", b"PUT", b"POST", b"HEAD", b"DELETE", b"OPTIONS", b"PATCH",
                     b"TRACE", b"CONNECT"})
_TOKEN = re.compile(rb"[A-Z]{1,16}")
_STATUS = re.compile(rb"HTTP/(\d)\.(\d) (\d{3})(?:[ \r\n]|$)")


def head_end(buf: bytes | bytearray) -> int:
    """Index just past the blank line ending a head, or -1 when it is not there yet."""
    crlf = buf.find(b"\r\n\r\n")
    lf = buf.find(b"\n\n")
    ends = [i + 4 for i in (crlf,) if i >= 0] + [i + 2 for i in (lf,) if i >= 0]
    return min(ends) if ends else -1


def could_start_request(buf: bytes | bytearray) -> bool:
    """True when buf begins like a request line ("GET ", "PUT "...), or could still."""
    space = buf.find(b" ", 0, 17)
    if space < 0:
        prefix = bytes(buf[:16])
        return len(buf) < 16 and any(m.startswith(prefix) for m in METHODS)
    return bytes(buf[:space]) in METHODS


def could_start_response(buf: bytes | bytearray) -> bool:
    prefix = bytes(buf[:7])
    return b"HTTP/1."[:len(prefix)] == prefix


def _lines(head: bytes) -> list[bytes]:
    return [line[:-1] if line.endswith(b"\r") else line for line in head.split(b"\n")]


def _text(raw: bytes) -> str:
    return raw[:MAX_FIELD].decode("latin-1")


def parse_request_head(data: bytes) -> RequestHead | None:
    """Parse a request head (with or without its terminating blank line); None if the first
    line is not a request line."""
    lines = _lines(bytes(data[:MAX_HEAD]))
    first = lines[0].split(b" ")
    first = [p for p in first if p]
    if len(first) < 2 or first[0] not in METHODS:
        return None
    if len(first) >= 3 and first[-1].startswith(b"HTTP/"):
        version = first[-1]
        target = b" ".join(first[1:-1])
    else:
        version, target = b"", b" ".join(first[1:])
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        if not line:
            break
        if line[:1] in (b" ", b"\t") and headers:  # obsolete line folding
            name, value = headers[-1]
            headers[-1] = (name, (value + " " + _text(line.strip()))[:MAX_FIELD])
            continue
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip():
            continue  # not a header line; tolerated, not kept
        headers.append((_text(name), _text(value.strip(b" \t"))))
        if len(headers) >= MAX_HEADERS:
            break
    return RequestHead(method=first[0].decode("ascii"), target=_text(target),
                       version=version[:16].decode("latin-1"), headers=tuple(headers))


def parse_status(data: bytes) -> int | None:
    match = _STATUS.match(data)
    return int(match.group(3)) if match else None


def content_length(head: bytes) -> int | None:
    """Content-Length of a head (request or response); None when absent or malformed."""
    if b"content-length" not in head.lower():
        return None  # quick answer for most requests, same result as the loop
    for line in _lines(head)[1:MAX_HEADERS + 1]:
        name, sep, value = line.partition(b":")
        if sep and name.strip().lower() == b"content-length":
            value = value.strip()
            return int(value) if value.isdigit() and len(value) < 16 else None
    return None


def is_chunked(head: bytes) -> bool:
    if b"transfer-encoding" not in head.lower():
        return False  # quick answer for almost every head, same result as the loop
    for line in _lines(head)[1:MAX_HEADERS + 1]:
        name, sep, value = line.partition(b":")
        if sep and name.strip().lower() == b"transfer-encoding":
            return b"chunked" in value.lower()
    return False
