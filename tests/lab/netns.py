"""A throw-away network namespace holding the metadata addresses, a fake IMDS and real clients.

`Lab` is a context manager. On entry it

1. creates a uniquely named network namespace (``imdslab-<pid>-<hex>``),
2. brings its ``lo`` up and adds ``169.254.169.254/32``, ``100.100.100.200/32`` and
   ``fd00:ec2::254/128`` (``nodad``) to *that* loopback -- never to the host's (SPEC §6: the
   host's metadata addresses must not be routed anywhere),
3. starts ``python -m tests.lab.fake_imds`` inside it (``ip netns exec``) and waits until it
   listens on every address.

Inside, `run` / `popen` start real clients (``ip netns exec NS argv...``), optionally inside a
cgroup v2 directory (`make_cgroup`): the process joins the cgroup *before* ``ip netns exec``,
which remounts ``/sys``. `capture` records the namespace's loopback with tcpdump.

On exit (also after an exception) it kills the processes it started (by pid), every process
still inside its namespace, deletes the namespace, removes the cgroups it created and its
temporary directory.

Example::

    from tests.lab.netns import Lab, AWS_IP

    with Lab(mode="optional") as lab:
        with lab.capture("/tmp/x.pcap"):
            lab.run(["curl", "-s", f"http://{AWS_IP}/latest/meta-data/instance-id"], check=True)
        print(lab.records()[-1]["status"], lab.issued_tokens())

Needs root, iproute2 (``ip``), and for `capture` tcpdump. `available()` tells whether the
lab can run here (tests skip otherwise).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator, Sequence

AWS_IP = "169.254.169.254"
ALIYUN_IP = "100.100.100.200"
AWS_IP6 = "fd00:ec2::254"
LAB_ADDRS = (AWS_IP, ALIYUN_IP, AWS_IP6)


def _cgroup2_root() -> Path:
    """Where cgroup v2 is mounted: /sys/fs/cgroup/unified (hybrid hosts) or /sys/fs/cgroup."""
    try:
        with open("/proc/self/mounts") as mounts:
            for line in mounts:
                fields = line.split()
                if len(fields) > 2 and fields[2] == "cgroup2" and fields[1].startswith("/sys/fs/cgroup"):
                    return Path(fields[1])
    except OSError:
        pass
    return Path("/sys/fs/cgroup/unified")


CGROUP2_ROOT = _cgroup2_root()
NS_PREFIX = "imdslab-"
REPO_ROOT = Path(__file__).resolve().parents[2]


class LabError(RuntimeError):
    """The lab could not be set up (the message says which step failed and why)."""


def available() -> str | None:
    """None when a lab can be created here, else the reason it cannot (for pytest.skip)."""
    if os.geteuid() != 0:
        return "the netns lab needs root"
    if not shutil.which("ip"):
        return "iproute2 (ip) is not installed"
    return None


def _sh(argv: Sequence[str], check: bool = True, timeout: float = 20) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise LabError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_pid(pid: int, wait: float = 3.0) -> None:
    """SIGTERM, then SIGKILL after `wait` seconds, one pid."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if not _pid_alive(pid) or _is_zombie(pid):
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def cleanup_stale() -> list[str]:
    """Delete lab namespaces left by *dead* lab processes (``imdslab-<pid>-*``, pid gone).

    Only namespaces with this module's prefix whose creating process no longer exists are
    touched. Returns the names deleted.
    """
    out = _sh(["ip", "netns", "list"], check=False).stdout
    gone = []
    for line in out.splitlines():
        name = line.split()[0] if line.split() else ""
        m = re.fullmatch(NS_PREFIX + r"(\d+)-[0-9a-f]+", name)
        if m and not _pid_alive(int(m.group(1))):
            for pid in _sh(["ip", "netns", "pids", name], check=False).stdout.split():
                _kill_pid(int(pid))
            if _sh(["ip", "netns", "delete", name], check=False).returncode == 0:
                gone.append(name)
    return gone


