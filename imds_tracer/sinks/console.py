"""The trace-log line on a terminal (stderr by default), for `run` in the foreground."""
from __future__ import annotations

import sys

from ..model import RequestRecord
from .tracelog import format_line


class ConsoleSink:
    def __init__(self, stream=None):
        self.stream = stream or sys.stderr

    def emit(self, record: RequestRecord) -> None:
        try:
            print(format_line(record), file=self.stream, flush=True)
        except (OSError, ValueError):
            pass  # a closed terminal must not stop the agent

    def drops(self, counts: dict[str, int], ts: float) -> None:
        pass

    def reopen(self) -> None:
        pass

    def close(self) -> None:
        pass
