"""Which client sent a request, in which version, and what to do about a normal-mode one.

The knowledge is one data file, `data/clients.json`: a row per client with the pattern of its
User-Agent (and of its program name, for the tools whose User-Agent says nothing), the
minimum version the provider documents for hardened mode, and the source of that number.
Everything here is a pure function of the User-Agent, the program, the provider, the mode
and the fallback diagnosis (`fallback.FallbackTracker`), so the report can recompute the
advice text from what the trace line says.
"""
from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .model import ClientFinding

DATA = Path(__file__).with_name("data") / "clients.json"
UA_MAX = 256   # characters of a User-Agent kept in records: bounded, it is a process's text

# advice words (the trace line's advice=...); `advice_text` says each in full
UPGRADE = "upgrade>="       # + the documented minimum version
UPGRADE_LATEST = "upgrade"  # an SDK with no documented minimum
FIX_PATH = "fix-path"       # capable client whose token PUT failed: fix the network path
FIX_CALLER = "fix-caller"   # capable client that still skipped the token: find the code path
SEND_TOKEN = "send-token"   # a generic HTTP tool: the script calling it must send the token
IDENTIFY = "identify"       # unknown client


@dataclass(frozen=True)
class ClientRule:
    name: str
    kind: str                 # sdk | agent | tool
    ua: re.Pattern | None
    program: re.Pattern | None
    min_hardened: str | None
    provider: str | None      # the row applies to this provider's requests only
    source: str               # a URL or document name
    note: str | None
    hint: str | None = None   # the fix in words, where the generic advice would mislead
    bare_headers: frozenset | None = None  # header names of a request without a User-Agent


def load_rules(path: Path = DATA) -> tuple[ClientRule, ...]:
    data = json.loads(path.read_text(encoding="utf-8"))
    sources = data["sources"]
    rules = []
    for row in data["clients"]:
        rules.append(ClientRule(
            name=row["name"], kind=row["kind"],
            ua=re.compile(row["ua"], re.IGNORECASE) if row.get("ua") else None,
            program=re.compile(row["program"]) if row.get("program") else None,
            min_hardened=row.get("min_hardened"), provider=row.get("provider"),
            source=sources.get(row["source"], row["source"]), note=row.get("note"),
            hint=row.get("hint"),
            bare_headers=frozenset(row["bare_headers"]) if row.get("bare_headers") else None))
    return tuple(rules)


@functools.lru_cache(maxsize=1)
def rules() -> tuple[ClientRule, ...]:
    return load_rules()


def version_key(version: str) -> tuple[int, ...]:
    """1.13.25 -> (1, 13, 25); non-numeric parts are ignored (1.8.0_292 -> (1, 8, 0, 292))."""
    return tuple(int(n) for n in re.findall(r"\d+", version))


def _program_names(exe: str | None, argv: tuple[str, ...] | None) -> tuple[str, ...]:
    names = []
    if exe:
        names.append(os.path.basename(exe))
    if argv:
        names.append(os.path.basename(argv[0]))
        # interpreters: the script they run (python3 /usr/bin/aws, /usr/bin/cloud-init ...)
        script = next((a for a in argv[1:] if not a.startswith("-")), None)
        if script and os.path.basename(argv[0]).startswith(("python", "node", "ruby", "php")):
            names.append(os.path.basename(script))
    return tuple(names)


# headers left out of a bare-header fingerprint: they come and go with the request's kind
_NOT_FINGERPRINT = ("content-length", "x-aws-ec2-metadata-", "x-aliyun-ecs-metadata-",
                    "x-metadata-token")


def fingerprint(header_names) -> frozenset:
    """The header names of a request that identify a client sending no User-Agent."""
    return frozenset(n for n in (h.lower() for h in header_names)
                     if not n.startswith(_NOT_FINGERPRINT))


