"""End to end, from finding to fix (issue 11): released SDKs (tests.lab.clients: PyPI / npm)
read instance credentials inside throw-away namespaces while `imds-tracer run` watches, on
each backend that runs here. The records name the client, its version and the fix; the
fallback of a capable SDK whose token PUT the fake IMDS refuses (403) or drops is diagnosed;
the systemd unit comes from the client's cgroup; `report` turns it into the work list.

Records are matched by the pid of the client this test started (other sessions may run
clients at the same time).
"""
from __future__ import annotations

import json
import secrets
import subprocess
import sys

import pytest

from tests.kernel.conftest import run_client, skip_or_fail
from tests.lab.agent import AgentProcess
from tests.lab.clients import sdk_command

BACKENDS = ["cgroup", "tracepoint"]


def _lab(token_put: str):
    from tests.lab import netns
    reason = netns.available()
    if reason:
        skip_or_fail(f"lab unavailable: {reason}")
    return netns.Lab(mode="optional", server_args=("--token-put", token_put))


@pytest.fixture(scope="module")
def labs():
    with _lab("ok") as ok, _lab("refuse") as refuse, _lab("drop") as drop:
        yield {"ok": ok, "refuse": refuse, "drop": drop}


@pytest.fixture(scope="module", params=BACKENDS)
def agent(request, labs, tmp_path_factory):
    the_agent = AgentProcess(tmp_path_factory.mktemp("agent"), backend=request.param).start()
    try:
        yield the_agent
    finally:
        assert the_agent.stop() == 0, the_agent.stderr()[-2000:]


def run_sdk(lab, name, cgroup=None):
    try:
        argv, env = sdk_command(name)
    except RuntimeError as exc:  # no network for PyPI/npm, no old Python
        skip_or_fail(f"{name}: {exc}")
    return run_client(lab, argv, cgroup=cgroup, env=env, timeout=90)


def normal(records):
    return [r for r in records if r["mode"] == "normal"]


def test_old_botocore_in_a_service_is_told_to_upgrade(agent, labs):
    lab = labs["ok"]
    unit = f"imds-lab-{secrets.token_hex(4)}.service"
    proc = run_sdk(lab, "botocore-1.12.253", cgroup=lab.make_cgroup(f"system.slice/{unit}"))
    recs = agent.records_of(proc.pid, 2)
    assert [r["mode"] for r in recs] == ["normal", "normal"]  # 1.12 sends no token PUT
    for r in recs:
        assert r["user_agent"].startswith("Botocore/1.12.253 ")
        assert r["client"]["name"] == "botocore" and r["client"]["version"] == "1.12.253"
        assert r["client"]["advice"] == "upgrade>=1.13.25" and r["reads"] == "credentials"
        assert r["owner"]["unit"] == unit
    line = next(l for l in (agent.log_dir / "imds-trace.log").read_text().splitlines()
                if f"(pid:{proc.pid}:" in l)
    assert f"client=botocore/1.12.253 advice=upgrade>=1.13.25 unit={unit}" in line
    assert line.endswith('"') and ' ua="Botocore/1.12.253 ' in line


def test_current_sdks_use_hardened_mode(agent, labs):
    for name in ("botocore-current", "aws-sdk-js-2-current", "aws-sdk-js-v3"):
        proc = run_sdk(labs["ok"], name)
        recs = agent.records_of(proc.pid, 3)
        assert [r["mode"] for r in recs] == ["hardened"] * 3, (name, recs)
        assert recs[0]["reads"] == "token" and recs[0]["status"] == 200
        assert all(r["client"]["advice"] is None for r in recs)


def test_old_aws_sdk_js_is_told_to_upgrade(agent, labs):
    proc = run_sdk(labs["ok"], "aws-sdk-js-2.500.0")
    recs = agent.records_of(proc.pid, 2)
    assert {(r["client"]["name"], r["client"]["version"], r["client"]["advice"])
            for r in recs} == {("aws-sdk-js", "2.500.0", "upgrade>=2.722.0")}


@pytest.mark.parametrize("lab_name,fallback,sdk,client", [
    ("refuse", "token_put_403", "botocore-current", "botocore"),
    ("refuse", "token_put_403", "aws-sdk-js-v3", "node"),
    ("refuse", "token_put_403", "alibabacloud-credentials", "alibabacloud-credentials"),
    ("drop", "token_put_unanswered", "botocore-current", "botocore"),
    ("drop", "token_put_unanswered", "alibabacloud-credentials", "alibabacloud-credentials"),
])
def test_fallback_of_a_capable_sdk_is_diagnosed(agent, labs, lab_name, fallback, sdk, client):
    proc = run_sdk(labs[lab_name], sdk)
    count = 2 if sdk.startswith("alibaba") else 3
    recs = agent.records_of(proc.pid, count)
    put, rest = recs[0], recs[1:]
    assert (put["method"], put["reads"], put["status"]) == (
        "PUT", "token", 403 if lab_name == "refuse" else None)
    assert rest and all(r["mode"] == "normal" for r in rest)
    for r in rest:
        assert r["fallback"] == fallback and r["client"]["name"] == client, r
        assert r["client"]["advice"] == "fix-path" and r["reads"] == "credentials"


def test_report_is_the_work_list(agent, labs):
    old = run_sdk(labs["ok"], "botocore-1.12.253")
    current = run_sdk(labs["refuse"], "botocore-current")
    agent.records_of([old.pid, current.pid], 5)  # written with the trace log, per poll
    proc = subprocess.run([sys.executable, "-m", "imds_tracer", "report", "--log-dir",
                           str(agent.log_dir), "--since", "1d", "--json"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr
    rows = json.loads(proc.stdout)["offenders"]
    clients = {r["client"]: r for r in rows}
    assert "upgrade botocore to 1.13.25" in clients["botocore/1.12.253"]["fix"]
    current = next(r for c, r in clients.items() if c.startswith("botocore/1.4"))
    assert current["fallback"] == "token_put_403" and "hop limit" in current["fix"]
    assert all(r["fix"] for r in rows)
