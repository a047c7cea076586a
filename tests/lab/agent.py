"""`imds-tracer run` as a subprocess, for the tests and benchmarks that need the live agent.

`AgentProcess` builds the command line from a temporary directory (log dir ``TMP/logs``,
JSON lines ``TMP/requests.jsonl``, an optional config file ``TMP/config.toml`` written from
the TOML text given, metrics on a free loopback port) -- or takes a ready-made ``argv`` (e.g.
wrapped in a sandbox) -- and then

1. `start` runs it (``cwd`` the repository, or as given) and waits for its stderr line
   ``ready backend=<name> probes=<n>`` (`ready_line`, `ready_seconds`); an agent that exits
   or does not get ready in time is an AssertionError, unless ``expect_ready=False``
   (then `ready` tells, and a late one is killed);
2. while it runs: `records` / `wait_records` / `records_of` read the JSON lines it wrote (by
   path marker or by client pid), `count` counts lines cheaply, `metric` / `metrics` scrape
   its Prometheus endpoint, `rss_kib` / `rss_mib` its memory, `alive`, `send_signal`;
   `stderr` is everything it printed so far (a reader thread drains the pipe);
3. `stop` sends SIGTERM and returns the exit status (after `timeout` it kills the agent and
   raises subprocess.TimeoutExpired); `kill` is the unconditional clean-up.

Only the process it started is signalled (by its Popen handle). Usable as a context manager
(start on entry, stop on exit).

Example::

    from tests.lab.agent import AgentProcess

    agent = AgentProcess(tmp_path, config="[flows]\\nresponse_wait = 5.0\\n").start()
    try:
        ...  # make requests
        assert agent.wait_records("my-marker", 1)
        assert agent.metric("imds_tracer_dropped_total", 'kind="log_write"') == 0
    finally:
        assert agent.stop() == 0, agent.stderr()[-2000:]

Needs root and BPF (the callers skip otherwise). The backend is `auto` unless given: what
users run.
"""
from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from tests.lab import SLOW

