"""Append-only output files: size rotation, 0600 files, whole lines, failures counted.

A file is opened with O_NOFOLLOW (a symlink planted in its place is refused, never written
through) and must be a regular file; only a file the agent created is given mode 0600, and
only a directory it created is given 0700: the agent never chmods what someone else made.

Shared by the trace log and the JSON-lines file. Lines are queued and written by `flush()`
(the sinks flush at the end of every poll, at reopen and at close): one write() per batch,
not one per line, and the check that the file is still there once per batch. A directory
removed under the agent is made again on the next flush; a write that fails (disk full) is
counted by the caller and the partial line it left is taken back, so the next line is never
glued to half of one.
"""
from __future__ import annotations

import errno
import fcntl
import os
import stat

PENDING_MAX = 256  # lines queued before add() writes them without waiting for flush()
LOCK_NAME = "imds-tracer.lock"  # in the log directory: one writer per directory
_OPEN = os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK


def make_dir(directory: str, *, private: bool) -> None:
    """The directory, made if missing (0700 when `private`); a path that exists and is not a
    directory is a clear error, not "File exists"."""
    if os.path.isdir(directory):
        return
    if os.path.lexists(directory):
        raise NotADirectoryError(errno.ENOTDIR, "not a directory", directory)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    if private:
        os.chmod(directory, 0o700)  # made by us just now: umask may have narrowed it


def open_append(path: str) -> int:
    """An fd appending to `path`: never through a symlink, never to a FIFO or device, and
    mode 0600 only when this call created the file."""
    try:
        fd = os.open(path, _OPEN | os.O_CREAT | os.O_EXCL, 0o600)
        created = True
    except FileExistsError:
        try:
            fd = os.open(path, _OPEN)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise OSError(errno.ELOOP, "a symbolic link, not written through",
                              path) from None
            raise
        created = False
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", path)
        if created:
            os.fchmod(fd, 0o600)
    except BaseException:
        os.close(fd)
        raise
    return fd


class DirectoryLock:
    """flock on LOCK_NAME in a log directory, held for the life of the writer: a second agent
    (run or replay) on the same directory is refused with one line saying who holds it."""

    def __init__(self, directory: str):
        make_dir(directory, private=True)
        path = os.path.join(directory, LOCK_NAME)
        self.fd = open_append(path)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(path)
            os.close(self.fd)
            raise OSError(errno.EBUSY, f"in use by another imds-tracer{holder} (it holds "
                          f"{LOCK_NAME}; one agent per log directory)", directory) from None
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"{os.getpid()}\n".encode())

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _read_pid(path: str) -> str:
    try:
        with open(path, "rb") as fh:
            pid = fh.read(32).strip()
    except OSError:
        return ""
    return f" (pid {int(pid)})" if pid.isdigit() else ""


class RotatingFile:
    """Append-only text file with size rotation, safe modes and failure counting."""

    def __init__(self, directory: str, name: str, max_bytes: int, backups: int, *,
                 private_dir: bool = True, on_failure=None):
        """private_dir: the directory is ours (the log dir): made and kept 0700. Otherwise
        (a --json file in any directory) it is only made when missing, never chmod'ed.
        on_failure: called with the number of lines that could not be written."""
        self.directory = directory
        self.private_dir = private_dir
        self.path = os.path.join(directory, name)
        self.max_bytes = max_bytes
        self.backups = backups
        self.failed = 0          # lines that could not be written
        self.on_failure = on_failure
        self._fd: int | None = None
        self._size = 0
        self._broken = False     # the last write failed: reopen before the next
        self._half_line = False  # a cut line could not be taken back: start on a new line
        self._pending: list[str] = []
        self._open()

    def _open(self) -> None:
        make_dir(self.directory, private=self.private_dir)
        fd = open_append(self.path)
        self._fd = fd
        self._size = os.fstat(fd).st_size

    def _close(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None

    def reopen(self) -> int:
        """After logrotate moved the file away (SIGHUP): the queued lines go to the file as it
        was, then the path is opened anew. Returns how many lines could not be written."""
        failed = self.flush(same_file=True)
        self._reopen()
        return failed

    def _reopen(self) -> None:
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

    def add(self, line: str) -> int:
        """Queue a line for the next flush(). Returns how many lines could not be written
        (only when the queue was full and written at once)."""
        self._pending.append(line)
        return self.flush() if len(self._pending) >= PENDING_MAX else 0

    def write(self, line: str) -> bool:
        """Write a line now (with whatever was queued); True when all went in."""
        return self.add(line) + self.flush() == 0

    def flush(self, *, same_file: bool = False) -> int:
        """Write the queued lines, one write() per file they go to. Returns how many could not
        be written (also counted in `failed`): after a failure, the rest of the batch too.
        same_file: into the open file even if it was moved away (reopen)."""
        lines, self._pending = self._pending, []
        if not lines:
            return 0
        done = 0
        try:
            if self._broken or self._fd is None or \
                    not (same_file or os.path.exists(self.path)):
                self._reopen()  # the directory or file was removed: make it again
                if self._broken:
                    raise OSError(errno.EIO, "cannot reopen")
            for i, (data, count) in enumerate(self._runs(lines)):
                if i:
                    self._rotate()
                written = self._write_lines(data, count)
                done += written
                if written != count:
                    raise OSError(errno.ENOSPC, "short write")
        except OSError:
            self.failed += len(lines) - done
            self._broken = True
            if self.on_failure is not None:
                self.on_failure(len(lines) - done)
        return len(lines) - done

    def _runs(self, lines: list[str]) -> list[tuple[bytes, int]]:
        """The lines encoded, as (bytes, number of lines) per file they go to: this one, then
        a new one after each rotation (a line that would take the file past max_bytes starts
        the next)."""
        data = ("\n".join(lines) + "\n").encode("utf-8", "replace")
        if self._size + len(data) <= self.max_bytes:
            return [(data, len(lines))]  # the usual batch: no rotation inside it
        runs: list[tuple[bytes, int]] = []
        run: list[bytes] = []
        size = self._size
        for line in lines:
            data = (line + "\n").encode("utf-8", "replace")
            if size and size + len(data) > self.max_bytes:
                runs.append((b"".join(run), len(run)))
                run, size = [], 0
            run.append(data)
            size += len(data)
        runs.append((b"".join(run), len(run)))
        return runs

    def _write_lines(self, data: bytes, lines: int) -> int:
        """One write() of whole lines; returns how many went in. A write cut short (disk full)
        keeps the whole lines and takes back the cut one."""
        if not lines:
            return 0
        prefix = b"\n" if self._half_line else b""
        data = prefix + data
        written = os.write(self._fd, data)
        self._size += written
        if written == len(data):
            self._half_line = False
            return lines
        kept = data.rfind(b"\n", 0, written) + 1
        if kept:
            self._half_line = False  # the prefix, if any, ended the cut line
        if written > kept:
            self._take_back(written - kept)
        return data.count(b"\n", 0, kept) - (1 if prefix and kept else 0)

    def _take_back(self, count: int) -> None:
        """Remove the start of a line that did not fit (disk full): left there, the next line
        would be glued to it. If that fails, the next line starts with a newline instead."""
        try:
            os.ftruncate(self._fd, max(0, os.fstat(self._fd).st_size - count))
            self._size = max(0, self._size - count)
        except OSError:
            self._half_line = True

    def close(self) -> None:
        """Queued lines are written first (the sinks flush before, to count failures)."""
        self.flush()
        self._close()
