"""A fake cloud instance metadata service (IMDS) for tests.

One HTTP/1.1 server (stdlib ``http.server``, threaded, keep-alive, every response with a
``Content-Length``) that can listen on several addresses at once (IPv4 and IPv6) and answers
in the style of the provider a request is meant for:

AWS (any bound address not listed as Alibaba; paths ``/latest/...``, ``/<yyyy-mm-dd>/...``,
``/1.0/...``)
    ``PUT /latest/api/token`` with ``X-aws-ec2-metadata-token-ttl-seconds: 1..21600`` -> 200 and
    a new token (response header repeats the TTL). ``X-Forwarded-For`` on the PUT -> 403;
    TTL missing -> 400; TTL not an integer or outside 1..21600 -> 400; another method on the
    token path -> 405. ``GET``/``HEAD`` of metadata with a valid ``X-aws-ec2-metadata-token``
    -> 200 (404 for unknown paths); a present but invalid, expired or empty token -> 401;
    no token -> 200 in ``optional`` mode, 401 in ``required`` mode. Other methods -> 405.
    Paths: ``meta-data/`` (instance-id, ami-id, hostname, local-ipv4, placement/region, mac,
    iam/info, iam/security-credentials/ and ``.../<role>`` credentials JSON), ``dynamic/
    instance-identity/document``, ``user-data``.

Alibaba ECS (requests to an address in ``aliyun_addrs``, default ``100.100.100.200``)
    The same rules with ``X-aliyun-ecs-metadata-token-ttl-seconds`` /
    ``X-aliyun-ecs-metadata-token`` (Alibaba documents the 1..21600 range and that
    X-Forwarded-For is refused, but not the status codes: AWS's codes are used). RAM role
    credentials live under ``meta-data/ram/security-credentials/<role>``.

Azure (``/metadata/...``)
    ``X-Forwarded-For`` -> 400; no ``Metadata: true`` -> 400 "Required metadata header not
    specified"; no ``api-version`` query (except ``/metadata/versions``) -> 400 "api-version was
    not specified"; unknown api-version -> 400; methods other than GET/POST -> 405. Paths:
    ``/metadata/instance[/compute/...]``, ``/metadata/attested/document``,
    ``/metadata/identity/oauth2/token``, ``/metadata/versions``.

GCP (``/computeMetadata/...``)
    no ``Metadata-Flavor: Google`` or an ``X-Forwarded-For`` -> 403; otherwise 200/404, with
    ``Metadata-Flavor: Google`` on the response.

OCI (``/opc/v1/...`` and ``/opc/v2/...``)
    v1 answers anyone; v2 needs ``Authorization: Bearer Oracle`` (else 401).

Anything else -> 404.

Token mode (``optional`` or ``required``) is set per provider (``aws``, ``aliyun``).

Token PUT (``token_put``, ``--token-put``): ``ok`` (the rules above), ``refuse`` (every token PUT
-> 403, as a proxy or a policy in the path does) or ``drop`` (a token PUT is read and never
answered: the connection stays silent until the client gives up, as when the PUT response
hop limit is too low for a container). Recorded with status ``null``.

Every token the server issues is recorded (`FakeIMDS.issued_tokens`), so tests can check that
no output of the product ever contains one. Every request is recorded too
(`FakeIMDS.records`, and as JSON lines in ``log_path`` when given) with the local and peer
address, method, target, headers, the provider the server answered as and the status.

Use it in-process::

    srv = FakeIMDS(modes={"aws": "required"})
    srv.start([("127.0.0.1", 0)])
    host, port = srv.addresses[0]
    ...
    srv.stop()

or as a program (it prints ``READY host port`` per address on stdout once listening, and stops
cleanly on SIGTERM/SIGINT)::

    python -m tests.lab.fake_imds --bind 169.254.169.254 --bind 100.100.100.200 \
        --bind fd00:ec2::254 --mode optional --log /tmp/imds.jsonl
"""
from __future__ import annotations

import argparse
import json
import re
import secrets
import signal
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterable
from urllib.parse import parse_qs, urlsplit

