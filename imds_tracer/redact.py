"""Secrets out, control characters escaped: everything a process sent passes through here
before any sink sees it, so no output can leak a credential or be forged by a crafted request.

Redaction is a rule about what is shown, not a list of secret names: what identifies the
caller and the request. Shown are the method, the path, query parameter NAMES, header NAMES,
the values of a few harmless headers (`SHOWN_HEADERS`), and of a command line the program,
its sub-commands, option names, paths, numbers and URLs (themselves without userinfo or query
values). Every other value -- a header, a query value, URL userinfo, an option's argument,
`NAME=value`, a request body -- is replaced by `<redacted>`, whatever its name.

Escaping is one function over a whole record (`escape_fields`): every string in it, at any
depth, comes out as printable ASCII, so a field added to the record later is escaped too.
"""
from __future__ import annotations

import dataclasses
import functools
import re
import shlex

from .classify import TOKEN_PROTOCOLS

REDACTED = "<redacted>"

# Header values that identify a client or describe the request, never a credential; the
# token protocols' TTL headers come from their rows in classify.PROVIDERS.
SHOWN_HEADERS = frozenset({
    "host", "user-agent", "accept", "accept-encoding", "content-length", "content-type",
    "connection", "metadata", "metadata-flavor",
}) | frozenset(p.ttl_header for p in TOKEN_PROTOCOLS.values())
# Query parameters the metadata services define whose values are settings, not secrets.
SHOWN_QUERY = frozenset({"api-version", "format", "recursive", "alt", "wait_for_change",
                         "resource", "version"})

_NEEDS_ESCAPE = re.compile(r"[^\x20-\x5b\x5d-\x7e]")   # all but printable ASCII minus "\"
_USERINFO = re.compile(r"(?i)^([a-z][a-z0-9+.-]*://)([^/?#@]*)@")
_HEADER_SHAPED = re.compile(r"^([A-Za-z0-9_-]+)[ \t]*:(?!//)[ \t]*(.*)$", re.S)
_ENV_SHAPED = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$", re.S)
_NUMBER = re.compile(r"^[+-]?[0-9]+(\.[0-9]+)?[smhdkKMG]?$")
_WORD = re.compile(r"^[a-z][a-z0-9_.-]*$")          # a sub-command: ec2, describe-instances
_PATH = re.compile(r"^(/|\./|\.\./|~/)[A-Za-z0-9_./+-]*$")
_SHORT_FLAGS = re.compile(r"^-[A-Za-z]{1,5}$")     # -s, -sSfL: flags, not a glued value
_HTTP_METHOD = re.compile(r"^(GET|PUT|POST|HEAD|DELETE|OPTIONS|PATCH)$")  # curl -X PUT
_LINE_BREAK = re.compile(r"\r\n|[\r\n\0]")
_METHOD_LINE = re.compile(r"^([A-Za-z]{1,16}) (\S*)(.*)$", re.S)


# -- what a request shows -------------------------------------------------------------------
def is_secret_header(name: str) -> bool:
    """Whether a header's value is hidden: every header but the few shown."""
    return name.strip().lower() not in SHOWN_HEADERS


def redact_header(name: str, value: str) -> str:
    if not is_secret_header(name):
        return value
    if not value.strip():
        return ""  # an empty token is a finding (empty_token), not a secret
    return REDACTED


def redact_url(text: str) -> str:
    """A URL or request target: userinfo and query/fragment values replaced, names kept."""
    text = _USERINFO.sub(lambda m: m.group(1) + REDACTED + "@", text)
    cut = min((i for i in (text.find("?"), text.find("#")) if i >= 0), default=-1)
    if cut < 0:
        return text
    base, rest = text[:cut], text[cut:]
    query, hash_, fragment = rest[1:].partition("#") if rest[0] == "?" else ("", "#", rest[1:])
    if rest[0] == "#":
        query = None
    out = base
    if query is not None:
        out += "?" + "&".join(_query_item(item) for item in query.split("&"))
    if hash_:
        out += "#" + (REDACTED if fragment else "")
    return out


def _query_item(item: str) -> str:
    name, eq, value = item.partition("=")
    if not eq:
        return REDACTED if item else ""  # a bare item may be the secret itself
    return f"{name}={value if name.lower() in SHOWN_QUERY or not value else REDACTED}"


def redact_raw(data: bytes) -> str:
    """Bytes we could not parse as a request head, by the same rule: a request line's method
    and target (redacted as a URL), header names with the shown values, and nothing else --
    junk, a body, a line without a name -- but its length. Not escaped (escape_fields is)."""
    text = data.decode("latin-1")
    head, blank, body = text.partition("\r\n\r\n")
    parts = _LINE_BREAK.split(head)
    seps = _LINE_BREAK.findall(head)
    out = [_raw_first_line(parts[0])]
    for sep, line in zip(seps, parts[1:]):
        out.append(sep + _raw_line(line))
    if blank:
        out.append(blank + (f"{REDACTED}({len(body)} bytes)" if body else ""))
    return "".join(out)


def _raw_first_line(line: str) -> str:
    match = _METHOD_LINE.match(line)
    if match is None:
        return _raw_line(line)
    method, target, rest = match.groups()
    version = rest.strip()
    shown = version if version.startswith("HTTP/") and len(version) <= 10 else \
        (REDACTED if version else "")
    return f"{method} {redact_url(target)}" + (f" {shown}" if rest else "")


def _raw_line(line: str) -> str:
    match = _HEADER_SHAPED.match(line)
    if match is not None:
        name, value = match.groups()
        return f"{name}: {redact_header(name, value)}"
    return f"{REDACTED}({len(line)} bytes)" if line else ""