@functools.lru_cache(maxsize=4096)
def recognise(user_agent: str | None, exe: str | None, argv: tuple[str, ...] | None,
              provider: str, header_names: frozenset = frozenset()
              ) -> tuple[ClientRule | None, str | None]:
    """(the matching rule, the version) — the User-Agent first, then the program name, then
    (no User-Agent) the request's header names."""
    programs = _program_names(exe, argv)
    for rule in rules():
        if rule.provider is not None and rule.provider != provider:
            continue
        if user_agent and rule.ua is not None:
            match = rule.ua.search(user_agent)
            if match:
                version = next((v for v in match.groups() if v), None)
                return rule, version
        if rule.program is not None and any(rule.program.search(p) for p in programs):
            return rule, None
    if user_agent is None and header_names:
        for rule in rules():
            if rule.bare_headers == header_names:
                return rule, None
    return None, None


def advise(rule: ClientRule | None, version: str | None, mode: str,
           fallback: str | None) -> str | None:
    """The advice word for a request; None when there is nothing to do (not normal mode)."""
    if mode != "normal":
        return None
    if fallback and fallback.startswith("token_put_"):
        return FIX_PATH
    if rule is None:
        return FIX_CALLER if fallback == "mixed" else IDENTIFY
    if rule.kind == "tool":
        return SEND_TOKEN
    if rule.min_hardened is None:
        return FIX_CALLER if fallback == "mixed" else UPGRADE_LATEST
    if version is not None and version_key(version) >= version_key(rule.min_hardened):
        return FIX_CALLER
    return UPGRADE + rule.min_hardened


@functools.lru_cache(maxsize=4096)
def finding(user_agent: str | None, exe: str | None, argv: tuple[str, ...] | None,
            provider: str, mode: str, fallback: str | None,
            header_names: frozenset = frozenset()) -> ClientFinding:
    rule, version = recognise(user_agent, exe, argv, provider, header_names)
    return ClientFinding(name=rule.name if rule else None, version=version,
                         min_hardened=rule.min_hardened if rule else None,
                         advice=advise(rule, version, mode, fallback),
                         source=rule.source if rule and rule.min_hardened else None)


def _token_names(provider: str) -> str:
    from .classify import TOKEN_PROTOCOLS
    if provider == "oci":
        return "read /opc/v2/ (with the bearer header OCI documents) instead of /opc/v1/"
    proto = TOKEN_PROTOCOLS.get(provider) or TOKEN_PROTOCOLS["aws"]
    return f"PUT {proto.token_path} with {proto.ttl_header}, then send {proto.token_header}"


def advice_text(advice: str | None, client: str | None, provider: str,
                fallback: str | None = None) -> str:
    """The fix in words, for the report and the JSON record."""
    who = client or "this client"
    if advice is None:
        return "nothing to do"
    hint = next((r.hint for r in rules() if r.name == client and r.hint), None)
    if hint and advice != FIX_PATH:
        return hint
    if advice.startswith(UPGRADE):
        return f"upgrade {who} to {advice[len(UPGRADE):]} or later (it speaks hardened mode)"
    if advice == FIX_PATH:
        what = (fallback or "token_put_unanswered")[len("token_put_"):]
        got = "got no answer" if what == "unanswered" else f"was answered {what}"
        return (f"{who} tried hardened mode but its token PUT {got}, then fell back: fix the "
                "path, not the client (raise the instance's PUT response hop limit for "
                "containers; let PUT through the proxy/firewall)")
    if advice == FIX_CALLER:
        return (f"{who} can use hardened mode but sent this request without a token: find the "
                "setting or code path that skips it (e.g. a disabled token fetch)")
    if advice == UPGRADE_LATEST:
        return (f"upgrade {who} to its latest release (no minimum version is documented) and "
                "check that it fetches a token")
    if advice == SEND_TOKEN:
        return f"{who} is a generic HTTP tool: change the caller to {_token_names(provider)}"
    return "unrecognised client: find the program by its argv, owner and parents"
