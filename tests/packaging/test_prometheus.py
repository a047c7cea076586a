"""packaging/prometheus: the alert rules pass `promtool check rules` and their unit tests
(`promtool test rules`), and they use the metric names the agent exports."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

DIR = Path(__file__).resolve().parents[2] / "packaging" / "prometheus"
RULES = DIR / "imds-tracer.rules.yml"
TESTS = DIR / "imds-tracer.rules.test.yml"
PROMTOOL = shutil.which("promtool")


@pytest.fixture(scope="module")
def promtool():
    if not PROMTOOL:
        reason = "promtool not installed (apt-get install prometheus)"
        if os.environ.get("IMDS_TRACER_REQUIRE_KERNEL") == "1":   # CI installs it
            pytest.fail(reason)
        pytest.skip(reason)
    return PROMTOOL


def test_check_rules(promtool):
    run = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "SUCCESS: 4 rules found" in run.stdout + run.stderr


def test_rule_unit_tests(promtool):
    run = subprocess.run([promtool, "test", "rules", TESTS.name], capture_output=True,
                         text=True, timeout=120, cwd=DIR)
    assert run.returncode == 0, run.stdout + run.stderr


def test_rules_use_exported_metric_names():
    text = RULES.read_text()
    used = set(re.findall(r"\b(imds_tracer_[a-z_]+)\b", text))
    assert used == {"imds_tracer_normal_mode_requests_total", "imds_tracer_lost_events_total"}
    sinks = Path(__file__).resolve().parents[2] / "imds_tracer" / "sinks" / "metrics.py"
    if sinks.exists():  # the names the agent registers (prometheus_client drops "_total")
        source = sinks.read_text()
        for name in used:
            assert name.removesuffix("_total") in source, name


GRAFANA = Path(__file__).resolve().parents[2] / "packaging" / "grafana" / "imds-tracer.json"


def test_grafana_dashboard_queries_parse(promtool, tmp_path):
    """Every dashboard query is valid PromQL (checked by promtool as recording rules, with
    Grafana's variables replaced) and uses only metrics the agent or Prometheus exports."""
    import json

    dashboard = json.loads(GRAFANA.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 10
    known = {"imds_tracer_requests_total", "imds_tracer_normal_mode_requests_total",
             "imds_tracer_normal_mode_outcomes_total", "imds_tracer_problems_total",
             "imds_tracer_lost_events_total", "imds_tracer_dropped_total",
             "imds_tracer_unparsed_requests_total", "imds_tracer_info",
             "imds_tracer_last_normal_mode_request_timestamp_seconds", "up",
             "process_start_time_seconds", "process_resident_memory_bytes"}
    lines = ["groups:", "  - name: dashboard", "    rules:"]
    for i, expr in enumerate(exprs):
        names = set(re.findall(r"\b([a-z_]+(?:_total|_seconds|_bytes|_info)|up)\s*[{\[(]", expr))
        assert names <= known, names - known
        concrete = (expr.replace("$__rate_interval", "5m").replace("$__range", "14d")
                    .replace("$job", ".*").replace("$instance", ".*"))
        lines += [f"      - record: dashboard:query{i}", f"        expr: {json.dumps(concrete)}"]
    rules = tmp_path / "dashboard.rules.yml"
    rules.write_text("\n".join(lines) + "\n")
    run = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr


def test_daemonset_manifest(tmp_path):
    yaml = pytest.importorskip("yaml")
    path = Path(__file__).resolve().parents[2] / "packaging" / "kubernetes" / "daemonset.yaml"
    docs = {d["kind"]: d for d in yaml.safe_load_all(path.read_text())}
    spec = docs["DaemonSet"]["spec"]["template"]["spec"]
    assert spec["hostPID"] and spec["hostNetwork"]
    container = spec["containers"][0]
    assert container["command"][:2] == ["imds-tracer", "run"]
    assert set(container["securityContext"]["capabilities"]["add"]) == \
        {"BPF", "PERFMON", "SYS_PTRACE", "DAC_READ_SEARCH", "NET_ADMIN"}
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {"/sys/kernel/tracing", "/sys/fs/cgroup", "/lib/modules", "/usr/src",
            "/var/log/imds", "/etc/imds-tracer"} <= mounts
    assert container["ports"][0]["containerPort"] == 9796
    annotations = docs["DaemonSet"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == "9796"
    # the ConfigMap's config.toml is valid for the agent
    from imds_tracer import config

    data = docs["ConfigMap"]["data"]["config.toml"]
    cfg_path = tmp_path / "config.toml"
    cfg_path.write_text(data)
    cfg = config.load(str(cfg_path), required=True)
    assert cfg.metrics_addr == "0.0.0.0:9796" and cfg.json == "-"
