"""Secrets out, control characters escaped: everything a process sent passes through here
before any sink sees it, so no output can leak a token or be forged by a crafted request."""
from __future__ import annotations

import functools
import re

from .classify import SECRET_HEADER_NAMES

# Header names whose values are credentials. Matched case-insensitively. Each provider's
# token headers come from its row in classify.PROVIDERS.
SECRET_HEADERS = SECRET_HEADER_NAMES | frozenset({
    "authorization",
    "proxy-authorization",
    "cookie",
    "set-cookie",
    "x-identity-header",   # Azure App Service managed identity
    "x-idp-token",
})
REDACTED = "<redacted>"

_NEEDS_ESCAPE = re.compile(r"[^\x20-\x5b\x5d-\x7e]")   # all but printable ASCII minus "\"
# In raw bytes we could not parse, anything that looks like "secret-header: value" -- where
# ever it starts: such bytes may separate lines with a lone CR, a NUL or nothing at all.
_RAW_SECRET = re.compile(
    r"(?i)((?:" + "|".join(sorted(map(re.escape, SECRET_HEADERS), key=len, reverse=True))
    + r")[ \t]*:)[^\r\n]*")


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


def is_plain(text: str) -> bool:
    """True when escape(text) is text: printable ASCII without a backslash."""
    return text.isascii() and text.isprintable() and "\\" not in text


def escape(text: str, extra: str = "") -> str:
    """Printable ASCII survives; backslash, control and non-ASCII characters become \\xNN
    (\\uNNNN above 0xff), as does every character in `extra` (e.g. a field delimiter)."""
    # fast path (the usual case): printable ASCII, no backslash, no delimiter
    if is_plain(text):
        for ch in extra:
            if ch in text:
                break
        else:
            return text
    pattern = _NEEDS_ESCAPE if not extra else _escape_pattern(extra)
    return pattern.sub(_escape_char, text)


@functools.lru_cache(maxsize=32)
def _escape_pattern(extra: str) -> re.Pattern:
    return re.compile("[^\\x20-\\x5b\\x5d-\\x7e]|[" + re.escape(extra) + "]")


def redact_text(text: str) -> str:
    """Free text a process made (an argv element such as curl's -H "X-aws-ec2-metadata-token:
    ..."): secret header values blanked, then escaped."""
    if ":" in text:
        text = _RAW_SECRET.sub(lambda m: m.group(1) + " " + REDACTED, text)
    return escape(text)


def delimit(text: str, chars: str) -> str:
    r"""Text already escaped: also write the delimiters of an output format as \xNN (no
    backslash doubling: escaped text has every literal backslash doubled already)."""
    for ch in chars:
        if ch in text:
            text = text.replace(ch, f"\\x{ord(ch):02x}")
    return text


def redact_raw(data: bytes) -> str:
    """Bytes we could not parse as a request head: secrets blanked, then escaped."""
    return redact_text(data.decode("latin-1"))
