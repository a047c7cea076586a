"""The fake IMDS server is test infrastructure: check its semantics on loopback, no namespace.

127.0.0.1 answers as AWS (and Azure/GCP/OCI by path), 127.0.0.2 is declared an Alibaba
address, ::1 checks IPv6 listening. Ports are free ones.
"""
from __future__ import annotations

import http.client
import os
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.lab.fake_imds import FakeIMDS, TTL_MAX

ROOT = Path(__file__).resolve().parents[2]


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.fixture
def imds(request, tmp_path):
    mode = getattr(request, "param", "optional")
    srv = FakeIMDS(default_mode=mode, aliyun_addrs={"127.0.0.2"},
                   log_path=str(tmp_path / "imds.jsonl"))
    srv.start([("127.0.0.1", 0), ("127.0.0.2", 0)])
    yield srv
    srv.stop()


def req(srv, method, path, headers=None, *, aliyun=False, body=None, conn=None):
    host, port = srv.addresses[1 if aliyun else 0]
    own = conn is None
    conn = conn or http.client.HTTPConnection(host, port, timeout=5)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, data.decode(), dict(resp.getheaders())
    finally:
        if own:
            conn.close()


AWS_TTL = "X-aws-ec2-metadata-token-ttl-seconds"
AWS_TOK = "X-aws-ec2-metadata-token"
ALI_TTL = "X-aliyun-ecs-metadata-token-ttl-seconds"
ALI_TOK = "X-aliyun-ecs-metadata-token"


@pytest.mark.parametrize("aliyun,ttl_h,tok_h", [(False, AWS_TTL, AWS_TOK),
                                                (True, ALI_TTL, ALI_TOK)])
def test_token_flow_optional(imds, aliyun, ttl_h, tok_h):
    status, token, hdrs = req(imds, "PUT", "/latest/api/token", {ttl_h: "21600"}, aliyun=aliyun)
    assert status == 200 and token in imds.issued_tokens
    assert hdrs[ttl_h] == "21600"
    assert req(imds, "GET", "/latest/meta-data/instance-id", {tok_h: token},
               aliyun=aliyun)[0] == 200
    assert req(imds, "GET", "/latest/meta-data/instance-id", aliyun=aliyun)[0] == 200
    assert req(imds, "GET", "/latest/meta-data/instance-id", {tok_h: "aaa"},
               aliyun=aliyun)[0] == 401
    assert req(imds, "GET", "/latest/meta-data/instance-id", {tok_h: ""},
               aliyun=aliyun)[0] == 401
    assert req(imds, "GET", "/latest/meta-data/nope", {tok_h: token}, aliyun=aliyun)[0] == 404


@pytest.mark.parametrize("aliyun,ttl_h", [(False, AWS_TTL), (True, ALI_TTL)])
@pytest.mark.parametrize("headers,status", [
    ({}, 400),
    ({"TTL": "1"}, 200), ({"TTL": str(TTL_MAX)}, 200),
    ({"TTL": "0"}, 400), ({"TTL": "21601"}, 400), ({"TTL": "21700"}, 400),
    ({"TTL": "-5"}, 400), ({"TTL": "abc"}, 400), ({"TTL": ""}, 400),
    ({"TTL": "60", "X-Forwarded-For": "203.0.113.9"}, 403),
    ({"X-Forwarded-For": "www.example.com"}, 403),
])
def test_token_put_rules(imds, aliyun, ttl_h, headers, status):
    headers = {(ttl_h if k == "TTL" else k): v for k, v in headers.items()}
    got, body, _ = req(imds, "PUT", "/latest/api/token", headers, aliyun=aliyun)
    assert got == status
    assert (body in imds.issued_tokens) == (status == 200)


def test_token_endpoint_other_method(imds):
    assert req(imds, "GET", "/latest/api/token", {AWS_TTL: "60"})[0] == 405


def test_tokens_are_per_provider(imds):
    _, aws_token, _ = req(imds, "PUT", "/latest/api/token", {AWS_TTL: "60"})
    assert req(imds, "GET", "/latest/meta-data/", {ALI_TOK: aws_token}, aliyun=True)[0] == 401


@pytest.mark.parametrize("imds", ["required"], indirect=True)
@pytest.mark.parametrize("aliyun,ttl_h,tok_h", [(False, AWS_TTL, AWS_TOK),
                                                (True, ALI_TTL, ALI_TOK)])
def test_required_mode(imds, aliyun, ttl_h, tok_h):
    assert req(imds, "GET", "/latest/meta-data/", aliyun=aliyun)[0] == 401
    _, token, _ = req(imds, "PUT", "/latest/api/token", {ttl_h: "300"}, aliyun=aliyun)
    assert req(imds, "GET", "/latest/meta-data/", {tok_h: token}, aliyun=aliyun)[0] == 200