REPO_ROOT = Path(__file__).resolve().parents[2]
READY = re.compile(r"ready backend=(\w+) probes=(\d+)")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AgentProcess:
    """`imds-tracer run` in a subprocess; JSON lines, metrics and stderr readable while it runs."""

    def __init__(self, tmp: Path | None = None, *, backend: str = "auto",
                 log_dir: Path | None = None, json_path: Path | None = None,
                 config: str | None = None, metrics_port: int | None = None,
                 python: str = sys.executable, extra_args: Sequence[str] = (),
                 argv: Sequence[str] | None = None, cwd: Path | str = REPO_ROOT,
                 env: Mapping[str, str] | None = None):
        """`tmp` holds the agent's files; `config` is TOML text for ``--config`` (none when
        None); `argv` replaces the built command line altogether (then `tmp` may be None)."""
        if tmp is None and argv is None:
            raise ValueError("AgentProcess needs tmp or argv")
        self.tmp = Path(tmp) if tmp is not None else None
        self.log_dir = Path(log_dir) if log_dir else (self.tmp / "logs" if self.tmp else None)
        self.json_path = Path(json_path) if json_path else \
            (self.tmp / "requests.jsonl" if self.tmp else None)
        self.port = metrics_port or free_port()
        self.config_path: Path | None = None
        if config is not None:
            self.tmp.mkdir(parents=True, exist_ok=True)
            self.config_path = self.tmp / "config.toml"
            self.config_path.write_text(config)
        if argv is not None:
            self.argv = list(argv)
        else:
            self.argv = [python, "-m", "imds_tracer", "run", "--backend", backend]
            if self.config_path is not None:
                self.argv += ["--config", str(self.config_path)]
            self.argv += ["--log-dir", str(self.log_dir), "--json", str(self.json_path),
                          "--metrics-addr", f"127.0.0.1:{self.port}", "--quiet", *extra_args]
        self.cwd = cwd
        self.env = dict(env) if env is not None else None
        self.proc: subprocess.Popen | None = None
        self.ready_line = ""
        self.ready_seconds: float | None = None
        self._lines: list[str] = []
        self._lock = threading.Lock()
        self._reader: threading.Thread | None = None

    # -- life cycle ----------------------------------------------------------------------
    def start(self, timeout: float = 60, expect_ready: bool = True) -> "AgentProcess":
        """Run the agent and wait for its ready line (see the module docstring); `timeout` is
        scaled by tests.lab.SLOW."""
        timeout *= SLOW
        if self.tmp is not None:
            self.tmp.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        self.proc = subprocess.Popen(self.argv, cwd=self.cwd, env=self.env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True, errors="replace")
        seen = threading.Event()
        self._reader = threading.Thread(target=self._read_stderr, args=(started, seen),
                                        name=f"agent-stderr-{self.proc.pid}", daemon=True)
        self._reader.start()
        while time.monotonic() - started < timeout:
            if seen.wait(0.05):
                if self.ready_line:
                    return self
                time.sleep(0.05)              # stderr closed: it is exiting
            if self.proc.poll() is not None:
                self._reader.join(5)          # everything it printed before exiting
                if self.ready_line:
                    return self
                if expect_ready:
                    raise AssertionError(
                        f"agent exited {self.proc.returncode}: {self.stderr()[-2000:]}")
                return self
        self.kill()
        if expect_ready:
            raise AssertionError("agent not ready in time: " + self.stderr()[-2000:])
        return self

    def _read_stderr(self, started: float, seen: threading.Event) -> None:
        try:
            for line in self.proc.stderr:
                with self._lock:
                    self._lines.append(line)
                if not self.ready_line and READY.fullmatch(line.rstrip("\n")):
                    self.ready_seconds = time.monotonic() - started
                    self.ready_line = line.rstrip("\n")
                    seen.set()
        finally:
            seen.set()

    @property
    def ready(self) -> bool:
        return bool(self.ready_line)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def send_signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 20) -> int:
        """SIGTERM, then its exit status; killed (and TimeoutExpired) after `timeout` (scaled
        by tests.lab.SLOW)."""
        timeout *= SLOW
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self.kill()

    def kill(self) -> None:
        """SIGKILL if still running; collect the rest of stderr."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        if self._reader is not None:
            self._reader.join(5)
            if not self._reader.is_alive():
                self.proc.stderr.close()

    def __enter__(self) -> "AgentProcess":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- what it printed, wrote and exports ------------------------------------------------
    def stderr(self) -> str:
        """Everything the agent wrote to stderr so far."""
        if self.proc is not None and self.proc.poll() is not None and self._reader is not None:
            self._reader.join(5)
        with self._lock:
            return "".join(self._lines)

    def json_files(self) -> list[Path]:
        """The JSON-lines file and its rotated backups (FILE.N), oldest first: a long run
        rotates it (log.json_max_bytes), and a count of the current file alone would miss
        what went into the backups."""
        if self.json_path is None:
            return []
        backups = [p for p in self.json_path.parent.glob(self.json_path.name + ".*")
                   if p.suffix[1:].isdigit()]
        backups.sort(key=lambda p: int(p.suffix[1:]), reverse=True)
        return backups + ([self.json_path] if self.json_path.exists() else [])

    def records(self, marker: str | None = None) -> list[dict]:
        """The JSON records written so far, in log order, rotated files included (an
        incomplete last line is left out); with `marker`, only those whose path contains it."""
        out = []
        for path in self.json_files():
            lines = path.read_text(errors="replace").split("\n")
            for number, line in enumerate(lines):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError:
                    if number == len(lines) - 1:    # still being written
                        continue
                    raise
                if marker is None or marker in (record.get("path") or ""):
                    out.append(record)
        return out

    def wait_records(self, marker: str, count: int, timeout: float = 15) -> list[dict]:
        """Wait until at least `count` records with `marker` in their path exist."""
        deadline = time.monotonic() + timeout * SLOW
        while time.monotonic() < deadline:
            got = self.records(marker)
            if len(got) >= count:
                return got
            time.sleep(0.1)
        return self.records(marker)

    def records_of(self, pids: int | Iterable[int], count: int,
                   timeout: float = 15) -> list[dict]:
        """Wait until at least `count` records of these pids exist (then a little more, to
        catch duplicates) and return them in log order."""
        pids = {pids} if isinstance(pids, int) else set(pids)

        def of_pids() -> list[dict]:
            return [r for r in self.records() if r.get("pid") in pids]

        deadline = time.monotonic() + timeout * SLOW
        while time.monotonic() < deadline:
            if len(of_pids()) >= count:
                time.sleep(0.5)
                return of_pids()
            time.sleep(0.1)
        return of_pids()

    def count(self, marker: str) -> int:
        """JSON lines containing `marker` anywhere, rotated files included (no parsing)."""
        total = 0
        for path in self.json_files():
            with open(path, encoding="utf-8", errors="replace") as fh:
                total += sum(1 for line in fh if marker in line)
        return total

    def metrics(self) -> str:
        """The Prometheus text it exports."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=10) as r:
            return r.read().decode()

    def metric(self, name: str, labels: str = "") -> float:
        """One sample: `name` with exactly `labels` (e.g. ``'kind="log_write"'``; none when
        empty); 0.0 when absent."""
        pattern = re.escape(name) + (r"\{" + re.escape(labels) + r"\}" if labels else "") + \
            r" ([0-9.e+-]+)$"
        match = re.search(pattern, self.metrics(), re.M)
        return float(match.group(1)) if match else 0.0

    def rss_kib(self) -> int:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+)", status).group(1))

    def rss_mib(self) -> float:
        return round(self.rss_kib() / 1024, 1)
