"""The commands as a user runs them: subprocesses, real files, a real HTTP scrape."""
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tests.unprivileged import as_nobody

DATA = Path(__file__).resolve().parents[1] / "data"
AWS = str(DATA / "aws.pcap")


def imds(*args, **kw):
    return subprocess.run([sys.executable, "-m", "imds_tracer", *args], capture_output=True,
                          text=True, timeout=120, **kw)


def one_line_error(proc):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, proc.stderr
    return errors[0]


def test_version_and_help():
    assert re.match(r"imds-tracer \d+\.\d+", imds("--version").stdout)
    helptext = imds("--help").stdout
    for command in ("run", "replay", "report", "doctor"):
        assert command in helptext


def test_bad_flags_and_files_are_one_line_errors(tmp_path):
    assert "unrecognized arguments: --bogus" in one_line_error(
        imds("replay", AWS, "--bogus", "--log-dir", str(tmp_path)))
    assert "No such file" in one_line_error(imds("replay", str(tmp_path / "nope.pcap"),
                                                 "--log-dir", str(tmp_path)))
    junk = tmp_path / "junk.pcap"
    junk.write_bytes(os.urandom(3000))
    assert "not a pcap" in one_line_error(imds("replay", str(junk), "--log-dir", str(tmp_path)))
    assert "HOST:PORT" in one_line_error(imds("replay", AWS, "--metrics-addr", "nonsense"))


def test_bad_config_names_the_key(tmp_path):
    cfg = tmp_path / "config.toml"
    cfg.write_text('[log]\ndir = "/tmp/x"\nmax_byte = 10\n')
    assert "log.max_byte" in one_line_error(imds("replay", AWS, "--config", str(cfg)))
    cfg.write_text('[capture]\nports = [80, 70000]\n')
    assert "capture.ports" in one_line_error(imds("replay", AWS, "--config", str(cfg)))
    cfg.write_text('[capture\n')
    assert "not valid TOML" in one_line_error(imds("replay", AWS, "--config", str(cfg)))
    assert "not found" in one_line_error(imds("replay", AWS, "--config", str(tmp_path / "x")))


def test_truncated_capture_keeps_what_it_read_and_fails(tmp_path):
    cut = tmp_path / "cut.pcap"
    data = (DATA / "aws.pcap").read_bytes()
    cut.write_bytes(data[:len(data) - 37])
    proc = imds("replay", str(cut), "--log-dir", str(tmp_path / "log"))
    assert "truncated" in one_line_error(proc)
    assert "WARNING" in (tmp_path / "log" / "imds-trace.log").read_text()


def test_unwritable_log_dir_is_a_one_line_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert "--log-dir" in one_line_error(imds("replay", AWS, "--log-dir", str(blocker / "d")))
    err = one_line_error(imds("replay", AWS, "--log-dir", str(tmp_path / "ok"),
                              "--json", str(blocker / "x.jsonl")))
    assert "--json" in err and "--log-dir" not in err


