"""The data that flows through the pipeline, from a source's raw chunk to a sink's record.

Sources (kernel or replay) produce `Chunk`s; `flows.FlowTable` turns them into
`RequestHead`s with an optional response status; `classify` adds a `Classification`;
`enrich` adds the process story; sinks receive a finished `RequestRecord`.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Hashable


class Direction(enum.Enum):
    REQUEST = "request"    # bytes the local process sent to the metadata address
    RESPONSE = "response"  # bytes the local process received back


@dataclass(frozen=True)
class ProcessSnapshot:
    """What the kernel knew about the sender at send time. Unknown fields are None."""
    pid: int
    tid: int | None = None
    uid: int | None = None
    comm: str | None = None
    cgroup_id: int | None = None
    ppid: int | None = None
    # argv captured by the kernel at exec time, for processes gone before user space looks.
    argv: tuple[str, ...] | None = None
    argv_truncated: bool = False  # the kernel kept only the start of a longer argv


@dataclass
class Chunk:
    """One piece of a connection's byte stream, as a source saw it."""
    flow: Hashable           # stable for the life of one connection, unique among live ones
    direction: Direction
    data: bytes
    ts: float                # seconds since the epoch
    dst_ip: str              # the metadata address (the remote end), textual form
    dst_port: int
    source: str              # "kprobe" | "tracepoint" | "replay"
    process: ProcessSnapshot | None = None
    seq: int | None = None   # TCP sequence number of data[0] (replay); None: in order
    lost: int = 0            # bytes that followed `data` in this send but were not copied


@dataclass(frozen=True)
class FlowClosed:
    """The connection `flow` ended (or its source stopped tracking it)."""
    flow: Hashable
    ts: float


@dataclass(frozen=True)
class ClientGaveUp:
    """The client closed its side of `flow` (FIN): whatever it still waits for will not come."""
    flow: Hashable
    ts: float


# What the agent can lose or cut, by kind: a closed set. `Pipeline.drop` refuses any other
# name (a programming error, caught by tests/unit/test_drop_kinds.py, never a new metric label
# at run time), and every kind is a metric series from start-up: event losses as
# imds_tracer_lost_events_total{stage} (LOST_STAGES), the rest as imds_tracer_dropped_total.
DROP_KINDS = frozenset({
    "kernel_lost",        # events the kernel could not hand over (buffer full, output failed)
    "user_lost",          # events user space could not take in (no such queue today: 0)
    "event_error",        # an event that could not be decoded
    "payload_truncated",  # a send longer than capture.max_payload: its end not copied
    "head_truncated",     # a request head logged without all of its bytes
    "stream_gap",         # bytes of a stream that never came: skipped to the next message
    "flow_table_full",    # a connection pushed out to keep flows.max_flows
    "log_write",          # a trace-log or JSON line that could not be written
    "stale_fd",           # kernel: a tracked fd found stale after exec/exit, forgotten
    "argv_truncated",     # kernel: an exec argv longer than the kernel's cache holds
})
LOST_STAGES = {"kernel_lost": "kernel", "user_lost": "user"}


@dataclass(frozen=True)
class Dropped:
    """`count` things of `kind` (one of DROP_KINDS) were lost or cut."""
    kind: str
    count: int
    detail: str = ""


@dataclass
class RequestHead:
    """A parsed request head; read-only once made. (Not frozen: one is made per request, and
    a frozen dataclass's __init__ costs twice as much.)"""
    method: str
    target: str              # request target as sent, query included
    version: str
    headers: tuple[tuple[str, str], ...]  # in order, names as sent
    # lowercase name -> first value, made once: classification asks several questions of
    # every head, and a scan lowercasing every name per question cost more than the parse
    first: dict[str, str] = field(init=False, compare=False, repr=False)

    def __post_init__(self):
        self.first = {}
        for name, value in self.headers:
            self.first.setdefault(name.lower(), value)

    def header(self, name: str) -> str | None:
        """First value of a header, case-insensitively; None when absent."""
        return self.first.get(name.lower())

    def has_header(self, name: str) -> bool:
        return name.lower() in self.first

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]


@dataclass
class Exchange:
    """A request (parsed or not) on one flow, with the response status once seen."""
    flow: Hashable
    ts: float
    dst_ip: str
    dst_port: int
    source: str
    process: ProcessSnapshot | None
    head: RequestHead | None          # None: the bytes were not an HTTP request head
    raw: bytes = b""                  # the first bytes, kept for unparsed requests
    status: int | None = None
    truncated: bool = False           # part of the head was not captured


@dataclass(frozen=True)
class Classification:
    provider: str    # aws aliyun azure gcp oci openstack digitalocean tencent unknown
    mode: str        # normal hardened n/a unknown
    problems: tuple[str, ...] = ()
    level: str = "INFO"   # WARNING for normal mode, ERROR for problems, else INFO
    note: str | None = None  # why, when the level was lowered (e.g. another cloud's probe)


@dataclass(frozen=True)
class ProcessInfo:
    pid: int | None
    comm: str | None
    argv: tuple[str, ...] | None
    exe: str | None = None
    argv_truncated: bool = False  # argv is the start of a longer one (shown with a marker)


@dataclass(frozen=True)
class Container:
    runtime: str            # docker containerd cri-o podman kubernetes systemd-nspawn lxc
    id: str | None
    pod_uid: str | None = None


@dataclass(frozen=True)
class ClientFinding:
    """Which client sent a request (clients.py) and the fix for a normal-mode one."""
    name: str | None          # None: not recognised
    version: str | None
    min_hardened: str | None  # the provider's documented minimum for hardened mode
    advice: str | None        # an advice word (clients.advise); None: nothing to do
    source: str | None = None  # where min_hardened comes from


@dataclass(frozen=True)
class Owner:
    """Who runs the sender (owner.py): each field None when it cannot be read, never guessed."""
    unit: str | None = None               # systemd unit from the cgroup path
    package: str | None = None            # OS package owning the executable
    k8s_namespace: str | None = None
    k8s_pod: str | None = None
    k8s_container: str | None = None
    container_name: str | None = None     # Docker / containerd name
    image: str | None = None


@dataclass
class RequestRecord:
    """Everything the sinks need about one request. Secrets already redacted."""
    time: float
    level: str
    provider: str
    mode: str
    problems: tuple[str, ...]
    method: str | None
    path: str | None
    version: str | None
    headers: dict[str, str]
    dst_ip: str
    dst_port: int
    status: int | None
    source: str
    process: ProcessInfo | None
    parents: tuple[ProcessInfo, ...] = ()
    uid: int | None = None
    cgroup_id: int | None = None
    container: Container | None = None
    note: str | None = None
    truncated: bool = False
    raw_excerpt: str | None = None  # escaped, for unparsed requests only
    extra: dict = field(default_factory=dict)
    user_agent: str | None = None   # escaped, at most clients.UA_MAX characters
    client: ClientFinding | None = None
    reads: str | None = None        # credentials user-data identity token other (classify.reads_of)
    fallback: str | None = None     # token_put_<status|unanswered>, mixed (fallback.py)
    owner: Owner | None = None
