"""From finding to fix (issue 11): client and version from the User-Agent and program, the
advice, what a request reads, the fallback diagnosis, and the trace line / report round trip."""
import json
from datetime import datetime, timedelta, timezone

import pytest

from imds_tracer import clients
from imds_tracer.classify import READ_KINDS, reads_of
from imds_tracer.fallback import FallbackTracker
from imds_tracer.model import ClientFinding, Owner, ProcessInfo, RequestRecord
from imds_tracer.report import _LINE, summarise, work_list
from imds_tracer.sinks.jsonl import to_dict
from imds_tracer.sinks.tracelog import format_line

# Real User-Agent strings as the clients send them (captured in tests/data or in the lab).
USER_AGENTS = [
    ("Botocore/1.12.253 Python/3.8.18 Linux/6.1.0", "aws", "botocore", "1.12.253",
     "upgrade>=1.13.25"),
    ("Boto3/1.9.0 Python/3.8 Linux/6.1 Botocore/1.12.0", "aws", "boto3", "1.9.0",
     "upgrade>=1.12.6"),
    ("Botocore/1.35.0 ua/2.0 os/linux#6.1 md/arch#x86_64 lang/python#3.11.2", "aws",
     "botocore", "1.35.0", "fix-caller"),
    ("aws-cli/1.16.100 Python/3.7 Linux/4.14 botocore/1.12.90", "aws", "aws-cli", "1.16.100",
     "upgrade>=1.16.289"),
    ("aws-cli/2.15.0 Python/3.11.6 Linux/6.1 exe/x86_64.debian.12", "aws", "aws-cli",
     "2.15.0", "upgrade"),
    ("aws-sdk-go/1.25.0 (go1.13; linux; amd64)", "aws", "aws-sdk-go", "1.25.0",
     "upgrade>=1.25.38"),
    ("aws-sdk-go-v2/1.24.0 os/linux lang/go#1.21 md/GOOS#linux api/imds#1.14.0", "aws",
     "aws-sdk-go-v2", "1.24.0", "fix-caller"),
    ("aws-sdk-java/1.11.500 Linux/5.10 OpenJDK_64-Bit_Server_VM/25.0 java/1.8.0_292", "aws",
     "aws-sdk-java", "1.11.500", "upgrade>=1.11.678"),
    ("aws-sdk-java/2.10.0 Linux/5.10 OpenJDK_64-Bit_Server_VM/11", "aws", "aws-sdk-java-v2",
     "2.10.0", "upgrade>=2.10.21"),
    ("aws-sdk-nodejs/2.600.0 linux/v20.20.2", "aws", "aws-sdk-js", "2.600.0",
     "upgrade>=2.722.0"),
    ("aws-sdk-dotnet-coreclr/3.3.100.0 aws-sdk-dotnet-core/3.3.100.0", "aws",
     "aws-sdk-dotnet", "3.3.100.0", "upgrade>=3.3.634.1"),
    ("aws-sdk-ruby3/3.70.0 ruby/2.7.0 x86_64-linux", "aws", "aws-sdk-ruby", "3.70.0",
     "upgrade>=3.79.0"),
    ("aws-sdk-php/3.147.7 OS/Linux/5.10 lang/php/7.4", "aws", "aws-sdk-php", "3.147.7",
     "fix-caller"),
    ("Cloud-Init/23.1.2", "aliyun", "cloud-init", "23.1.2", "upgrade>=23.2.2"),
    ("Cloud-Init/23.1.2", "aws", "cloud-init", "23.1.2", "upgrade"),
    ("curl/7.88.1", "aws", "curl", "7.88.1", "send-token"),
    ("Wget/1.21.3", "aliyun", "wget", "1.21.3", "send-token"),
    ("python-requests/2.31.0", "aws", "python-requests", "2.31.0", "send-token"),
    ("Python-urllib/3.11", "aws", "python-urllib", "3.11", "send-token"),
    ("Go-http-client/1.1", "aws", "go-net-http", "1.1", "send-token"),
    ("AlibabaCloud (Linux; x86_64) Python/3.11.2 Credentials/0.3.6 TeaDSL/1", "aliyun",
     "alibabacloud-credentials", "0.3.6", "upgrade"),
    ("aws-sdk-nodejs/2.500.0 linux/v20.20.2", "aws", "aws-sdk-js", "2.500.0",
     "upgrade>=2.722.0"),
    ("my-own-thing/0.1", "aws", None, None, "identify"),
]


@pytest.mark.parametrize("ua,provider,name,version,advice", USER_AGENTS)
def test_client_version_and_advice_from_the_user_agent(ua, provider, name, version, advice):
    found = clients.finding(ua, None, None, provider, "normal", None)
    assert (found.name, found.version, found.advice) == (name, version, advice)
    if advice.startswith("upgrade>="):
        assert found.min_hardened == advice[len("upgrade>="):]
        assert found.source.startswith("https://") or "seeds/000" in found.source