class Capture:
    """A running tcpdump inside the lab namespace; `stop` ends it with a complete file."""

    def __init__(self, lab: "Lab", path: str | os.PathLike, bpf_filter: str = "tcp port 80",
                 iface: str = "lo", ready_timeout: float = 10.0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not shutil.which("tcpdump"):
            raise LabError("tcpdump is not installed")
        self._proc = lab.popen(["tcpdump", "-i", iface, "-U", "--immediate-mode", "-n",
                                "-w", str(self.path), bpf_filter],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self._lab = lab
        self.stderr_lines: list[str] = []
        ready = threading.Event()

        def reader():
            for line in self._proc.stderr:
                self.stderr_lines.append(line.rstrip("\n"))
                if "listening on" in line:
                    ready.set()
            ready.set()

        self._reader = threading.Thread(target=reader, daemon=True)
        self._reader.start()
        if not ready.wait(ready_timeout) or self._proc.poll() is not None:
            self.stop()
            raise LabError("tcpdump did not start: " + " | ".join(self.stderr_lines))
        self.stats: dict[str, int] = {}

    def stop(self, settle: float = 0.3) -> dict[str, int]:
        """Let in-flight packets land (`settle` s), SIGINT tcpdump, wait, return its counters
        (``captured``, ``received by filter``, ``dropped by kernel``)."""
        if self._proc.poll() is None:
            time.sleep(settle)
            self._proc.send_signal(signal.SIGINT)
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._reader.join(timeout=5)
        self._lab._forget(self._proc)
        for line in self.stderr_lines:
            m = re.match(r"(\d+) packets? (captured|received by filter|dropped by kernel)", line)
            if m:
                self.stats[m.group(2)] = int(m.group(1))
        return self.stats


class Lab:
    """A network namespace with the metadata addresses on its loopback and a fake IMDS in it.

    Args:
        mode: token mode of the fake server for every provider (``optional``/``required``).
        modes: per-provider override, e.g. ``{"aws": "required"}``.
        addrs: addresses to put on the namespace loopback and serve on.
        port: the fake server's port (80).
        serve: start the fake server (False: only the namespace and addresses).
        keep_dir: do not delete the temporary directory (server log) on exit.
        server_args: more arguments for the fake server (e.g. ``("--token-put", "drop")``).

    Attributes: ``ns`` (namespace name), ``workdir`` (temporary directory),
    ``server_log`` (the fake server's JSON-lines request log).
    """

    def __init__(self, mode: str = "optional", modes: dict[str, str] | None = None,
                 addrs: Sequence[str] = LAB_ADDRS, port: int = 80, serve: bool = True,
                 keep_dir: bool = False, python: str = sys.executable,
                 server_args: Sequence[str] = ()):
        self.mode = mode
        self.modes = dict(modes or {})
        self.addrs = tuple(addrs)
        self.port = port
        self.serve = serve
        self.keep_dir = keep_dir
        self.python = python
        self.server_args = tuple(server_args)
        self.ns = f"{NS_PREFIX}{os.getpid()}-{secrets.token_hex(3)}"
        self.workdir: Path | None = None
        self.server_log: Path | None = None
        self._procs: list[subprocess.Popen] = []
        self._cgroups: list[Path] = []
        self._ns_created = False
        self._server: subprocess.Popen | None = None

    # ------------------------------------------------------------------ life cycle
    def __enter__(self) -> "Lab":
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        reason = available()
        if reason:
            raise LabError(reason)
        cleanup_stale()
        self.workdir = Path(tempfile.mkdtemp(prefix="imdslab-"))
        self.server_log = self.workdir / "fake_imds.jsonl"
        self.server_log.touch()
        _sh(["ip", "netns", "add", self.ns])
        self._ns_created = True
        _sh(["ip", "-n", self.ns, "link", "set", "lo", "up"])
        for addr in self.addrs:
            if ":" in addr:
                # a new namespace may start with IPv6 disabled on lo
                self.run(["sysctl", "-qw", "net.ipv6.conf.lo.disable_ipv6=0"], check=False)
                _sh(["ip", "-n", self.ns, "addr", "add", f"{addr}/128", "dev", "lo", "nodad"])
            else:
                _sh(["ip", "-n", self.ns, "addr", "add", f"{addr}/32", "dev", "lo"])
        if self.serve:
            self._start_server()

    def _start_server(self, timeout: float = 15.0) -> None:
        argv = [self.python, "-m", "tests.lab.fake_imds", "--port", str(self.port),
                "--mode", self.mode, "--log", str(self.server_log)]
        for prov, mode in self.modes.items():
            argv += [f"--{prov}-mode", mode]
        for addr in self.addrs:
            argv += ["--bind", addr]
        argv += self.server_args
        self._server = self.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, cwd=str(REPO_ROOT))
        ready: list[str] = []
        done = threading.Event()

        def reader():
            for line in self._server.stdout:
                if line.startswith("READY"):
                    ready.append(line)
                    if len(ready) == len(self.addrs):
                        done.set()
            done.set()

        threading.Thread(target=reader, daemon=True).start()
        if not done.wait(timeout) or len(ready) != len(self.addrs):
            err = ""
            if self._server.poll() is not None:
                err = self._server.stderr.read()
            raise LabError(f"fake IMDS did not start in {self.ns}: {err.strip() or 'timeout'}")

    def close(self) -> None:
        """Tear everything down; never raises, safe to call twice."""
        for proc in list(self._procs):
            if proc.poll() is None:
                _kill_pid(proc.pid)
            with contextlib.suppress(Exception):
                proc.wait(timeout=5)
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream:
                    with contextlib.suppress(Exception):
                        stream.close()
        self._procs.clear()
        if self._ns_created:
            # anything still inside our namespace was started by us (e.g. a client's child)
            for pid in _sh(["ip", "netns", "pids", self.ns], check=False).stdout.split():
                _kill_pid(int(pid))
            for _ in range(10):
                if _sh(["ip", "netns", "delete", self.ns], check=False).returncode == 0:
                    break
                time.sleep(0.2)
            self._ns_created = False
        for cg in reversed(self._cgroups):
            for _ in range(20):
                try:
                    cg.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.1)
        self._cgroups.clear()
        if self.workdir and not self.keep_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # ------------------------------------------------------------------ clients
    def wrap(self, argv: Sequence[str], cgroup: str | os.PathLike | None = None) -> list[str]:
        """The argv that runs `argv` inside the namespace (and first joins `cgroup`)."""
        argv = [str(a) for a in argv]
        if cgroup is None:
            return ["ip", "netns", "exec", self.ns, *argv]
        cg = self._cgroup_path(cgroup)
        script = 'cg=$1; ns=$2; shift 2; echo $$ > "$cg/cgroup.procs" && exec ip netns exec "$ns" "$@"'
        return ["sh", "-c", script, "sh", str(cg), self.ns, *argv]

    def run(self, argv: Sequence[str], cgroup: str | os.PathLike | None = None,
            timeout: float = 60, check: bool = False, **kw) -> subprocess.CompletedProcess:
        """`subprocess.run` of `argv` inside the namespace (default: capture text output)."""
        kw.setdefault("capture_output", not ({"stdout", "stderr"} & kw.keys()))
        kw.setdefault("text", True)
        kw.setdefault("env", self.env())
        proc = subprocess.run(self.wrap(argv, cgroup), timeout=timeout, **kw)
        if check and proc.returncode != 0:
            raise LabError(f"{argv!r} failed in {self.ns} ({proc.returncode}): "
                           f"{(proc.stderr or '').strip()}")
        return proc

    def popen(self, argv: Sequence[str], cgroup: str | os.PathLike | None = None,
              **kw) -> subprocess.Popen:
        """`subprocess.Popen` of `argv` inside the namespace; killed (by pid) on close."""
        kw.setdefault("env", self.env())
        proc = subprocess.Popen(self.wrap(argv, cgroup), **kw)
        self._procs.append(proc)
        return proc

    def _forget(self, proc: subprocess.Popen) -> None:
        if proc.poll() is not None and proc in self._procs:
            self._procs.remove(proc)

    def env(self) -> dict[str, str]:
        """Environment for clients: no proxies, the repository importable."""
        env = {k: v for k, v in os.environ.items()
               if k.lower() not in ("http_proxy", "https_proxy", "all_proxy", "no_proxy")}
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
        return env

    # ------------------------------------------------------------------ cgroups
    def _cgroup_path(self, cgroup: str | os.PathLike) -> Path:
        path = Path(cgroup)
        if not path.is_absolute():
            path = CGROUP2_ROOT / path
        return path

    def make_cgroup(self, relpath: str) -> Path:
        """Create a cgroup v2 directory under CGROUP2_ROOT (parents too) and return
        it; every directory created here is removed on close. Example relpath:
        ``system.slice/docker-<64 hex>.scope``."""
        path = self._cgroup_path(relpath)
        if CGROUP2_ROOT not in path.parents:
            raise LabError(f"{path} is not below {CGROUP2_ROOT}")
        missing = []
        p = path
        while not p.exists():
            missing.append(p)
            p = p.parent
        for p in reversed(missing):
            p.mkdir()
            self._cgroups.append(p)
        return path

    # ------------------------------------------------------------------ capture & records
    @contextlib.contextmanager
    def capture(self, path: str | os.PathLike, bpf_filter: str = "tcp port 80") -> Iterator[Capture]:
        """tcpdump on the namespace loopback into `path` (pcap) while the block runs."""
        cap = Capture(self, path, bpf_filter)
        try:
            yield cap
        finally:
            cap.stop()

    def records(self) -> list[dict]:
        """Every request the fake server answered so far (see `tests.lab.fake_imds`)."""
        if not self.server_log or not self.server_log.exists():
            return []
        return [json.loads(line) for line in self.server_log.read_text().splitlines() if line]

    def issued_tokens(self) -> list[str]:
        """Every token the fake server issued so far."""
        return [r["token_issued"] for r in self.records() if r.get("token_issued")]


# A cgroup-v1-only host (EL8 / Alibaba Cloud Linux 3 defaults) inside a private mount
# namespace: the v2 mount hidden, a tmpfs with v1 hierarchies in its place. Shell lines, to be
# followed by what runs on that "host" (run with `unshare -m sh -c ...`).
V1_ONLY_CGROUPS = r"""
set -e
mount --make-rprivate /
umount -R -l /sys/fs/cgroup
mount -t tmpfs cgroup /sys/fs/cgroup
for c in memory pids; do
    mkdir -p /sys/fs/cgroup/$c && mount -t cgroup -o $c cgroup /sys/fs/cgroup/$c
done
"""
