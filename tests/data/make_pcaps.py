#!/usr/bin/env python3
"""Regenerate the committed replay corpus (tests/data/*.pcap, *.pcapng, bad/*, expected.json).

Every capture is made by real clients (curl, python http.client and raw sockets, botocore's
metadata fetcher) talking to the fake IMDS (`tests.lab.fake_imds`) inside a throw-away network
namespace (`tests.lab.netns.Lab`), recorded by tcpdump on the namespace's loopback.

expected.json is written from what actually happened, never hand-typed: for every request the
fake server answered (its request log: method, target, headers, destination address, status),
in capture order, the expected ``provider``, ``mode`` and sorted ``problems`` are computed by
`expect()` below -- an independent statement of the SPEC §2 classification table, kept apart
from the product's code on purpose. The tokens the server issued are saved too
(``issued_tokens``): no output of the product may ever contain one.

Usage (root; from the repository root)::

    .venv/bin/python tests/data/make_pcaps.py            # rewrite tests/data
    .venv/bin/python tests/data/make_pcaps.py --out DIR  # somewhere else

Needs: iproute2, tcpdump, curl, editcap (tshark/wireshark-common), botocore; for the SDK
captures (sdk_versions, fallback_*) pip, npm and node, and Python <= 3.9 for botocore 1.12
(tests.lab.clients installs the SDKs into /var/cache/imds-tracer-lab/clients).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.lab.clients import sdk_command  # noqa: E402
from tests.lab.netns import ALIYUN_IP, AWS_IP, AWS_IP6, Lab  # noqa: E402

A4 = f"http://{AWS_IP}"
A6 = f"http://[{AWS_IP6}]"
ALI = f"http://{ALIYUN_IP}"
AWS_TTL = "X-aws-ec2-metadata-token-ttl-seconds"
AWS_TOK = "X-aws-ec2-metadata-token"
ALI_TTL = "X-aliyun-ecs-metadata-token-ttl-seconds"
ALI_TOK = "X-aliyun-ecs-metadata-token"
CURL = ["curl", "-sS", "--max-time", "5", "-o", "/dev/null", "-w", "%{http_code}\\n"]

# --------------------------------------------------------------------------- the oracle
_EC2_PATH = re.compile(r"^/(latest|\d{4}-\d{2}-\d{2}|1\.0)(/|$)")
TOKEN_NAMES = {"aws": (AWS_TTL.lower(), AWS_TOK.lower()),
               "aliyun": (ALI_TTL.lower(), ALI_TOK.lower())}


def expect(rec: dict) -> dict:
    """SPEC §2 applied to one request the fake server saw: provider, mode, sorted problems.

    Decisions where the SPEC table leaves room (they match the lead's classify.py):
    a PUT to the token path is a hardened-mode attempt even without its TTL header
    (-> ttl_missing); ``invalid_token`` needs a non-empty token header answered 401/403;
    an empty token header is ``empty_token`` only; /opc/v2 without the bearer is hardened
    with ``missing_bearer``.
    """
    hdrs: dict[str, str] = {}
    for k, v in rec["headers"]:
        hdrs.setdefault(k.lower(), v)
    target = rec["target"]
    path = urlsplit(target).path
    query = urlsplit(target).query
    dst = rec["local_ip"]
    status = rec["status"]
    problems: list[str] = []
    if dst == ALIYUN_IP:
        provider = "aliyun"
    elif any(h.startswith("x-aws-ec2-metadata-") for h in hdrs):
        provider = "aws"
    elif path.startswith("/metadata/"):
        provider = "azure"
    elif path.startswith("/computeMetadata/") or "metadata-flavor" in hdrs:
        provider = "gcp"
    elif path.startswith("/opc/"):
        provider = "oci"
    elif _EC2_PATH.match(path):
        provider = "aws"
    else:
        provider = "unknown"

    if provider in ("aws", "aliyun"):
        ttl_h, tok_h = TOKEN_NAMES[provider]
        mode = "normal"
        if rec["method"] == "PUT" and path == "/latest/api/token":
            mode = "hardened"
            if ttl_h not in hdrs:
                problems.append("ttl_missing")
            else:
                v = hdrs[ttl_h].strip()
                if not (v.isdigit() and 1 <= int(v) <= 21600):
                    problems.append("ttl_out_of_range")
            if "x-forwarded-for" in hdrs:
                problems.append("x_forwarded_for")
        elif tok_h in hdrs:
            mode = "hardened"
            if not hdrs[tok_h].strip():
                problems.append("empty_token")
            elif status in (401, 403):
                problems.append("invalid_token")
    elif provider == "azure":
        mode = "n/a"
        if hdrs.get("metadata", "").strip().lower() != "true":
            problems.append("missing_metadata_header")
        if "api-version" not in {kv.split("=", 1)[0] for kv in query.split("&") if kv}:
            problems.append("missing_api_version")
        if "x-forwarded-for" in hdrs:
            problems.append("x_forwarded_for")
    elif provider == "gcp":
        mode = "n/a"
        if hdrs.get("metadata-flavor", "").strip() != "Google":
            problems.append("missing_metadata_flavor")
    elif provider == "oci":
        if path.startswith("/opc/v1/"):
            mode = "normal"
        else:
            mode = "hardened"
            if hdrs.get("authorization", "").strip() != "Bearer Oracle":
                problems.append("missing_bearer")
    else:
        mode = "unknown"
    return {"provider": provider, "mode": mode, "problems": sorted(problems)}


SECRET_HEADERS = {AWS_TOK.lower(), ALI_TOK.lower(), "authorization"}


def level_of(exp: dict) -> str:
    if exp["mode"] == "normal":
        return "WARNING"
    return "ERROR" if exp["problems"] else "INFO"


# --------------------------------------------------------------------------- clients
def curl(lab: Lab, url: str, *args: str, method: str | None = None, out: bool = False) -> str:
    """One curl run inside the lab; returns the body (out=True) or the status code line."""
    argv = ["curl", "-sS", "--max-time", "5"] if out else list(CURL)
    if method:
        argv += ["-X", method]
    argv += [*args, url]
    proc = lab.run(argv, check=True)
    return proc.stdout.strip()


def token(lab: Lab, base: str, ttl_h: str, ttl: str = "21600") -> str:
    tok = curl(lab, f"{base}/latest/api/token", "-H", f"{ttl_h}: {ttl}", method="PUT", out=True)
    assert tok.startswith("AQAEA"), tok
    return tok


def py(lab: Lab, code: str) -> str:
    return lab.run([sys.executable, "-c", code], check=True).stdout


HTTP_CLIENT_SPLIT = r'''
import http.client, socket, time
# 1) http.client token PUT: head via putrequest/putheader/endheaders, body sent separately
c = http.client.HTTPConnection("169.254.169.254", 80, timeout=5)
c.putrequest("PUT", "/latest/api/token")
c.putheader("X-aws-ec2-metadata-token-ttl-seconds", "600")
c.putheader("Content-Length", "2")
c.endheaders()
time.sleep(0.05)
c.send(b"{}")
r = c.getresponse(); tok = r.read().decode(); assert r.status == 200, r.status
c.close()
# 2) http.client GET with the token
c = http.client.HTTPConnection("169.254.169.254", 80, timeout=5)
c.request("GET", "/latest/meta-data/placement/region", headers={"X-aws-ec2-metadata-token": tok})
assert c.getresponse().status == 200
c.close()
# 3) a raw socket GET whose head is split over three send() calls
s = socket.create_connection(("169.254.169.254", 80), timeout=5)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
for part in (b"GET /latest/meta-data/loc", b"al-ipv4 HTTP/1.1\r\nHost: 169.254.169.254\r\nUser-Ag",
             b"ent: split-sender/1.0\r\nAccept: */*\r\n\r\n"):
    s.sendall(part); time.sleep(0.05)
data = b""
while b"\r\n\r\n" not in data:
    data += s.recv(4096)
assert data.startswith(b"HTTP/1.1 200"), data[:40]
s.close()
# 4) http.client normal-mode GET (urllib-like, single send)
c = http.client.HTTPConnection("169.254.169.254", 80, timeout=5)
c.request("GET", "/latest/meta-data/mac")
assert c.getresponse().status == 200
c.close()
'''

KEEPALIVE = r'''
import http.client
c = http.client.HTTPConnection("100.100.100.200", 80, timeout=5)
c.request("PUT", "/latest/api/token", headers={"X-aliyun-ecs-metadata-token-ttl-seconds": "300"})
r = c.getresponse(); tok = r.read().decode(); assert r.status == 200
for p in ("/latest/meta-data/", "/latest/meta-data/instance-id", "/latest/meta-data/region-id"):
    c.request("GET", p, headers={"X-aliyun-ecs-metadata-token": tok})
    r = c.getresponse(); r.read(); assert r.status == 200, (p, r.status)
c.request("GET", "/latest/meta-data/image-id")          # a normal-mode one on the same connection
r = c.getresponse(); r.read(); assert r.status == 200
c.request("GET", "/latest/meta-data/nope", headers={"X-aliyun-ecs-metadata-token": tok})
r = c.getresponse(); r.read(); assert r.status == 404
c.close()
'''

# 100 requests on one keep-alive connection, the token-less kind: the resync tests remove
# frames from this capture (editcap) and expect every request after the hole back
KEEPALIVE_100 = r'''
import http.client
c = http.client.HTTPConnection("169.254.169.254", 80, timeout=5)
for i in range(100):
    c.request("GET", "/latest/meta-data/ka-%03d" % i)
    r = c.getresponse(); r.read(); assert r.status == 404, (i, r.status)
c.close()
'''

BOTOCORE = r'''
import sys
from botocore.utils import InstanceMetadataFetcher
mode = sys.argv[1]
cfg = {"ec2_metadata_service_endpoint_mode": mode}
f = InstanceMetadataFetcher(timeout=3, num_attempts=1, config=cfg)
creds = f.retrieve_iam_role_credentials()
assert creds.get("role_name") == "lab-instance-role", creds
print(creds["role_name"])
'''

BOTOCORE_REGION = r'''
from botocore.utils import InstanceMetadataRegionFetcher
r = InstanceMetadataRegionFetcher(timeout=3, num_attempts=1).retrieve_region()
assert r == "us-east-1", r
print(r)
'''


def scen_aws(lab: Lab) -> None:
    curl(lab, f"{A4}/latest/meta-data/instance-id")                       # normal
    tok = token(lab, A4, AWS_TTL)                                          # hardened PUT
    curl(lab, f"{A4}/latest/meta-data/instance-id", "-H", f"{AWS_TOK}: {tok}")
    curl(lab, f"{A4}/latest/meta-data/iam/security-credentials/lab-instance-role",
         "-H", f"{AWS_TOK}: {tok}")
    curl(lab, f"{A4}/latest/dynamic/instance-identity/document")           # normal
    curl(lab, f"{A4}/latest/user-data")                                    # normal
    curl(lab, f"{A4}/2021-07-15/meta-data/ami-id")                         # normal, dated path
    curl(lab, f"{A4}/latest/meta-data/", "-H", f"{AWS_TOK};")              # empty token: 401
    curl(lab, f"{A4}/latest/meta-data/", "-H", f"{AWS_TOK}: not-a-token")  # invalid: 401
    curl(lab, f"{A4}/latest/api/token", "-H", f"{AWS_TTL}: 0", method="PUT")     # 400
    curl(lab, f"{A4}/latest/api/token", "-H", f"{AWS_TTL}: ten", method="PUT")   # 400
    curl(lab, f"{A4}/latest/api/token", "-H", f"{AWS_TTL}: 60",
         "-H", "X-Forwarded-For: 203.0.113.7", method="PUT")              # 403


def scen_aws_required(lab: Lab) -> None:
    curl(lab, f"{A4}/latest/meta-data/instance-id")                       # normal, refused 401
    tok = token(lab, A4, AWS_TTL, "300")
    curl(lab, f"{A4}/latest/meta-data/instance-id", "-H", f"{AWS_TOK}: {tok}")  # 200
    curl(lab, f"{ALI}/latest/meta-data/instance-id")                      # aliyun normal, 401
    tok = token(lab, ALI, ALI_TTL, "300")
    curl(lab, f"{ALI}/latest/meta-data/instance-id", "-H", f"{ALI_TOK}: {tok}")


def scen_aliyun(lab: Lab) -> None:
    curl(lab, f"{ALI}/latest/meta-data/instance-id")                      # normal
    curl(lab, f"{ALI}/latest/meta-data/ram/security-credentials/lab-ram-role")  # normal
    tok = token(lab, ALI, ALI_TTL)
    curl(lab, f"{ALI}/latest/meta-data/ram/security-credentials/lab-ram-role",
         "-H", f"{ALI_TOK}: {tok}")
    curl(lab, f"{ALI}/latest/dynamic/instance-identity/document", "-H", f"{ALI_TOK}: {tok}")
    curl(lab, f"{ALI}/latest/user-data", "-H", f"{ALI_TOK}: {tok}")
    curl(lab, f"{ALI}/latest/meta-data/", "-H", f"{ALI_TOK};")           # empty token: 401


def scen_faq(lab: Lab) -> None:
    # The three failing commands of the Alibaba FAQ (seeds/000_*.txt), verbatim.
    curl(lab, f"{ALI}/latest/api/token", "-H", f"{ALI_TTL}: 21700", method="PUT")
    curl(lab, f"{ALI}/latest/api/token", "-H", "X-Forwarded-For: www.ba****.com", method="PUT")
    curl(lab, f"{ALI}/latest/meta-data/", "-H", f"{ALI_TOK}: aaa", "-v")
    # and the AWS equivalents
    curl(lab, f"{A4}/latest/api/token", "-H", f"{AWS_TTL}: 21700", method="PUT")
    curl(lab, f"{A4}/latest/api/token", "-H", "X-Forwarded-For: www.example.com", method="PUT")
    curl(lab, f"{A4}/latest/meta-data/", "-H", f"{AWS_TOK}: aaa")


def scen_ipv6(lab: Lab) -> None:
    curl(lab, f"{A6}/latest/meta-data/instance-id", "-g")                 # normal over IPv6
    tok = curl(lab, f"{A6}/latest/api/token", "-g", "-H", f"{AWS_TTL}: 120", method="PUT",
               out=True)
    curl(lab, f"{A6}/latest/meta-data/local-ipv4", "-g", "-H", f"{AWS_TOK}: {tok}")


def scen_httpclient(lab: Lab) -> None:
    py(lab, HTTP_CLIENT_SPLIT)


def scen_keepalive(lab: Lab) -> None:
    py(lab, KEEPALIVE)
    # curl reuses one connection for several URLs (normal mode, AWS)
    lab.run(["curl", "-sS", "--max-time", "5", "-o", "/dev/null", "-o", "/dev/null",
             "-o", "/dev/null", f"{A4}/latest/meta-data/instance-id",
             f"{A4}/latest/meta-data/hostname", f"{A4}/latest/meta-data/mac"], check=True)


def scen_keepalive_100(lab: Lab) -> None:
    py(lab, KEEPALIVE_100)


def scen_sdk(lab: Lab) -> None:
    # botocore's real IMDS client, IPv4 and IPv6 endpoints: token PUT, then token GETs
    assert "lab-instance-role" in lab.run([sys.executable, "-c", BOTOCORE, "ipv4"],
                                          check=True).stdout
    assert "lab-instance-role" in lab.run([sys.executable, "-c", BOTOCORE, "ipv6"],
                                          check=True).stdout
    assert "us-east-1" in py(lab, BOTOCORE_REGION)


def run_sdks(lab: Lab, *names: str) -> list[dict]:
    """Real SDKs (tests.lab.clients, installed from PyPI/npm) read instance credentials."""
    runs = []
    for name in names:
        argv, extra = sdk_command(name)
        env = lab.env()
        env.update(extra)
        proc = lab.run(argv, env=env, timeout=120)
        if proc.returncode != 0:
            raise SystemExit(f"{name} failed: {proc.stderr.strip()[-400:]}")
        runs.append({"sdk": name, "said": proc.stdout.strip().split("\n")[-1][:40]})
    return runs


def scen_sdk_versions(lab: Lab) -> list[dict]:
    # an IMDSv1-only old SDK next to a current one, per SDK family
    return run_sdks(lab, "botocore-1.12.253", "botocore-current", "aws-sdk-js-2.500.0",
                    "aws-sdk-js-2-current", "aws-sdk-js-v3", "alibabacloud-credentials-0.3.6",
                    "alibabacloud-credentials")


def scen_fallback_refused(lab: Lab) -> list[dict]:
    # the server (a proxy, a policy) answers every token PUT 403: capable SDKs fall back
    return run_sdks(lab, "botocore-current", "aws-sdk-js-2-current", "aws-sdk-js-v3",
                    "alibabacloud-credentials")


def scen_fallback_dropped(lab: Lab) -> list[dict]:
    # token PUTs are never answered (hop limit too low for a container): timeouts, fallback
    return run_sdks(lab, "botocore-current", "alibabacloud-credentials")


def scen_azure_gcp(lab: Lab) -> None:
    ok = f"{A4}/metadata/instance?api-version=2021-02-01"
    curl(lab, ok, "-H", "Metadata: true")                                      # 200
    curl(lab, ok)                                                              # 400 header
    curl(lab, f"{A4}/metadata/instance", "-H", "Metadata: true")               # 400 version
    curl(lab, ok, "-H", "Metadata: true", "-H", "X-Forwarded-For: 10.9.8.7")   # 400 XFF
    curl(lab, f"{A4}/metadata/instance/compute/vmId?api-version=2021-02-01&format=text",
         "-H", "Metadata: true")
    curl(lab, f"{A4}/metadata/identity/oauth2/token?api-version=2018-02-01"
              "&resource=https%3A%2F%2Fmanagement.azure.com%2F", "-H", "Metadata: true")
    curl(lab, f"{A4}/computeMetadata/v1/instance/id", "-H", "Metadata-Flavor: Google")  # 200
    curl(lab, f"{A4}/computeMetadata/v1/project/project-id")                   # 403
    curl(lab, f"{A4}/computeMetadata/v1/instance/service-accounts/default/token",
         "-H", "Metadata-Flavor: Google")


def scen_oci(lab: Lab) -> None:
    curl(lab, f"{A4}/opc/v1/instance/")                                        # legacy: normal
    curl(lab, f"{A4}/opc/v2/instance/", "-H", "Authorization: Bearer Oracle")  # hardened
    curl(lab, f"{A4}/opc/v2/instance/region")                                  # 401


# name -> (scenario, token mode of the fake server, output format[, token PUT handling])
SCENARIOS = {
    "aws.pcap": (scen_aws, "optional", "pcap"),
    "aws_required.pcap": (scen_aws_required, "required", "pcap"),
    "aliyun.pcap": (scen_aliyun, "optional", "pcap"),
    "faq_failures.pcap": (scen_faq, "optional", "pcap"),
    "ipv6.pcap": (scen_ipv6, "optional", "pcap"),
    "httpclient.pcap": (scen_httpclient, "optional", "pcap"),
    "keepalive.pcapng": (scen_keepalive, "optional", "pcapng"),
    "keepalive100.pcap": (scen_keepalive_100, "optional", "pcap"),
    "sdk.pcap": (scen_sdk, "optional", "pcap"),
    "azure_gcp.pcap": (scen_azure_gcp, "optional", "pcap"),
    "oci.pcap": (scen_oci, "optional", "pcap"),
    "sdk_versions.pcap": (scen_sdk_versions, "optional", "pcap"),
    "fallback_refused.pcap": (scen_fallback_refused, "optional", "pcap", "refuse"),
    "fallback_dropped.pcap": (scen_fallback_dropped, "optional", "pcap", "drop"),
}


# --------------------------------------------------------------------------- bad files
def _records(pcap: bytes) -> list[tuple[int, int]]:
    """(offset, length incl. 16-byte header) of every record of a classic pcap."""
    magic = pcap[:4]
    endian = "<" if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1") else ">"
    out, off = [], 24
    while off + 16 <= len(pcap):
        incl = struct.unpack(endian + "I", pcap[off + 8:off + 12])[0]
        out.append((off, 16 + incl))
        off += 16 + incl
    return out


def make_bad(out: Path) -> dict:
    bad = out / "bad"
    bad.mkdir(exist_ok=True)
    src = (out / "aws.pcap").read_bytes()
    recs = _records(src)
    # cut in the middle of the payload of the first data-carrying record past the middle
    off, length = next(r for r in recs[len(recs) // 2:] if r[1] > 16 + 80)
    cut = off + 16 + (length - 16) // 2
    (bad / "truncated.pcap").write_bytes(src[:cut])
    rnd = random.Random(20261123)
    garbage = b"this is not a capture file\n" + bytes(rnd.randrange(256) for _ in range(2000))
    (bad / "garbage.pcap").write_bytes(garbage)
    (bad / "empty.pcap").write_bytes(b"")
    (bad / "far_future.pcapng").write_bytes(_far_future(out / "keepalive.pcapng"))
    return {
        "truncated.pcap": {"made_from": "aws.pcap", "cut_at": cut,
                           "note": "cut in the middle of a record's payload"},
        "garbage.pcap": {"note": "not a capture: text + 2000 pseudo-random bytes"},
        "empty.pcap": {"note": "zero bytes"},
        "far_future.pcapng": {"made_from": "keepalive.pcapng",
                              "note": "its third packet stamped in the year ~36,000"},
    }


def _far_future(pcapng: Path) -> bytes:
    """keepalive.pcapng with the timestamp of its third Enhanced Packet Block set beyond any
    date a sink can write (atheris found this crash: a pcapng timestamp is 64 bits)."""
    data = bytearray(pcapng.read_bytes())
    endian = "<" if data[8:12] == b"\x4d\x3c\x2b\x1a" else ">"
    off, seen = 0, 0
    while off + 12 <= len(data):
        kind, length = struct.unpack_from(endian + "II", data, off)
        if kind == 6:
            seen += 1
            if seen == 3:
                struct.pack_into(endian + "I", data, off + 12, 0x10000000)
                return bytes(data)
        off += length
    raise ValueError(f"{pcapng}: fewer than 3 packets")


# --------------------------------------------------------------------------- main
def _tshark_requests(pcap: Path) -> list[tuple[str, str]]:
    proc = subprocess.run(["tshark", "-n", "-r", str(pcap), "-Y", "http.request",
                           "-T", "fields", "-e", "http.request.method", "-e", "http.request.uri"],
                          capture_output=True, text=True, check=True)
    return [tuple(line.split("\t", 1)) for line in proc.stdout.splitlines() if line]


def capture_scenario(name: str, func, mode: str, fmt: str, out: Path, tmp: Path,
                     token_put: str = "ok") -> dict:
    raw = tmp / (name + ".raw.pcap")
    with Lab(mode=mode, server_args=("--token-put", token_put)) as lab:
        with lab.capture(raw) as cap:
            sdk_runs = func(lab)
        stats = cap.stats
        records = lab.records()
        tokens = lab.issued_tokens()
    # Cross-check the capture with an independent dissector: every request the server
    # answered must be in the file, in the same order (tcpdump's "dropped by kernel" counter
    # is not reliable on loopback, so it is not used).
    seen = _tshark_requests(raw)
    sent = [(r["method"], r["target"]) for r in records]
    if seen != sent:
        raise SystemExit(f"{name}: capture incomplete: tshark sees {seen}, server saw {sent}"
                         f" (tcpdump: {stats})")
    dest = out / name
    if fmt == "pcapng":
        subprocess.run(["editcap", "-F", "pcapng", str(raw), str(dest)], check=True)
    else:
        shutil.copyfile(raw, dest)
    requests = []
    for rec in records:
        exp = expect(rec)
        requests.append({
            **exp,
            "level": level_of(exp),
            "method": rec["method"],
            "path": rec["target"],
            "status": rec["status"],
            "dst_ip": rec["local_ip"],
            "dst_port": rec["local_port"],
            "src_port": rec["peer_port"],
            "user_agent": next((v for k, v in rec["headers"] if k.lower() == "user-agent"),
                               None),
        })
    print(f"{name}: {len(requests)} requests, {stats.get('captured')} packets, "
          f"{dest.stat().st_size} bytes", file=sys.stderr)
    # Secrets the clients sent (token and Authorization values, >= 6 characters so that a
    # search for them cannot hit by accident): no output may contain them either.
    secrets_sent = sorted({v.strip() for rec in records for k, v in rec["headers"]
                           if k.lower() in SECRET_HEADERS and len(v.strip()) >= 6} | set(tokens))
    made = {"format": fmt, "server_mode": mode, "requests": requests, "issued_tokens": tokens,
            "secret_values": secrets_sent}
    if token_put != "ok":
        made["token_put"] = token_put
    if sdk_runs:
        made["sdk_runs"] = sdk_runs
    return made


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent),
                    help="output directory (default: tests/data)")
    ap.add_argument("--only", action="append", help="regenerate only these files (repeatable)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    exp_path = out / "expected.json"
    expected = {"files": {}, "bad_files": {}}
    if args.only and exp_path.exists():
        expected = json.loads(exp_path.read_text())
    with tempfile.TemporaryDirectory(prefix="make_pcaps-") as tmp:
        for name, (func, mode, fmt, *token_put) in SCENARIOS.items():
            if args.only and name not in args.only:
                continue
            expected["files"][name] = capture_scenario(name, func, mode, fmt, out, Path(tmp),
                                                       *token_put)
    expected["bad_files"] = make_bad(out)
    expected["generated_by"] = "tests/data/make_pcaps.py"
    expected["tools"] = {
        "curl": subprocess.run(["curl", "--version"], capture_output=True,
                               text=True).stdout.split("\n")[0],
        "tcpdump": subprocess.run(["tcpdump", "--version"], capture_output=True,
                                  text=True).stdout.split("\n")[0],
        "python": sys.version.split()[0],
    }
    try:
        import botocore
        expected["tools"]["botocore"] = botocore.__version__
    except ImportError:
        pass
    exp_path.write_text(json.dumps(expected, indent=1, sort_keys=False) + "\n")
    print(f"wrote {exp_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    os.chdir(REPO)
    sys.exit(main())