# -- what a command line shows --------------------------------------------------------------
def redact_argv(argv: tuple[str, ...], depth: int = 0) -> tuple[str, ...]:
    """The program, then every argument by its shape (see the module docstring). The argument
    after an option is that option's value unless it is an option itself. depth 1: the
    words of a script (sh -c '...'), whose first word nothing vouches for as a program."""
    if not argv:
        return argv
    out = [redact_url(argv[0]) if depth == 0 else _positional(argv[0], depth)]
    after_option = False
    for arg in argv[1:]:
        if arg.startswith("-") and len(arg) > 1:
            out.append(_option(arg, depth))
            after_option = "=" not in arg and arg != "--"
            continue
        out.append(_value(arg, depth) if after_option else _positional(arg, depth))
        after_option = False
    return tuple(out)


def _option(arg: str, depth: int) -> str:
    if arg.startswith("--"):
        name, eq, value = arg.partition("=")
        return name + eq + _value(value, depth) if eq else arg
    if _SHORT_FLAGS.match(arg):
        return arg
    return arg[:2] + REDACTED  # -uuser:pw, -pS3CRET: a value glued to its option


def _value(arg: str, depth: int = 0) -> str:
    """An option's argument: shown when a URL, a number, a path or a shown header."""
    if not arg or _NUMBER.match(arg) or _PATH.match(arg) or _HTTP_METHOD.match(arg):
        return arg
    if "://" in arg and not any(c.isspace() for c in arg):
        return redact_url(arg)
    header = _HEADER_SHAPED.match(arg)
    if header is not None:
        return f"{header.group(1)}: {redact_header(*header.groups())}"
    env = _ENV_SHAPED.match(arg)
    if env is not None:
        return f"{env.group(1)}={_value(env.group(2), depth)}"
    if depth == 0 and any(c.isspace() for c in arg):
        return _script(arg)
    return REDACTED


def _positional(arg: str, depth: int) -> str:
    if _WORD.match(arg):
        return arg
    return _value(arg, depth)


def _script(text: str) -> str:
    """A shell command given as one argument (sh -c '...'): its words by the same rule."""
    try:
        words = shlex.split(text)
    except ValueError:
        return REDACTED
    if not words:
        return text
    shown = redact_argv(tuple(words), depth=1)
    return " ".join(w if w == REDACTED else shlex.quote(w) for w in shown)


# -- escaping -------------------------------------------------------------------------------
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


def escape_fields(value):
    """`value` with every string in it escaped, at any depth: strings, tuples, lists, dicts
    (keys too) and dataclasses. The one escaping path of every record the sinks receive. A
    frozen dataclass (a process, a container) is escaped once and remembered; a mutable one
    (a record, made fresh for this) is escaped in place."""
    kind = type(value)
    if kind is str:
        return value if is_plain(value) else escape(value)
    if value is None or kind in _SCALARS:
        return value
    if kind in _CONTAINERS:
        return _escape_container(value)
    params = getattr(kind, "__dataclass_params__", None)
    if params is not None:
        return _escape_frozen(value) if params.frozen else _escape_in_place(value)
    if isinstance(value, str):   # a str subclass
        return escape(value)
    return escape(str(value))


def _escape_in_place(value):
    # the usual field inline: a plain string, a number, None, empty (one call per record
    # instead of one per field), read and set in the instance's dict
    fields = getattr(value, "__dict__", None)
    if fields is None:   # a dataclass with slots
        for name in _field_names(type(value)):
            setattr(value, name, escape_fields(getattr(value, name)))
        return value
    for name, field in fields.items():
        kind = type(field)
        if kind is str:
            if not (field.isascii() and field.isprintable() and "\\" not in field):
                fields[name] = escape(field)
        elif field and kind not in _SCALARS:
            fields[name] = escape_fields(field)
    return value


def _escape_container(value):
    if not value:
        return value
    try:   # the usual case, strings only and all plain: one test for all of them
        if is_plain("".join(value) + ("".join(value.values()) if type(value) is dict
                                      else "")):
            return value
    except TypeError:
        pass   # not only strings
    if type(value) is dict:
        return {escape_fields(k): escape_fields(v) for k, v in value.items()}
    return type(value)(map(escape_fields, value))


_SCALARS = (int, float, bool)
_CONTAINERS = (tuple, list, dict)
_FROZEN_SEEN = 4096
_frozen: dict[int, tuple] = {}   # id -> (the object, kept alive so the id stays its, escaped)


@functools.lru_cache(maxsize=None)
def _field_names(cls) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls) if f.init)


def _escape_frozen(value):
    """Processes, containers, owners repeat from request to request (the same objects, from
    the pipeline's story cache): escaped once each, remembered by identity (hashing one
    would cost more than escaping it)."""
    hit = _frozen.get(id(value))
    if hit is not None and hit[0] is value:
        return hit[1]
    changes = {}
    for name in _field_names(type(value)):
        old = getattr(value, name)
        new = escape_fields(old)
        if new is not old:
            changes[name] = new
    safe = dataclasses.replace(value, **changes) if changes else value
    if len(_frozen) >= _FROZEN_SEEN:
        _frozen.clear()
    _frozen[id(value)] = (value, safe)
    return safe


def delimit(text: str, chars: str) -> str:
    r"""Text already escaped: also write the delimiters of an output format as \xNN (no
    backslash doubling: escaped text has every literal backslash doubled already)."""
    for ch in chars:
        if ch in text:
            text = text.replace(ch, f"\\x{ord(ch):02x}")
    return text
