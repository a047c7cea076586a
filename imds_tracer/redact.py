"""Secrets out, control characters escaped: everything a process sent passes through here
before any sink sees it, so no output can leak a token or be forged by a crafted request."""
from __future__ import annotations

import re

# Header names whose values are credentials. Matched case-insensitively.
SECRET_HEADERS = frozenset({
    "x-aws-ec2-metadata-token",
    "x-aliyun-ecs-metadata-token",
    "x-metadata-token",
    "authorization",
    "proxy-authorization",
    "cookie",
    "set-cookie",
    "x-identity-header",   # Azure App Service managed identity
    "x-idp-token",
})
REDACTED = "<redacted>"

_NEEDS_ESCAPE = re.compile(r"[^\x20-\x5b\x5d-\x7e]")   # all but printable ASCII minus "\"
# In raw bytes we could not parse, anything that looks like "secret-header: value".
_RAW_SECRET = re.compile(
    r"(?im)^((?:x-aws-ec2-metadata-token|x-aliyun-ecs-metadata-token|x-metadata-token"
    r"|authorization|proxy-authorization|cookie)[ \t]*:)[^\r\n]*")


def is_secret_header(name: str) -> bool:
    return name.strip().lower() in SECRET_HEADERS


def redact_header(name: str, value: str) -> str:
    if not is_secret_header(name):
        return value
    if not value.strip():
        return ""  # an empty token is a finding (empty_token), not a secret
    return REDACTED


def _escape_char(match: re.Match) -> str:
    ch = match.group(0)
    if ch == "\\":
        return "\\\\"
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape(text: str, extra: str = "") -> str:
    """Printable ASCII survives; backslash, control and non-ASCII characters become \\xNN
    (\\uNNNN above 0xff), as does every character in `extra` (e.g. a field delimiter)."""
    pattern = _NEEDS_ESCAPE if not extra else re.compile(
        "[^\\x20-\\x5b\\x5d-\\x7e]|[" + re.escape(extra) + "]")
    return pattern.sub(_escape_char, text)


def redact_raw(data: bytes) -> str:
    """Bytes we could not parse as a request head: secrets blanked, then escaped."""
    text = data.decode("latin-1")
    return escape(_RAW_SECRET.sub(lambda m: m.group(1) + " " + REDACTED, text))