def test_per_provider_modes():
    srv = FakeIMDS(modes={"aws": "required", "aliyun": "optional"}, aliyun_addrs={"127.0.0.2"})
    with srv:
        srv.start([("127.0.0.1", 0), ("127.0.0.2", 0)])
        assert req(srv, "GET", "/latest/meta-data/")[0] == 401
        assert req(srv, "GET", "/latest/meta-data/", aliyun=True)[0] == 200
    with pytest.raises(ValueError):
        FakeIMDS(modes={"aws": "sometimes"})


def test_realistic_paths(imds):
    assert req(imds, "GET", "/latest/meta-data/instance-id")[1] == "i-0123456789abcdef0"
    assert req(imds, "GET", "/latest/meta-data/iam/security-credentials/")[1] == \
        "lab-instance-role"
    creds = json.loads(req(imds, "GET",
                           "/latest/meta-data/iam/security-credentials/lab-instance-role")[1])
    assert creds["Code"] == "Success" and creds["AccessKeyId"]
    doc = json.loads(req(imds, "GET", "/latest/dynamic/instance-identity/document")[1])
    assert doc["instanceId"] == "i-0123456789abcdef0"
    assert "lab user-data" in req(imds, "GET", "/latest/user-data")[1]
    assert req(imds, "GET", "/2021-07-15/meta-data/instance-id")[0] == 200
    assert req(imds, "GET", "/latest/meta-data/ram/security-credentials/",
               aliyun=True)[1] == "lab-ram-role"
    assert req(imds, "HEAD", "/latest/meta-data/instance-id")[0] == 200
    assert req(imds, "POST", "/latest/meta-data/instance-id", body=b"x")[0] == 405
    assert req(imds, "GET", "/nothing/here")[0] == 404


@pytest.mark.parametrize("path,headers,status", [
    ("/metadata/instance?api-version=2021-02-01", {"Metadata": "true"}, 200),
    ("/metadata/instance?api-version=2021-02-01", {}, 400),
    ("/metadata/instance", {"Metadata": "true"}, 400),
    ("/metadata/instance?api-version=2021-02-01",
     {"Metadata": "true", "X-Forwarded-For": "10.1.1.1"}, 400),
    ("/metadata/instance?api-version=1999-01-01", {"Metadata": "true"}, 400),
    ("/metadata/instance/compute/vmId?api-version=2021-02-01&format=text",
     {"Metadata": "true"}, 200),
    ("/metadata/versions", {"Metadata": "true"}, 200),
    ("/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://management."
     "azure.com/", {"Metadata": "true"}, 200),
    ("/computeMetadata/v1/instance/id", {"Metadata-Flavor": "Google"}, 200),
    ("/computeMetadata/v1/instance/id", {}, 403),
    ("/computeMetadata/v1/instance/id", {"Metadata-Flavor": "Google",
                                         "X-Forwarded-For": "1.2.3.4"}, 403),
    ("/computeMetadata/v1/nope", {"Metadata-Flavor": "Google"}, 404),
    ("/opc/v1/instance/", {}, 200),
    ("/opc/v2/instance/", {"Authorization": "Bearer Oracle"}, 200),
    ("/opc/v2/instance/", {}, 401),
])
def test_azure_gcp_oci(imds, path, headers, status):
    assert req(imds, "GET", path, headers)[0] == status


def test_azure_error_text(imds):
    _, body, _ = req(imds, "GET", "/metadata/instance?api-version=2021-02-01")
    assert "Required metadata header not specified" in body
    _, body, _ = req(imds, "GET", "/metadata/instance", {"Metadata": "true"})
    assert "api-version was not specified" in body


def test_keep_alive_and_content_length(imds):
    host, port = imds.addresses[0]
    conn = http.client.HTTPConnection(host, port, timeout=5)
    status, token, hdrs = req(imds, "PUT", "/latest/api/token", {AWS_TTL: "60"}, conn=conn)
    assert hdrs["Content-Length"] == str(len(token))
    for path in ("/latest/meta-data/", "/latest/meta-data/instance-id", "/latest/user-data"):
        assert req(imds, "GET", path, {AWS_TOK: token}, conn=conn)[0] == 200
    conn.close()
    ports = {r["peer_port"] for r in imds.records}
    assert len(ports) == 1 and len(imds.records) == 4


