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
    if crlf < 0:
        lf = buf.find(b"\n\n")
        return lf + 2 if lf >= 0 else -1
    lf = buf.find(b"\n\n", 0, crlf + 3)  # a bare-LF blank line ending earlier
    return lf + 2 if lf >= 0 else crlf + 4


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


# a whole request or status line, wherever it starts: a message follows a body directly
_REQUEST_LINE = re.compile(rb"(?:" + b"|".join(sorted(METHODS))
                           + rb") [!-~]{1,4096} HTTP/1\.[0-9]\r?\n")
_STATUS_LINE = re.compile(rb"HTTP/1\.[0-9] [0-9]{3}[ \r\n]")


def request_start(buf: bytes | bytearray) -> int:
    """Where the next request starts in bytes that follow a loss (resync): 0 when buf begins
    like a request line, else the first whole request line in it; -1 when there is none."""
    if buf and could_start_request(buf):
        return 0
    match = _REQUEST_LINE.search(buf)
    return match.start() if match else -1


def response_start(buf: bytes | bytearray) -> int:
    """The same for a response: 0, or the first whole status line in buf; -1."""
    if buf and could_start_response(buf):
        return 0
    match = _STATUS_LINE.search(buf)
    return match.start() if match else -1


def _lines(head: bytes) -> list[bytes]:
    return [line[:-1] if line.endswith(b"\r") else line for line in head.split(b"\n")]


# The request parser works on text decoded as latin-1, one character per byte, so it slices
# and bounds exactly as it would the bytes; what bytes.strip() strips, spelled out:
_SPACE = " \t\n\r\x0b\x0c"
_METHOD_NAMES = frozenset(m.decode("ascii") for m in METHODS)


def parse_request_head(data: bytes) -> RequestHead | None:
    """Parse a request head (with or without its terminating blank line); None if the first
    line is not a request line."""
    lines = data[:MAX_HEAD].decode("latin-1").split("\n")
    first = lines[0][:-1] if lines[0].endswith("\r") else lines[0]
    first = [p for p in first.split(" ") if p]
    if len(first) < 2 or first[0] not in _METHOD_NAMES:
        return None
    if len(first) >= 3 and first[-1].startswith("HTTP/"):
        version = first[-1]
        target = " ".join(first[1:-1])
    else:
        version, target = "", " ".join(first[1:])
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        if line.endswith("\r"):
            line = line[:-1]
        if not line:
            break
        if line[0] in " \t" and headers:  # obsolete line folding
            name, value = headers[-1]
            headers[-1] = (name, (value + " " + line.strip(_SPACE)[:MAX_FIELD])[:MAX_FIELD])
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip(_SPACE):
            continue  # not a header line; tolerated, not kept
        headers.append((name[:MAX_FIELD], value.strip(" \t")[:MAX_FIELD]))
        if len(headers) >= MAX_HEADERS:
            break
    return RequestHead(method=first[0], target=target[:MAX_FIELD], version=version[:16],
                       headers=tuple(headers))


def parse_status(data: bytes) -> int | None:
    match = _STATUS.match(data)
    return int(match.group(3)) if match else None


def _first_value(low: bytes, name: bytes) -> bytes | None:
    """Value of the first `name:` header line of a lowercased head (name lowercase). A line's
    CR stays at the end of its value, where the callers' strip() and `in` ignore it."""
    at = low.find(name)
    if at < 0:
        return None  # quick answer for most heads, same result as the scan
    colon = at + len(name)
    if low[at - 1:at] == b"\n" and low[colon:colon + 1] == b":" and \
            low.count(b"\n", 0, at) <= MAX_HEADERS:
        # the usual form, and the name's first mention: no earlier line can be a match
        end = low.find(b"\n", colon)
        return low[colon + 1:end] if end >= 0 else low[colon + 1:]
    for line in _lines(low)[1:MAX_HEADERS + 1]:
        key, sep, value = line.partition(b":")
        if sep and key.strip() == name:
            return value
    return None


def body_framing(head: bytes) -> tuple[int | None, bool]:
    """Content-Length (None when absent or malformed) and whether the body is chunked, of a
    head (request or response), from one lowercased copy of it."""
    low = head.lower()
    length = _first_value(low, b"content-length")
    if length is not None:
        length = length.strip()
        length = int(length) if length.isdigit() and len(length) < 16 else None
    chunked = _first_value(low, b"transfer-encoding")
    return length, chunked is not None and b"chunked" in chunked


def content_length(head: bytes) -> int | None:
    return body_framing(head)[0]


def is_chunked(head: bytes) -> bool:
    return body_framing(head)[1]