from tests.lab import SLOW

AWS = "aws"
ALIYUN = "aliyun"
AZURE = "azure"
GCP = "gcp"
OCI = "oci"
UNKNOWN = "unknown"

MODES = ("optional", "required")
TOKEN_PUT_MODES = ("ok", "refuse", "drop")
TTL_MIN, TTL_MAX = 1, 21600
DEFAULT_ALIYUN_ADDRS = frozenset({"100.100.100.200"})
METADATA_ADDRS = ("169.254.169.254", "100.100.100.200", "fd00:ec2::254")

TOKEN_HEADERS = {
    AWS: ("x-aws-ec2-metadata-token-ttl-seconds", "x-aws-ec2-metadata-token"),
    ALIYUN: ("x-aliyun-ecs-metadata-token-ttl-seconds", "x-aliyun-ecs-metadata-token"),
}

TTL_HEADER_AS_SENT = {AWS: "X-aws-ec2-metadata-token-ttl-seconds",
                      ALIYUN: "X-aliyun-ecs-metadata-token-ttl-seconds"}

AZURE_API_VERSIONS = (
    "2017-03-01", "2017-04-02", "2017-08-01", "2017-12-01", "2018-02-01", "2018-04-02",
    "2018-10-01", "2019-02-01", "2019-03-11", "2019-04-30", "2019-06-01", "2019-06-04",
    "2019-08-01", "2019-08-15", "2019-11-01", "2020-06-01", "2020-07-15", "2020-09-01",
    "2020-10-01", "2020-12-01", "2021-01-01", "2021-02-01", "2021-03-01", "2021-05-01",
    "2021-10-01", "2021-11-01", "2021-11-15", "2021-12-13", "2023-07-01", "2023-11-15",
    "2024-03-15", "2025-04-07",
)

_DATE_PATH = re.compile(r"^/(latest|\d{4}-\d{2}-\d{2}|1\.0)(/.*)?$")

AWS_ROLE = "lab-instance-role"
ALIYUN_ROLE = "lab-ram-role"


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _credentials(kind: str) -> str:
    now = time.time()
    if kind == AWS:
        body = {
            "Code": "Success", "LastUpdated": _iso(now), "Type": "AWS-HMAC",
            "AccessKeyId": "ASIALABFAKEKEY000001",
            "SecretAccessKey": "labFakeSecretAccessKey0000000000000000000",
            "Token": "labFakeSessionToken" + "0" * 40,
            "Expiration": _iso(now + 6 * 3600),
        }
    else:
        body = {
            "AccessKeyId": "STS.labFakeKey0001",
            "AccessKeySecret": "labFakeAccessKeySecret000000000000",
            "Expiration": _iso(now + 6 * 3600),
            "SecurityToken": "labFakeSecurityToken" + "0" * 40,
            "LastUpdated": _iso(now), "Code": "Success",
        }
    return json.dumps(body, indent=2)


