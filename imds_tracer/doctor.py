"""`imds-tracer doctor`: what this kernel and this process can do, which backend `run` would
use, and how to fix what is missing. Exit status 0 when a backend can run, 1 when none can.

Every check is a small function returning a `Check`; the last one really compiles, loads and
attaches the chosen backend and detaches it again (a dry run of `run`).
"""
from __future__ import annotations

import ctypes
import errno
import gzip
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

TRACEFS = Path("/sys/kernel/tracing")
BTF = Path("/sys/kernel/btf/vmlinux")
SYSCALL_TRACEPOINTS = ("connect", "write", "writev", "sendto", "sendmsg", "read", "readv",
                       "recvfrom", "recvmsg", "close", "execve")
CAPS = {"CAP_SYS_ADMIN": 21, "CAP_PERFMON": 38, "CAP_BPF": 39}
SYS_BPF = {"x86_64": 321, "aarch64": 280, "ppc64le": 361, "s390x": 351, "riscv64": 280}


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    required: bool = True   # False: informational (a missing one does not stop any backend)


def kernel_config(option: str) -> str | None:
    """'y', 'm', 'n' (not set) or None (config not readable)."""
    release = platform.release()
    for path in (Path("/proc/config.gz"), Path(f"/boot/config-{release}")):
        try:
            if path.suffix == ".gz":
                text = gzip.decompress(path.read_bytes()).decode("ascii", "replace")
            else:
                text = path.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith(option + "="):
                return line.split("=", 1)[1]
            if line == f"# {option} is not set":
                return "n"
        return "n"
    return None


def check_bpf_syscall() -> Check:
    nr = SYS_BPF.get(platform.machine())
    if nr is None:
        return Check("BPF syscall", True, f"not probed on {platform.machine()}", required=False)
    from .sources.helpers import raise_memlock
    raise_memlock()
    libc = ctypes.CDLL(None, use_errno=True)

    class MapAttr(ctypes.Structure):
        _fields_ = [("map_type", ctypes.c_uint32), ("key_size", ctypes.c_uint32),
                    ("value_size", ctypes.c_uint32), ("max_entries", ctypes.c_uint32),
                    ("pad", ctypes.c_uint8 * 112)]

    attr = MapAttr(2, 4, 4, 1)  # BPF_MAP_TYPE_ARRAY
    fd = libc.syscall(nr, 0, ctypes.byref(attr), ctypes.sizeof(attr))  # BPF_MAP_CREATE
    if fd >= 0:
        os.close(fd)
        return Check("BPF syscall", True, "usable (created a map)")
    err = ctypes.get_errno()
    fix = "run as root (or with CAP_BPF + CAP_PERFMON)"
    if err == errno.ENOSYS:
        fix = "kernel built without CONFIG_BPF_SYSCALL: no backend can run"
    return Check("BPF syscall", False, f"bpf(BPF_MAP_CREATE) failed: {os.strerror(err)}", fix)


def check_cgroup2() -> Check:
    from .sources.cgroup import PRIVATE_CGROUP2, CgroupSource, cgroup2_root
    why_not = CgroupSource.unavailable_reason()
    if why_not:
        return Check("cgroup v2", False, why_not, "the kprobe and tracepoint backends work "
                     "without it", required=False)
    root = cgroup2_root()
    where = (f"root of the hierarchy at {root}" if root else
             f"none mounted (a cgroup v1 host): the cgroup backend mounts its own at "
             f"{PRIVATE_CGROUP2} while it runs (this process has CAP_SYS_ADMIN; without "
             f"it, 'imds-tracer cgroup2 mount' first)")
    owners = "sockets connected before the agent started are adopted at start"
    return Check("cgroup v2", True, f"{where}; {owners}", required=False)


def check_tracefs() -> Check:
    if os.path.isdir(TRACEFS / "events"):
        return Check("tracefs", True, f"mounted at {TRACEFS}", required=False)
    return Check("tracefs", False, f"{TRACEFS}/events missing",
                 f"mount -t tracefs tracefs {TRACEFS} (tracepoint backend; the others use it "
                 "for argv and parents of processes that exit early)", required=False)


