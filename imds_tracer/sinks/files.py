"""Append-only output files: size rotation, 0600 files, whole lines, failures counted.

Shared by the trace log and the JSON-lines file. A directory removed under the agent is made
again on the next write; a write that fails (disk full) is counted by the caller and the
partial line it left is taken back, so the next line is never glued to half of one.
"""
from __future__ import annotations

import errno
import os


class RotatingFile:
    """Append-only text file with size rotation, safe modes and failure counting."""

    def __init__(self, directory: str, name: str, max_bytes: int, backups: int, *,
                 private_dir: bool = True):
        """private_dir: the directory is ours (the log dir): made and kept 0700. Otherwise
        (a --json file in any directory) it is only made when missing, never chmod'ed."""
        self.directory = directory
        self.private_dir = private_dir
        self.path = os.path.join(directory, name)
        self.max_bytes = max_bytes
        self.backups = backups
        self.failed = 0          # lines that could not be written
        self._fd: int | None = None
        self._size = 0
        self._broken = False     # the last write failed: reopen before the next
        self._half_line = False  # a cut line could not be taken back: start on a new line
        self._open()

    def _open(self) -> None:
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        if self.private_dir:
            os.chmod(self.directory, 0o700)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.fchmod(fd, 0o600)
        self._fd = fd
        self._size = os.fstat(fd).st_size

    def _close(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None

    def reopen(self) -> None:
        """After logrotate moved the file away (SIGHUP), or after a failure."""
        self._close()
        try:
            self._open()
            self._broken = False
        except OSError:
            self._broken = True

    def _rotate(self) -> None:
        self._close()
        if self.backups == 0:
            os.unlink(self.path)
        else:
            for i in range(self.backups - 1, 0, -1):
                src = f"{self.path}.{i}"
                if os.path.exists(src):
                    os.replace(src, f"{self.path}.{i + 1}")
            os.replace(self.path, f"{self.path}.1")
        self._open()

    def write(self, line: str) -> bool:
        data = (line + "\n").encode("utf-8", "replace")
        try:
            if self._broken or self._fd is None or not os.path.exists(self.path):
                self.reopen()  # the directory or file was removed: make it again
                if self._broken:
                    raise OSError(errno.EIO, "cannot reopen")
            if self._size and self._size + len(data) > self.max_bytes:
                self._rotate()
            if self._half_line:
                data = b"\n" + data
            written = os.write(self._fd, data)
            self._size += written
            if written != len(data):
                self._take_back(written)
                raise OSError(errno.ENOSPC, "short write")
            self._half_line = False
            return True
        except OSError:
            self.failed += 1
            self._broken = True
            return False

    def _take_back(self, count: int) -> None:
        """Remove the start of a line that did not fit (disk full): left there, the next line
        would be glued to it. If that fails, the next line starts with a newline instead."""
        try:
            os.ftruncate(self._fd, max(0, os.fstat(self._fd).st_size - count))
            self._size = max(0, self._size - count)
        except OSError:
            self._half_line = True

    def close(self) -> None:
        self._close()