def _ec2_tree(kind: str) -> dict[str, str]:
    """Path below ``/latest`` -> body, for AWS or Alibaba."""
    if kind == AWS:
        iid, role, creds_dir = "i-0123456789abcdef0", AWS_ROLE, "iam/security-credentials"
        ident = {
            "accountId": "123456789012", "architecture": "x86_64",
            "availabilityZone": "us-east-1a", "imageId": "ami-0abcdef1234567890",
            "instanceId": iid, "instanceType": "t3.micro", "privateIp": "10.0.0.12",
            "region": "us-east-1", "version": "2017-09-30",
        }
        region = "us-east-1"
    else:
        iid, role, creds_dir = "i-bp1labfake0000000001", ALIYUN_ROLE, "ram/security-credentials"
        ident = {
            "account-id": "1234567890123456", "instance-id": iid,
            "image-id": "aliyun_3_x64_20G_alibase_20240528.vhd", "region-id": "cn-hangzhou",
            "zone-id": "cn-hangzhou-i", "private-ipv4": "172.16.0.12",
            "serial-number": "lab-serial-0001", "owner-account-id": "1234567890123456",
        }
        region = "cn-hangzhou"
    tree = {
        "/meta-data/instance-id": iid,
        "/meta-data/ami-id" if kind == AWS else "/meta-data/image-id": ident.get(
            "imageId", ident.get("image-id")),
        "/meta-data/hostname": "ip-10-0-0-12.ec2.internal" if kind == AWS else "iZbp1labfakeZ",
        "/meta-data/local-ipv4": "10.0.0.12" if kind == AWS else "172.16.0.12",
        "/meta-data/mac": "02:00:00:00:00:01",
        "/meta-data/placement/region" if kind == AWS else "/meta-data/region-id": region,
        f"/meta-data/{creds_dir}/": role,
        f"/meta-data/{creds_dir}/{role}": None,  # generated per request (fresh timestamps)
        "/dynamic/instance-identity/document": json.dumps(ident, indent=2),
        "/user-data": "#!/bin/sh\necho lab user-data\n",
    }
    if kind == AWS:
        tree["/meta-data/placement/availability-zone"] = "us-east-1a"
        tree["/meta-data/iam/info"] = json.dumps({
            "Code": "Success", "LastUpdated": _iso(time.time()),
            "InstanceProfileArn": f"arn:aws:iam::123456789012:instance-profile/{AWS_ROLE}",
            "InstanceProfileId": "AIPALABFAKE000000001"})
    # directory listings
    listing: dict[str, set[str]] = {}
    for path in list(tree):
        if path.endswith("/"):
            continue
        parts = path.strip("/").split("/")
        for i in range(1, len(parts)):
            parent = "/" + "/".join(parts[:i]) + "/"
            child = parts[i] + ("/" if i < len(parts) - 1 else "")
            if child:
                listing.setdefault(parent, set()).add(child)
    listing.setdefault("/", set()).update({"meta-data/", "dynamic/", "user-data"})
    for parent, children in listing.items():
        tree.setdefault(parent, "\n".join(sorted(children)))
    tree["/meta-data"] = tree["/meta-data/"]
    tree[""] = tree["/"]
    return tree


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, host: str, port: int, owner: "FakeIMDS"):
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.owner = owner
        self.bound_host = host
        super().__init__((host, port), _Handler)

    def server_bind(self):
        if self.address_family == socket.AF_INET6:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        super().server_bind()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "EC2ws"
    sys_version = ""
    timeout = 30 * SLOW  # idle keep-alive connections are dropped after this (an agent start
    # under qemu/TCG may take 90 s, and "started after the connection opened" tests wait that)

    def log_message(self, format, *args):  # noqa: A002 - stdlib signature
        pass

    # every method goes through the same dispatcher
    def do_GET(self):
        self._dispatch()

    do_HEAD = do_PUT = do_POST = do_DELETE = do_PATCH = do_OPTIONS = do_GET

    def _dispatch(self):
        owner: FakeIMDS = self.server.owner
        body = b""
        length = self.headers.get("Content-Length")
        if length:
            try:
                n = int(length)
            except ValueError:
                n = 0
            if n > 0:
                body = self.rfile.read(min(n, 1 << 20))
        local = self.connection.getsockname()
        peer = self.client_address
        resp = owner.handle(self.command, self.path, list(self.headers.items()),
                            local_ip=local[0], body=body)
        if resp.status is None:
            self._stay_silent(owner, local, peer)
            return
        record = {
            "time": time.time(),
            "local_ip": local[0], "local_port": local[1],
            "peer_ip": peer[0], "peer_port": peer[1],
            "method": self.command, "target": self.path, "version": self.request_version,
            "headers": [[k, v] for k, v in self.headers.items()],
            "body_len": len(body),
            "provider": resp.provider, "status": resp.status,
            "token_issued": resp.token,
        }
        owner._record(record)
        data = resp.body.encode() if isinstance(resp.body, str) else resp.body
        self.send_response(resp.status)
        for name, value in resp.headers:
            self.send_header(name, value)
        self.send_header("Content-Type", resp.content_type)
        self.send_header("Content-Length", str(len(data)))
        if resp.close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)


    def _stay_silent(self, owner: "FakeIMDS", local, peer) -> None:
        """A dropped request: recorded, never answered; wait for the client to give up."""
        owner._record({
            "time": time.time(), "local_ip": local[0], "local_port": local[1],
            "peer_ip": peer[0], "peer_port": peer[1], "method": self.command,
            "target": self.path, "version": self.request_version,
            "headers": [[k, v] for k, v in self.headers.items()], "body_len": 0,
            "provider": UNKNOWN, "status": None, "token_issued": None})
        self.connection.settimeout(self.timeout)
        try:
            while self.connection.recv(4096):
                pass
        except OSError:
            pass
        self.close_connection = True