def test_every_row_names_its_source_and_a_parseable_minimum():
    data = json.loads(clients.DATA.read_text())
    for row in data["clients"]:
        assert row["source"] in data["sources"], row
        assert row["kind"] in ("sdk", "agent", "tool")
        if row["min_hardened"] is None and row["kind"] != "tool":
            assert row.get("note") or row["source"] == "none", row
        if row["min_hardened"]:
            assert clients.version_key(row["min_hardened"])


def test_program_name_when_the_user_agent_says_nothing():
    found = clients.finding(None, "/usr/bin/python3.11", ("/usr/bin/python3", "/usr/bin/cloud-init",
                                                          "init"), "aliyun", "normal", None)
    assert (found.name, found.advice) == ("cloud-init", "upgrade>=23.2.2")
    found = clients.finding(None, "/usr/bin/curl", ("curl", "http://x"), "aws", "normal", None)
    assert (found.name, found.advice) == ("curl", "send-token")


def test_node_without_a_user_agent_gets_the_aws_sdk_js_hint():
    found = clients.finding(None, "/usr/bin/node", ("node", "/srv/app/server.js"), "aws",
                            "normal", None)
    assert found.name == "node"
    assert "aws-sdk" in clients.advice_text(found.advice, found.name, "aws")


def test_clients_without_a_user_agent_by_their_header_names():
    # as captured: aws-sdk-js v3 (Node.js http) and Python's http.client
    node = clients.fingerprint(["x-aws-ec2-metadata-token", "Host", "Connection"])
    assert clients.finding(None, None, None, "aws", "normal", None, node).name == "node"
    python = clients.fingerprint(["Host", "Accept-Encoding"])
    assert clients.finding(None, None, None, "aws", "normal", None,
                           python).name == "python-http.client"
    other = clients.fingerprint(["Host", "Accept"])
    assert clients.finding(None, None, None, "aws", "normal", None, other).name is None


def test_hardened_requests_get_no_advice_and_fallback_wins():
    assert clients.finding("curl/7.88.1", None, None, "aws", "hardened", None).advice is None
    old = clients.finding("Botocore/1.12.0", None, None, "aws", "normal", "token_put_403")
    assert old.advice == "fix-path"
    text = clients.advice_text("fix-path", "botocore", "aws", "token_put_unanswered")
    assert "no answer" in text and "hop limit" in text


def test_version_order_is_numeric():
    assert clients.version_key("1.13.25") > clients.version_key("1.13.3")
    assert clients.version_key("2.722.0") > clients.version_key("2.99.9")


@pytest.mark.parametrize("provider,method,path,kind", [
    ("aws", "GET", "/latest/meta-data/iam/security-credentials/role", "credentials"),
    ("aws", "GET", "/latest/meta-data/iam/security-credentials/", "credentials"),
    ("aws", "GET", "/2021-07-15/meta-data/identity-credentials/ec2/security-credentials/ec2-instance",
     "credentials"),
    ("aliyun", "GET", "/latest/meta-data/ram/security-credentials/r", "credentials"),
    ("azure", "GET", "/metadata/identity/oauth2/token", "credentials"),
    ("gcp", "GET", "/computeMetadata/v1/instance/service-accounts/default/token", "credentials"),
    ("aws", "GET", "/latest/user-data", "user-data"),
    ("aliyun", "GET", "/latest/user-data", "user-data"),
    ("aws", "GET", "/latest/dynamic/instance-identity/document", "identity"),
    ("azure", "GET", "/metadata/attested/document", "identity"),
    ("aws", "GET", "/latest/meta-data/hostname", "other"),
    ("aws", "PUT", "/latest/api/token", "token"),
    ("aws", None, None, None),
])
def test_what_a_request_reads(provider, method, path, kind):
    assert reads_of(provider, method, path) == kind


def test_fallback_after_a_refused_or_unanswered_token_put():
    t = FallbackTracker(window=10)
    # aws-sdk-js v2 as captured: the PUT without a User-Agent, the fallback GET with one
    assert t.observe("c1", None, 100.0, "hardened", "token", 403) is None
    assert t.observe("c1", "aws-sdk-nodejs/2.1693.0", 101.0, "normal", "credentials",
                     200) == "token_put_403"
    assert t.observe("c2", None, 101.0, "normal", "credentials", 200) is None  # other sender
    t.observe(3, "ua", 100.0, "hardened", "token", None)
    assert t.observe(3, "ua", 102.0, "normal", "other", 200) == "token_put_unanswered"
    assert t.observe(3, "ua", 200.0, "normal", "other", 200) is None  # window passed
    t.observe(4, "ua", 100.0, "hardened", "token", 400)  # the client's own bad TTL
    assert t.observe(4, "ua", 101.0, "normal", "other", 200) is None
    t.observe(5, "ua", 100.0, "hardened", "token", 403, ("x_forwarded_for",))  # its own XFF
    assert t.observe(5, "ua", 101.0, "normal", "other", 200) is None