def test_json_lines_carry_the_contract_keys(tmp_path):
    out = tmp_path / "out.jsonl"
    proc = imds("replay", AWS, "--log-dir", str(tmp_path), "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows
    keys = {"time", "level", "provider", "mode", "problems", "method", "path", "dst_ip",
            "dst_port", "pid", "comm", "argv", "parents", "container", "source", "headers",
            "status"}
    for row in rows:
        assert keys <= row.keys()
        assert row["source"] == "replay" and row["pid"] is None and row["container"] is None
        for name, value in row["headers"].items():
            if name.lower() == "x-aws-ec2-metadata-token":
                assert value in ("<redacted>", "")
    # the trace log and the JSON agree on which requests are normal mode
    warnings = [l for l in (tmp_path / "imds-trace.log").read_text().splitlines()
                if "[WARNING]" in l]
    assert len(warnings) == sum(r["level"] == "WARNING" for r in rows) > 0


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scrape(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return resp.read().decode()


def _value(text, name, **labels):
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
    return None


def test_metrics_are_served_over_http_and_match_the_log(tmp_path):
    port = _free_port()
    out = tmp_path / "out.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "imds_tracer", "replay", AWS,
                             str(DATA / "azure_gcp.pcap"), "--log-dir", str(tmp_path),
                             "--json", str(out), "--metrics-addr", f"127.0.0.1:{port}",
                             "--linger"], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        for line in proc.stderr:
            if "serving metrics" in line or time.time() > deadline:
                break
        text = _scrape(port)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    normal = sum(1 for r in rows if r["mode"] == "normal")
    total = sum(float(l.rsplit(" ", 1)[1]) for l in text.splitlines()
                if l.startswith("imds_tracer_requests_total{"))
    assert total == len(rows)
    assert _value(text, "imds_tracer_requests_total", provider="aws", mode="normal",
                  method="GET") == normal
    azure_problems = sum("missing_metadata_header" in r["problems"] for r in rows)
    assert _value(text, "imds_tracer_problems_total", problem="missing_metadata_header") \
        == azure_problems > 0
    assert _value(text, "imds_tracer_info", backend="replay") == 1
    assert _value(text, "imds_tracer_lost_events_total", stage="kernel") == 0
    assert _value(text, "imds_tracer_last_normal_mode_request_timestamp_seconds") > 1.7e9
    assert "X-aws-ec2-metadata-token" not in text


def test_metrics_port_taken_is_a_one_line_error(tmp_path):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        err = one_line_error(imds("replay", AWS, "--log-dir", str(tmp_path),
                                  "--metrics-addr", f"127.0.0.1:{port}"))
    assert f"127.0.0.1:{port}" in err and "in use" in err.lower()


def test_report_lists_offenders_and_gives_the_verdict(tmp_path):
    assert imds("replay", AWS, "--log-dir", str(tmp_path)).returncode == 0
    proc = imds("report", "--log-dir", str(tmp_path))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "NOT SAFE" in proc.stdout
    data = json.loads(imds("report", "--log-dir", str(tmp_path), "--json").stdout)
    warnings = (tmp_path / "imds-trace.log").read_text().count("[WARNING]")
    assert data["normal_mode_requests"] == warnings > 0
    assert data["safe_to_enforce"] is False
    assert {o["provider"] for o in data["offenders"]} <= {"aws", "aliyun"}

    clean = tmp_path / "clean"
    assert imds("replay", str(DATA / "azure_gcp.pcap"), "--log-dir", str(clean)).returncode == 0
    proc = imds("report", "--log-dir", str(clean))
    # no normal-mode request, but a replay is no watch: not enough evidence, never "safe"
    assert proc.returncode == 3 and "NOT ENOUGH EVIDENCE" in proc.stdout, proc.stdout

    # a window that ends before the logged requests: nothing in it
    assert "--since" in one_line_error(imds("report", "--log-dir", str(tmp_path),
                                            "--since", "forever"))
    assert "not found" in one_line_error(imds("report", "--log-dir", str(tmp_path / "none")))


def test_run_without_privileges_is_a_one_line_error(tmp_path, installed_copy):
    if os.geteuid() != 0:
        proc = imds("run", "--log-dir", str(tmp_path), "--metrics-addr", "")
        doctor = imds("doctor")
    else:  # drop to nobody, as an operator who forgot sudo (from a copy nobody can read)
        log_dir = tmp_path / "log"
        argv, env = as_nobody(["run", "--log-dir", str(log_dir), "--metrics-addr", ""],
                              installed_copy)
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd="/",
                              env=env)
        argv, env = as_nobody(["doctor"], installed_copy)
        doctor = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd="/",
                                env=env)
    assert "needs root" in one_line_error(proc)
    assert "Traceback" not in doctor.stderr + doctor.stdout
    assert "run as root" in doctor.stdout


def test_progress_only_on_a_terminal_or_when_asked(tmp_path):
    piped = imds("replay", AWS, "--log-dir", str(tmp_path))
    assert "packets/s" not in piped.stderr
    asked = imds("replay", AWS, "--log-dir", str(tmp_path), "--progress")
    assert re.search(r"replay: 144 packets, 144 to metadata addresses, \d+ requests, "
                     r"[\d,]+ packets/s", asked.stderr)