def check_syscall_tracepoints() -> Check:
    missing = [f"sys_enter_{n}" for n in SYSCALL_TRACEPOINTS
               if not os.path.exists(TRACEFS / "events" / "syscalls" / f"sys_enter_{n}")]
    if not missing:
        return Check("syscall tracepoints", True, f"present ({len(SYSCALL_TRACEPOINTS)} checked)",
                     required=False)
    return Check("syscall tracepoints", False, "missing: " + ", ".join(missing[:4]),
                 "mount tracefs; the kernel needs CONFIG_FTRACE_SYSCALLS (tracepoint backend)",
                 required=False)


def check_kprobes() -> Check:
    config = kernel_config("CONFIG_KPROBES")
    events = os.path.exists(TRACEFS / "kprobe_events")
    pmu = os.path.exists("/sys/bus/event_source/devices/kprobe")
    if events or pmu:
        return Check("kprobes", True, f"available (CONFIG_KPROBES={config or '?'})",
                     required=False)
    return Check("kprobes", False,
                 f"not available (CONFIG_KPROBES={'not set' if config == 'n' else config or '?'}, "
                 f"no {TRACEFS}/kprobe_events)",
                 "the cgroup and tracepoint backends work without them",
                 required=False)


def headers_release(build: Path) -> str | None:
    for rel in ("include/config/kernel.release",):
        try:
            return (build / rel).read_text().strip()
        except OSError:
            pass
    try:
        text = (build / "include/generated/utsrelease.h").read_text()
        return text.split('"')[1]
    except (OSError, IndexError):
        return None


def check_headers() -> Check:
    release = platform.release()
    build = Path("/lib/modules") / release / "build"
    if not os.path.exists(build):
        return Check("kernel headers", False, f"none at {build}",
                     f"apt-get install linux-headers-{release} (or the distro's generic headers "
                     "linked there: `make deps` does it)")
    found = headers_release(build)
    target = os.path.realpath(build)
    if found == release:
        return Check("kernel headers", True, f"{target} (match the running kernel)")
    return Check("kernel headers", True,
                 f"{target} are {found or 'unknown version'}, not {release}: enough for BCC to "
                 "compile; every struct offset the backends read comes from BTF, not from "
                 "the headers")


def check_btf() -> Check:
    if not os.path.exists(BTF):
        return Check("BTF", False, f"no {BTF}",
                     "kprobe backend needs CONFIG_DEBUG_INFO_BTF for struct offsets",
                     required=False)
    try:
        from .sources.btf import Btf, exec_argv_constants, kprobe_constants
        btf = Btf.load()
        consts = kprobe_constants(btf)
        argv = exec_argv_constants(btf)
    except Exception as exc:  # BtfError or a malformed blob
        return Check("BTF", False, f"{BTF}: {exc}", "kprobe backend unavailable; the cgroup "
                     "backend takes argv from /proc", required=False)
    ubuf = consts["IMDS_OFF_ITER_UBUF"]
    return Check("BTF", True, f"{BTF}: kprobe offsets resolved (iov_iter type: "
                 f"{consts['IMDS_ITER_TYPE_SIZE']} byte(s) at +{consts['IMDS_OFF_ITER_TYPE']}, "
                 f"ITER_IOVEC={consts['IMDS_ITER_IOVEC']}; "
                 + (f"ubuf at +{ubuf}" if ubuf >= 0 else "no ITER_UBUF") + ", "
                 f"sock_common.skc_daddr at "
                 f"+{consts['IMDS_OFF_SKC_DADDR']}); exec argv offsets (mm_struct.arg_start at "
                 f"+{argv['IMDS_MM_ARG_START_OFF']})", required=False)