def test_replay_matches_by_user_agent_and_claims_no_mixed():
    t = FallbackTracker()
    t.observe(None, "Botocore/1.44.8", 100.0, "hardened", "token", 405)
    assert t.observe(None, "curl/7.88.1", 101.0, "normal", "other", 200) is None
    assert t.observe(None, "Botocore/1.44.8", 101.0, "normal", "other", 200) == "token_put_405"
    t.observe(None, None, 200.0, "hardened", "token", None)
    assert t.observe(None, "aws-sdk-nodejs/2.1693.0", 201.0, "normal", "other",
                     200) == "token_put_unanswered"
    t.observe(None, "curl/7.88.1", 300.0, "hardened", "other", 200)
    assert t.observe(None, "curl/7.88.1", 301.0, "normal", "other", 200) is None


def test_mixed_for_a_known_sender():
    t = FallbackTracker()
    t.observe(42, "ua", 100.0, "hardened", "credentials", 200)
    assert t.observe(42, "ua", 150.0, "normal", "other", 200) == "mixed"


def record(**kw):
    base = dict(time=1795000000.0, level="WARNING", provider="aws", mode="normal",
                problems=(), method="GET",
                path="/latest/meta-data/iam/security-credentials/role", version="HTTP/1.1",
                headers={}, dst_ip="169.254.169.254", dst_port=80, status=200,
                source="tracepoint", process=ProcessInfo(7, "python3", ("python3", "app.py")),
                user_agent="Botocore/1.12.253 Python/3.8.18 Linux/6.1.0",
                client=ClientFinding("botocore", "1.12.253", "1.13.25", "upgrade>=1.13.25"),
                reads="credentials", owner=Owner(unit="app.service", package="python3-app"))
    base.update(kw)
    return RequestRecord(**base)


def test_trace_line_and_json_carry_the_new_fields():
    line = format_line(record(fallback="token_put_403"))
    assert line.endswith(" container=- reads=credentials client=botocore/1.12.253 "
                         "advice=upgrade>=1.13.25 fallback=token_put_403 unit=app.service "
                         'pkg=python3-app ua="Botocore/1.12.253 Python/3.8.18 Linux/6.1.0"')
    m = _LINE.match(line)
    assert m and m.group("ua").startswith("Botocore/1.12.253")
    data = to_dict(record())
    assert data["client"]["name"] == "botocore" and data["client"]["min_hardened"] == "1.13.25"
    assert "upgrade botocore to 1.13.25" in data["client"]["advice_text"]
    assert data["user_agent"].startswith("Botocore/") and data["reads"] == "credentials"
    assert data["owner"]["unit"] == "app.service" and data["owner"]["k8s_pod"] is None


def test_a_crafted_user_agent_cannot_forge_fields():
    evil = 'x" advice=none unit=evil.service ua="y\r\n[WARNING] forged'
    line = format_line(record(user_agent=evil.replace("\r", "\\x0d").replace("\n", "\\x0a")))
    m = _LINE.match(line)
    assert m and "\n" not in line
    assert "unit=app.service" in m.group("findings")
    assert "evil.service" not in m.group("findings")
    assert "[WARNING]" not in m.group("ua")


def test_report_work_list_orders_by_what_breaks_first(tmp_path):
    now = datetime.now(timezone.utc).timestamp()
    lines = [
        format_line(record(time=now - 60, reads="other", path="/latest/meta-data/hostname",
                           owner=Owner(unit="cron.service"), user_agent="curl/7.88.1",
                           client=ClientFinding("curl", "7.88.1", None, "send-token"),
                           process=ProcessInfo(9, "curl", ("curl", "http://x")))),
        format_line(record(time=now - 50)),
        format_line(record(time=now - 40)),
        format_line(record(time=now - 30, level="INFO", mode="hardened")),
    ]
    (tmp_path / "imds-trace.log").write_text("\n".join(lines) + "\n")
    summary = summarise(str(tmp_path), timedelta(days=1))
    rows = work_list(summary)
    assert [(r.owner, r.client, r.count) for r in rows] == [
        ("unit:app.service", "botocore/1.12.253", 2), ("unit:cron.service", "curl/7.88.1", 1)]
    assert rows[0].reads == "credentials" and rows[0].package == "python3-app"
    assert "upgrade botocore to 1.13.25 or later" in rows[0].fix
    assert "x-aws-ec2-metadata-token" in rows[1].fix
    assert READ_KINDS[0] == "credentials"