def test_split_request_and_body(imds):
    """A request head sent in pieces, with a body, on one raw socket."""
    host, port = imds.addresses[0]
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(b"PUT /latest/api/token HTTP/1.1\r\nHost: 169.254.169.254\r\n")
        s.sendall(b"X-aws-ec2-metadata-token-ttl-seconds: 60\r\nContent-Length: 3\r\n\r\n")
        s.sendall(b"abc")
        data = s.recv(4096)
    assert data.startswith(b"HTTP/1.1 200 ")
    assert imds.records[-1]["body_len"] == 3


def test_records_and_log(imds, tmp_path):
    req(imds, "GET", "/latest/meta-data/", {"User-Agent": "t"})
    _, token, _ = req(imds, "PUT", "/latest/api/token", {ALI_TTL: "5"}, aliyun=True)
    rec = [json.loads(line) for line in (tmp_path / "imds.jsonl").read_text().splitlines()]
    assert [(r["provider"], r["method"], r["target"], r["status"]) for r in rec] == [
        ("aws", "GET", "/latest/meta-data/", 200),
        ("aliyun", "PUT", "/latest/api/token", 200)]
    assert rec[1]["token_issued"] == token and rec[0]["token_issued"] is None
    assert ["User-Agent", "t"] in rec[0]["headers"]
    assert rec == imds.records


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback")
def test_ipv6_listen():
    with FakeIMDS() as srv:
        srv.start([("::1", 0)])
        host, port = srv.addresses[0]
        conn = http.client.HTTPConnection(host, port, timeout=5)
        conn.request("GET", "/latest/meta-data/instance-id")
        assert conn.getresponse().status == 200
        conn.close()


def test_cli_ready_and_sigterm(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.lab.fake_imds", "--bind", "127.0.0.1", "--port", "0",
         "--mode", "required", "--log", str(tmp_path / "l.jsonl")],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline().split()
        assert line[:2] == ["READY", "127.0.0.1"]
        conn = http.client.HTTPConnection("127.0.0.1", int(line[2]), timeout=5)
        conn.request("GET", "/latest/meta-data/")
        assert conn.getresponse().status == 401
        conn.close()
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0
    assert json.loads((tmp_path / "l.jsonl").read_text())["status"] == 401


# --------------------------------------------------------------------------- the netns lab
from tests.lab import netns  # noqa: E402


def _host_addrs() -> str:
    return subprocess.run(["ip", "addr", "show"], capture_output=True, text=True).stdout


@pytest.mark.skipif(netns.available() is not None, reason=str(netns.available()))
def test_lab_end_to_end(tmp_path):
    """Namespace + addresses on its loopback only, fake IMDS, cgroup, capture, teardown."""
    before = _host_addrs()
    cg_rel = "imdslab-selftest.slice/docker-" + "cd" * 32 + ".scope"
    with netns.Lab(mode="optional", modes={"aliyun": "required"}) as lab:
        ns = lab.ns
        assert netns.AWS_IP not in _host_addrs() and netns.ALIYUN_IP not in _host_addrs()
        with lab.capture(tmp_path / "c.pcap"):
            out = lab.run(["curl", "-sS", f"http://{netns.AWS_IP}/latest/meta-data/instance-id"],
                          check=True).stdout
            assert out == "i-0123456789abcdef0"
            code = lab.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                            f"http://{netns.ALIYUN_IP}/latest/meta-data/"]).stdout
            assert code == "401"  # aliyun in required mode
            tok = lab.run(["curl", "-sS", "-X", "PUT", "-H", "X-aws-ec2-metadata-token-ttl-seconds:"
                           " 60", f"http://[{netns.AWS_IP6}]/latest/api/token"], check=True).stdout
        assert lab.issued_tokens() == [tok]
        assert [r["status"] for r in lab.records()] == [200, 401, 200]
        assert (tmp_path / "c.pcap").stat().st_size > 24 * 10
        cg = lab.make_cgroup(cg_rel)
        got = lab.run(["cat", "/proc/self/cgroup"], cgroup=cg, check=True).stdout
        assert f"0::/{cg_rel}" in got
        p = lab.popen(["sleep", "60"])
        pid = p.pid
    assert ns not in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                    text=True).stdout
    assert not (netns.CGROUP2_ROOT / cg_rel.split("/")[0]).exists()
    assert not os.path.exists(f"/proc/{pid}") or netns._is_zombie(pid)
    assert _host_addrs() == before


@pytest.mark.skipif(netns.available() is not None, reason=str(netns.available()))
def test_lab_cleans_up_after_failure():
    with pytest.raises(RuntimeError):
        with netns.Lab() as lab:
            ns = lab.ns
            raise RuntimeError("boom")
    assert ns not in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                    text=True).stdout