def check_capabilities() -> Check:
    from .sources.helpers import effective_caps
    caps = effective_caps()
    have = [name for name, bit in CAPS.items() if caps >> bit & 1]
    enough = "CAP_SYS_ADMIN" in have or {"CAP_BPF", "CAP_PERFMON"} <= set(have)
    detail = "effective: " + (", ".join(have) if have else "none of " + ", ".join(CAPS))
    return Check("capabilities", enough, detail,
                 "" if enough else "run as root, or grant CAP_BPF CAP_PERFMON (CAP_SYS_ADMIN "
                 "on kernels before 5.8)")


def check_bcc() -> Check:
    from .sources.base import SourceError
    from .sources.bcc_module import INSTALL_HINT, import_bcc
    try:
        bcc = import_bcc()
    except SourceError:
        return Check("BCC", False, f"not importable from {sys.executable}, nor found in "
                     "another Python's site-packages", INSTALL_HINT + "; a venv needs "
                     "--system-site-packages")
    version = getattr(bcc, "__version__", "?")
    return Check("BCC", True, f"bcc {version} ({Path(bcc.__file__).parent})")


def check_lockdown() -> Check:
    try:
        text = Path("/sys/kernel/security/lockdown").read_text().strip()
    except OSError:
        return Check("lockdown", True, "not reported", required=False)
    mode = text[text.find("[") + 1:text.find("]")] if "[" in text else text
    ok = mode != "confidentiality"
    return Check("lockdown", ok, mode,
                 "" if ok else "lockdown=confidentiality forbids reading kernel/user memory "
                 "from BPF", required=False)


def dry_run(config) -> tuple[Check, str | None, list[str]]:
    """Selects, compiles, loads and attaches the backend `run --backend auto` would use (the
    same function run calls), then detaches it: (check, backend, backends passed over)."""
    from .sources.base import SourceError
    from .sources.kernel import select_backend
    started = time.monotonic()
    try:
        source, passed_over = select_backend(config, "auto")
    except SourceError as exc:
        return Check("dry run", False, str(exc), "see the failed checks above"), None, []
    try:
        took = time.monotonic() - started
        return Check("dry run", True, f"{source.name} backend compiled, loaded and attached "
                     f"{source.probes} probes in {took:.1f}s, then detached"), \
            source.name, passed_over
    finally:
        source.stop()


def guess_backend(config) -> tuple[str | None, list[str]]:
    """Without loading: the first backend the checks that need no compile do not rule out."""
    from .sources.base import SourceError
    from .sources.kernel import select_backend
    try:
        source, passed_over = select_backend(config, "auto", load=False)
    except SourceError:
        return None, []
    return source.name, passed_over


def main(config, *, load: bool = True, out=None) -> int:
    out = out or sys.stdout
    print(f"imds-tracer doctor: Linux {platform.release()} ({platform.machine()}), "
          f"python {platform.python_version()} at {sys.executable}", file=out)
    checks = [check_bpf_syscall(), check_capabilities(), check_bcc(), check_cgroup2(),
              check_tracefs(), check_syscall_tracepoints(), check_kprobes(), check_btf(),
              check_headers(), check_lockdown()]
    essentials = all(c.ok for c in checks if c.required)
    if essentials and load:
        check, backend, why_not = dry_run(config)
        checks.append(check)
    else:
        backend, why_not = guess_backend(config)
    for c in checks:
        mark = "ok" if c.ok else ("MISSING" if c.required else "no")
        print(f"  [{mark:>7}] {c.name}: {c.detail}", file=out)
        if not c.ok and c.fix:
            print(f"            fix: {c.fix}", file=out)
    runnable = backend is not None and all(c.ok for c in checks if c.required)
    if runnable and load:
        print(f"backend: --backend auto would use {backend}", file=out)
    elif runnable:
        print(f"backend: --backend auto would try {backend} first (not loaded: the load test "
              "may still refuse it)", file=out)
    else:
        print("backend: none can run here", file=out)
    for reason in why_not:
        print(f"  not {reason}", file=out)
    return 0 if runnable else 1


if __name__ == "__main__":  # pragma: no cover - `imds-tracer doctor` is the entry point
    from .config import Config
    sys.exit(main(Config()))
