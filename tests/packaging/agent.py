"""The agent started from the source tree with the OS python (BCC is importable only there),
for the packaging tests that need the real thing: a thin adapter over
tests.lab.agent.AgentProcess for a ready-made (possibly sandboxed) command line."""
from __future__ import annotations

import os
from pathlib import Path

from tests.lab.agent import AgentProcess

ROOT = Path(__file__).resolve().parents[2]
OS_PYTHON = "/usr/bin/python3"


class Agent:
    """`command` started at once (cwd /, the source tree on PYTHONPATH); `ready` once it
    printed `ready backend=` (a non-ready one is killed after `timeout`); `stop()` sends
    SIGTERM and returns (exit status, stderr)."""

    def __init__(self, command: list[str], timeout: float = 90):
        self._agent = AgentProcess(argv=command, cwd="/",
                                   env=dict(os.environ, PYTHONPATH=str(ROOT)))
        self._agent.start(timeout, expect_ready=False)
        self.proc = self._agent.proc
        self.ready = self._agent.ready

    @property
    def err(self) -> list[str]:
        """Its stderr so far, line by line."""
        return self._agent.stderr().splitlines(keepends=True)

    def stop(self) -> tuple[int | None, str]:
        status = self._agent.stop(timeout=60)
        return status, self._agent.stderr()


def agent_command(workdir: Path, backend: str = "auto") -> list[str]:
    """`imds-tracer run --backend B` with its files in `workdir`, for `Agent`."""
    return AgentProcess(workdir, python=OS_PYTHON, backend=backend).argv
