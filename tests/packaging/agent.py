"""The agent started from the source tree with the OS python (BCC is importable only there),
for the packaging tests that need the real thing."""
from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Agent:
    """The agent started from the source tree with the OS python; `ready` once it printed
    `ready backend=`; `stop()` sends SIGTERM and returns (exit status, stderr)."""

    def __init__(self, command: list[str], timeout: float = 90):
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True, cwd="/", env=env)
        self.err: list[str] = []
        self.ready = False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rlist, _, _ = select.select([self.proc.stderr], [], [], 0.5)
            if rlist:
                line = self.proc.stderr.readline()
                if not line:
                    break
                self.err.append(line)
                if line.startswith("ready backend="):
                    self.ready = True
                    break
            elif self.proc.poll() is not None:
                break

    def stop(self) -> tuple[int | None, str]:
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM if self.ready else signal.SIGKILL)
            rest, _ = self.proc.communicate(timeout=60)
            self.err.append(rest or "")
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode, "".join(self.err)


def agent_command(workdir: Path) -> list[str]:
    return ["/usr/bin/python3", "-m", "imds_tracer", "run", "--backend", "tracepoint",
            "--log-dir", str(workdir / "logs"), "--json", str(workdir / "requests.jsonl"),
            "--metrics-addr", f"127.0.0.1:{_free_port()}", "--quiet"]
