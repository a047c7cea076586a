"""The corpus captures of real SDKs (tests/data/make_pcaps.py: sdk_versions, fallback_refused,
fallback_dropped), replayed: each normal-mode request names its client, version and fix, the
fallbacks are diagnosed, and `report` turns them into a work list with a fix on every row."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.replay.test_corpus import DATA, EXPECTED, ROOT, replay

SDK_FILES = ("sdk_versions.pcap", "fallback_refused.pcap", "fallback_dropped.pcap")


@pytest.fixture(scope="module")
def sdk_runs(tmp_path_factory):
    return {name: replay(tmp_path_factory.mktemp(name.replace(".", "_")), DATA / name)
            for name in SDK_FILES}


def _normal(run):
    return [r for r in run["records"] if r["mode"] == "normal"]


def test_old_sdks_are_told_to_upgrade_current_ones_are_not_offenders(sdk_runs):
    run = sdk_runs["sdk_versions.pcap"]
    assert run["rc"] == 0, run["stderr"]
    normal = _normal(run)
    found = {(r["client"]["name"], r["client"]["version"], r["client"]["advice"])
             for r in normal}
    # botocore 1.12.253 and aws-sdk-js 2.500.0 send no token; every other SDK here does
    assert found == {("botocore", "1.12.253", "upgrade>=1.13.25"),
                     ("aws-sdk-js", "2.500.0", "upgrade>=2.722.0")}
    assert all(r["reads"] == "credentials" and r["fallback"] is None for r in normal)
    hardened = {r["client"]["name"] for r in run["records"] if r["mode"] == "hardened"}
    assert {"botocore", "node", "alibabacloud-credentials"} <= hardened
    assert all(r["client"]["advice"] is None for r in run["records"] if r["mode"] != "normal")
    # the User-Agent as sent, in JSON and on the line
    uas = {r["user_agent"] for r in EXPECTED["files"]["sdk_versions.pcap"]["requests"]}
    assert {r["user_agent"] for r in run["records"]} == uas
    assert 'ua="Botocore/1.12.253 ' in run["trace"]


@pytest.mark.parametrize("name,fallback", [("fallback_refused.pcap", "token_put_403"),
                                           ("fallback_dropped.pcap", "token_put_unanswered")])
def test_capable_sdks_whose_token_put_failed_are_diagnosed(sdk_runs, name, fallback):
    run = sdk_runs[name]
    assert run["rc"] == 0, run["stderr"]
    expected = EXPECTED["files"][name]["requests"]
    puts = [r for r in expected if r["method"] == "PUT"]
    assert puts and all(r["status"] == (403 if "403" in fallback else None) for r in puts)
    normal = _normal(run)
    assert len(normal) == len(expected) - len(puts) > 0
    for r in normal:
        assert r["fallback"] == fallback, r
        assert r["client"]["advice"] == "fix-path"
        assert "hop limit" in r["client"]["advice_text"]
    names = {r["client"]["name"] for r in normal}
    assert {"botocore", "alibabacloud-credentials"} <= names
    assert f"fallback={fallback}" in run["trace"]


def test_report_gives_every_offender_a_client_and_a_fix(tmp_path):
    run = replay(tmp_path, *(DATA / n for n in SDK_FILES))
    log_dir = run["argv"][run["argv"].index("--log-dir") + 1]
    proc = subprocess.run([sys.executable, "-m", "imds_tracer", "report", "--log-dir", log_dir,
                           "--since", "3650d", "--json"], capture_output=True, text=True,
                          cwd=ROOT)
    assert proc.returncode == 1, proc.stderr
    rows = json.loads(proc.stdout)["offenders"]
    assert rows and all(r["client"] != "unknown" and r["fix"] and r["advice"] for r in rows)
    assert [r["reads"] for r in rows] == sorted((r["reads"] for r in rows),
                                                key=["credentials", "user-data", "identity",
                                                     "other", "token"].index)
    by_client = {r["client"]: r for r in rows}
    assert "upgrade botocore to 1.13.25" in by_client["botocore/1.12.253"]["fix"]
    assert by_client["botocore/1.44.8"]["fallback"].startswith("token_put_")