class Response:
    """What `FakeIMDS.handle` decided: status, body, extra headers, and the provider."""

    def __init__(self, status: int | None, body: str | bytes = "", *,
                 provider: str = UNKNOWN,
                 headers: Iterable[tuple[str, str]] = (), content_type: str = "text/plain",
                 token: str | None = None, close: bool = False):
        self.status = status
        self.body = body
        self.provider = provider
        self.headers = list(headers)
        self.content_type = content_type
        self.token = token
        self.close = close

    def __repr__(self):
        return f"Response({self.status}, provider={self.provider!r})"


class FakeIMDS:
    """The fake metadata service: request semantics, token store, recording, listeners.

    Args:
        modes: token mode per provider, ``{"aws": "optional"|"required", "aliyun": ...}``;
            missing providers use ``default_mode``.
        default_mode: ``"optional"`` (normal and hardened accepted) or ``"required"``.
        aliyun_addrs: local addresses that answer as Alibaba ECS (``100.100.100.200``).
        log_path: when set, every request is appended to this file as one JSON line.
        token_put: ``ok``, ``refuse`` (403) or ``drop`` (never answered) for token PUTs.
    """

    def __init__(self, modes: dict[str, str] | None = None, default_mode: str = "optional",
                 aliyun_addrs: Iterable[str] = DEFAULT_ALIYUN_ADDRS,
                 log_path: str | None = None, token_put: str = "ok"):
        if token_put not in TOKEN_PUT_MODES:
            raise ValueError(f"token_put must be one of {TOKEN_PUT_MODES}, not {token_put!r}")
        self.token_put = token_put
        if default_mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {default_mode!r}")
        self.modes = {AWS: default_mode, ALIYUN: default_mode}
        for prov, mode in (modes or {}).items():
            if prov not in self.modes or mode not in MODES:
                raise ValueError(f"bad token mode {prov}={mode}")
            self.modes[prov] = mode
        self.aliyun_addrs = set(aliyun_addrs)
        self.log_path = log_path
        self._lock = threading.Lock()
        self._tokens: dict[str, tuple[str, float]] = {}  # token -> (provider, expiry)
        self.issued_tokens: list[str] = []
        self.records: list[dict] = []
        self._servers: list[_Server] = []
        self._threads: list[threading.Thread] = []
        self._log = open(log_path, "a", encoding="utf-8") if log_path else None
        self._trees = {AWS: _ec2_tree(AWS), ALIYUN: _ec2_tree(ALIYUN)}

    # ------------------------------------------------------------------ listeners
    def start(self, binds: Iterable[tuple[str, int]]) -> list[tuple[str, int]]:
        """Listen on every ``(host, port)`` (port 0: a free one) and serve in threads.

        Returns the ``(host, port)`` pairs actually bound (also in `addresses`).
        """
        try:
            for host, port in binds:
                srv = _Server(host, port, self)
                self._servers.append(srv)
                t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05},
                                     name=f"fake-imds-{host}", daemon=True)
                t.start()
                self._threads.append(t)
        except BaseException:
            self.stop()
            raise
        return self.addresses

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return [(s.bound_host, s.server_address[1]) for s in self._servers]

    def stop(self) -> None:
        """Stop every listener and close the request log. Safe to call twice."""
        for srv in self._servers:
            srv.shutdown()
            srv.server_close()
        for t in self._threads:
            t.join(timeout=5)
        self._servers.clear()
        self._threads.clear()
        with self._lock:
            if self._log:
                self._log.close()
                self._log = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    # ------------------------------------------------------------------ recording
    def _record(self, record: dict) -> None:
        with self._lock:
            self.records.append(record)
            if self._log:
                self._log.write(json.dumps(record) + "\n")
                self._log.flush()

    def issue_token(self, provider: str, ttl: int) -> str:
        """Make, remember and return a new token for `provider`, valid for `ttl` seconds."""
        token = "AQAEA" + secrets.token_urlsafe(42)
        with self._lock:
            self._tokens[token] = (provider, time.monotonic() + ttl)
            self.issued_tokens.append(token)
        return token

    def token_valid(self, provider: str, token: str) -> bool:
        with self._lock:
            entry = self._tokens.get(token)
        return bool(entry) and entry[0] == provider and entry[1] > time.monotonic()

    # ------------------------------------------------------------------ semantics
    def handle(self, method: str, target: str, headers: list[tuple[str, str]], *,
               local_ip: str = "169.254.169.254", body: bytes = b"") -> Response:
        """Decide the response to one request. Pure apart from token issuing."""
        hdrs: dict[str, str] = {}
        for k, v in headers:
            hdrs.setdefault(k.lower(), v)
        split = urlsplit(target)
        path = split.path
        if local_ip.startswith("::ffff:"):
            local_ip = local_ip[7:]
        if local_ip in self.aliyun_addrs:
            return self._ec2(ALIYUN, method, path, hdrs)
        if path.startswith("/metadata/") or path == "/metadata":
            return self._azure(method, path, split.query, hdrs)
        if path.startswith("/computeMetadata/"):
            return self._gcp(method, path, hdrs)
        if path.startswith("/opc/"):
            return self._oci(method, path, hdrs)
        if _DATE_PATH.match(path):
            return self._ec2(AWS, method, path, hdrs)
        return Response(404, "Not Found\n", provider=UNKNOWN)

    def _ec2(self, prov: str, method: str, path: str, hdrs: dict[str, str]) -> Response:
        ttl_name, token_name = TOKEN_HEADERS[prov]
        server = [("Server", "EC2ws" if prov == AWS else "Tengine")]
        m = _DATE_PATH.match(path)
        if not m:
            return Response(404, "Not Found\n", provider=prov, headers=server)
        rest = m.group(2) or ""
        if m.group(1) == "latest" and rest == "/api/token":
            if method != "PUT":
                return Response(405, "Method Not Allowed\n", provider=prov,
                                headers=server + [("Allow", "PUT")])
            if self.token_put == "refuse":
                return Response(403, "Forbidden\n", provider=prov, headers=server)
            if self.token_put == "drop":
                return Response(None, provider=prov)
            if "x-forwarded-for" in hdrs:
                return Response(403, "Forbidden\n", provider=prov, headers=server)
            raw = hdrs.get(ttl_name)
            if raw is None:
                return Response(400, "Bad Request: missing TTL header\n", provider=prov,
                                headers=server)
            try:
                ttl = int(raw.strip())
            except ValueError:
                ttl = -1
            if not TTL_MIN <= ttl <= TTL_MAX:
                return Response(400, "Bad Request: TTL out of range\n", provider=prov,
                                headers=server)
            token = self.issue_token(prov, ttl)
            return Response(200, token, provider=prov, token=token,
                            headers=server + [(TTL_HEADER_AS_SENT[prov], str(ttl))])
        if method not in ("GET", "HEAD"):
            return Response(405, "Method Not Allowed\n", provider=prov,
                            headers=server + [("Allow", "GET, HEAD")])
        if token_name in hdrs:
            if not self.token_valid(prov, hdrs[token_name].strip()):
                return Response(401, "Unauthorized\n", provider=prov, headers=server)
        elif self.modes[prov] == "required":
            return Response(401, "Unauthorized\n", provider=prov, headers=server)
        tree = self._trees[prov]
        if rest not in tree and rest.endswith("/") and rest[:-1] in tree:
            rest = rest[:-1]  # IMDS serves a leaf with a trailing slash too (botocore uses it)
        if rest in tree:
            body = tree[rest]
            if body is None:
                body = _credentials(prov)
            return Response(200, body, provider=prov, headers=server)
        return Response(404, "Not Found\n", provider=prov, headers=server)

    def _azure(self, method: str, path: str, query: str, hdrs: dict[str, str]) -> Response:
        ctype = "application/json; charset=utf-8"

        def err(status: int, msg: str) -> Response:
            return Response(status, json.dumps({"error": msg}), provider=AZURE,
                            content_type=ctype)

        if method not in ("GET", "POST"):
            return err(405, "Method not allowed. Only GET and POST requests are supported")
        if "x-forwarded-for" in hdrs:
            return err(400, "Bad request. Requests with an X-Forwarded-For header are "
                            "rejected")
        if hdrs.get("metadata", "").strip().lower() != "true":
            return err(400, "Bad request. Required metadata header not specified")
        path = path.rstrip("/") or "/"
        if path == "/metadata/versions":
            return Response(200, json.dumps({"apiVersions": list(AZURE_API_VERSIONS)}),
                            provider=AZURE, content_type=ctype)
        qs = parse_qs(query, keep_blank_values=True)
        version = (qs.get("api-version") or [""])[0]
        if not version:
            return err(400, "Bad request. api-version was not specified in the request. "
                            "For more information refer to aka.ms/azureimds")
        if version not in AZURE_API_VERSIONS:
            return Response(400, json.dumps({
                "error": "Bad request. api-version is invalid or was not specified in the "
                         "request. For more information refer to aka.ms/azureimds",
                "newest-versions": list(AZURE_API_VERSIONS[-3:][::-1])}),
                provider=AZURE, content_type=ctype)
        compute = {"azEnvironment": "AzurePublicCloud", "location": "westeurope",
                   "name": "lab-vm", "osType": "Linux", "vmId": "02aab8a4-74ef-476e-8182-"
                   "f6d2ba4166a6", "vmSize": "Standard_B1s", "resourceGroupName": "lab-rg",
                   "subscriptionId": "00000000-0000-0000-0000-000000000000"}
        if path == "/metadata/instance":
            return Response(200, json.dumps({"compute": compute, "network": {"interface": []}}),
                            provider=AZURE, content_type=ctype)
        if path.startswith("/metadata/instance/compute/"):
            key = path.rsplit("/", 1)[1]
            if key in compute:
                fmt = (qs.get("format") or ["json"])[0]
                body = compute[key] if fmt == "text" else json.dumps(compute[key])
                return Response(200, body, provider=AZURE,
                                content_type="text/plain" if fmt == "text" else ctype)
            return err(404, "Not found")
        if path == "/metadata/instance/compute":
            return Response(200, json.dumps(compute), provider=AZURE, content_type=ctype)
        if path == "/metadata/attested/document":
            return Response(200, json.dumps({"encoding": "pkcs7", "signature": "TGFiRmFrZQ=="}),
                            provider=AZURE, content_type=ctype)
        if path == "/metadata/identity/oauth2/token":
            if not (qs.get("resource") or [""])[0]:
                return err(400, "Required audience parameter not specified")
            return Response(200, json.dumps({
                "access_token": "labFakeAzureAccessToken", "expires_in": "86399",
                "resource": qs["resource"][0], "token_type": "Bearer"}),
                provider=AZURE, content_type=ctype)
        return err(404, "Not found")

    def _gcp(self, method: str, path: str, hdrs: dict[str, str]) -> Response:
        flavor = [("Metadata-Flavor", "Google")]
        if "x-forwarded-for" in hdrs or hdrs.get("metadata-flavor", "").strip() != "Google":
            return Response(403, "Missing required header: Metadata-Flavor\n", provider=GCP,
                            content_type="text/html", headers=flavor)
        if method != "GET":
            return Response(405, "Method Not Allowed\n", provider=GCP, headers=flavor)
        tree = {
            "/computeMetadata/v1/instance/id": "4520031799277581759",
            "/computeMetadata/v1/instance/hostname": "lab-vm.c.lab-project.internal",
            "/computeMetadata/v1/instance/zone": "projects/123456789012/zones/europe-west1-b",
            "/computeMetadata/v1/project/project-id": "lab-project",
            "/computeMetadata/v1/instance/service-accounts/default/email":
                "123456789012-compute@developer.gserviceaccount.com",
            "/computeMetadata/v1/instance/service-accounts/default/token": json.dumps({
                "access_token": "labFakeGcpAccessToken", "expires_in": 3599,
                "token_type": "Bearer"}),
            "/computeMetadata/v1/": "instance/\noauth/\nproject/\n",
        }
        if path in tree:
            ctype = "application/json" if path.endswith("/token") else "application/text"
            return Response(200, tree[path], provider=GCP, headers=flavor, content_type=ctype)
        return Response(404, "Not Found\n", provider=GCP, headers=flavor,
                        content_type="text/html")

    def _oci(self, method: str, path: str, hdrs: dict[str, str]) -> Response:
        if not (path.startswith("/opc/v1/") or path.startswith("/opc/v2/")):
            return Response(404, "Not Found\n", provider=OCI)
        if path.startswith("/opc/v2/") and \
                hdrs.get("authorization", "").strip() != "Bearer Oracle":
            return Response(401, json.dumps({"code": "NotAuthenticated",
                                             "message": "Not authenticated"}),
                            provider=OCI, content_type="application/json")
        if method != "GET":
            return Response(405, "Method Not Allowed\n", provider=OCI)
        rest = path.split("/", 3)[3]
        instance = {"id": "ocid1.instance.oc1.phx.labfake", "region": "phx",
                    "shape": "VM.Standard.E4.Flex", "displayName": "lab-vm"}
        if rest in ("instance", "instance/"):
            return Response(200, json.dumps(instance), provider=OCI,
                            content_type="application/json")
        if rest.startswith("instance/") and rest[9:] in instance:
            return Response(200, instance[rest[9:]], provider=OCI)
        return Response(404, "Not Found\n", provider=OCI)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.lab.fake_imds",
                                 description="Fake cloud instance metadata service (tests only).")
    ap.add_argument("--bind", action="append", metavar="ADDR", required=True,
                    help="address to listen on (repeatable; IPv4 or IPv6)")
    ap.add_argument("--port", type=int, default=80, help="TCP port (default 80; 0: free port)")
    ap.add_argument("--mode", choices=MODES, default="optional",
                    help="token mode for every provider (default optional)")
    ap.add_argument("--aws-mode", choices=MODES, help="token mode for AWS")
    ap.add_argument("--aliyun-mode", choices=MODES, help="token mode for Alibaba")
    ap.add_argument("--aliyun-addr", action="append", metavar="ADDR",
                    help="addresses that answer as Alibaba (default 100.100.100.200)")
    ap.add_argument("--log", metavar="FILE", help="append every request as a JSON line")
    ap.add_argument("--token-put", choices=TOKEN_PUT_MODES, default="ok",
                    help="token PUTs: ok, refuse (403) or drop (never answered)")
    args = ap.parse_args(argv)
    modes = {}
    if args.aws_mode:
        modes[AWS] = args.aws_mode
    if args.aliyun_mode:
        modes[ALIYUN] = args.aliyun_mode
    srv = FakeIMDS(modes=modes, default_mode=args.mode,
                   aliyun_addrs=args.aliyun_addr or DEFAULT_ALIYUN_ADDRS, log_path=args.log,
                   token_put=args.token_put)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        bound = srv.start([(a, args.port) for a in args.bind])
    except OSError as exc:
        print(f"fake_imds: cannot listen: {exc}", file=sys.stderr)
        return 1
    for host, port in bound:
        print(f"READY {host} {port}", flush=True)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        srv.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
