"""The loader: the one short-lived process that imports BCC, compiles `bpf/*.c`, fills the
config maps, attaches the programs and opens the event output, then hands the agent every
file descriptor it needs over a Unix socket (SCM_RIGHTS) with a small JSON manifest and exits
with os._exit: no BCC clean-up runs, so nothing is detached by its exit.

The agent (`load()` below) runs it as `python -m imds_tracer.sources.loader FD SPEC` -- an
exec, not a fork: the agent may have threads -- and keeps the descriptors: BPF links (cgroup
hooks), perf event fds (tracepoints, kprobes), the ring buffer or the per-CPU perf buffers,
and the maps it reads. Programs therefore stay attached exactly as long as the agent lives,
and libLLVM / libclang are never mapped in the agent. If the loader fails or dies half-way,
its own descriptors close with it and nothing stays attached; the agent gets one line.
"""
from __future__ import annotations

import time

_STARTED = time.monotonic()   # the loader's interpreter is up (see Job.marks)

import contextlib
import ctypes
import json
import logging
import os
import platform
import re
import socket
import struct
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import List, NamedTuple

from . import bpfsys, caps, helpers
from .base import SourceError
from .bcc_module import import_bcc
from .events import BPF_DIR, RESPONSE_BYTES, addr_key_bytes

log = logging.getLogger("imds_tracer")

MAX_FDS_PER_MESSAGE = 200   # the kernel takes at most 253 (SCM_MAX_FD) per message
MANIFEST_BYTES = 1 << 20
PACKAGE_ROOT = Path(__file__).resolve().parents[2]


class Loaded(NamedTuple):
    manifest: dict   # see _load()
    fds: List[int]   # indexed by the manifest's fd numbers; the agent owns them


# ---- the agent's side ------------------------------------------------------------------------
class LoaderProcess:
    """A running loader; `receive()` waits for its descriptors."""

    def __init__(self, backend: str, spec: dict):
        self.backend = backend
        self.started = time.monotonic()
        self._sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._stderr = tempfile.TemporaryFile()
        env = dict(os.environ)
        if str(PACKAGE_ROOT) not in {os.path.realpath(p or ".") for p in sys.path}:
            # the child imports this very package (`-m` also puts its cwd, ours, first)
            env["PYTHONPATH"] = os.pathsep.join(
                p for p in (str(PACKAGE_ROOT), env.get("PYTHONPATH", "")) if p)
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "imds_tracer.sources.loader", str(theirs.fileno()),
                 json.dumps(dict(spec, backend=backend))],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=self._stderr, env=env)
        except OSError as exc:
            self._sock.close()
            raise SourceError(f"cannot start the BPF loader ({sys.executable}): "
                              f"{exc.strerror}") from None
        finally:
            theirs.close()

    def receive(self) -> Loaded:
        """The loader's descriptors and manifest. Raises SourceError (the loader's reason, or
        how it died); then nothing it attached stays attached."""
        fds: List[int] = []
        try:
            msg, fds = _recv(self._sock, MANIFEST_BYTES, MAX_FDS_PER_MESSAGE)
            manifest = json.loads(msg.decode()) if msg else None
            while manifest is not None and len(fds) < manifest.get("nfds", 0):
                more, extra = _recv(self._sock, 16, MAX_FDS_PER_MESSAGE)
                if not more:
                    manifest = None
                fds += extra
        except (OSError, ValueError):
            manifest = None
        finally:
            self._sock.close()
        status = self._proc.wait()
        self._stderr.seek(0)
        stderr = self._stderr.read().decode("utf-8", "replace")
        self._stderr.close()
        if manifest is not None:
            for level, text in manifest.get("log", ()):
                log.log(level, "%s", text)
            manifest["seconds"] = time.monotonic() - self.started
            manifest["phases"] = phases(self.started, manifest.get("marks", {}))
        if manifest is None or "error" in manifest:
            for fd in fds:
                os.close(fd)
            if manifest is not None:
                raise SourceError(manifest["error"])
            lines = [line for line in stderr.splitlines() if line.strip()]
            why = f": {lines[-1].strip()[:300]}" if lines else ""
            how = f"killed by signal {-status}" if status < 0 else f"exit status {status}"
            raise SourceError(f"{self.backend} backend: the BPF loader died ({how}){why}; "
                              "nothing was attached; see imds-tracer doctor")
        if stderr.strip():
            log.debug("BPF loader said: %s", stderr.strip()[-2000:])
        return Loaded(manifest, fds)

    def cancel(self) -> None:
        """Stops a loader whose result is no longer wanted (its fds close with it)."""
        with contextlib.suppress(OSError):
            self._proc.kill()
        with contextlib.suppress(OSError, ValueError, SourceError):
            self.receive()


PHASES = ("interpreter", "bcc_imported", "flags", "compiled", "attached")


def phases(started: float, marks: dict) -> dict:
    """Seconds per loader step: interpreter (exec to the loader's first line), bcc_imported,
    flags (BTF, helper probes), compiled (clang + LLVM + the verifier for what BCC loads
    itself), attached (the rest of the loads, links, perf events), handover (fds sent and
    received)."""
    out, last = {}, started
    for step in PHASES:
        if step in marks:
            out[step] = round(marks[step] - last, 3)
            last = marks[step]
    out["handover"] = round(time.monotonic() - last, 3)
    return out


def load(backend: str, spec: dict) -> Loaded:
    """Runs the loader for `backend` with `spec` (see spec_of). Raises SourceError."""
    return LoaderProcess(backend, spec).receive()


def spec_of(config, *, use_perf: bool, keep_caps: int) -> dict:
    """What the loader needs of the config (JSON)."""
    return {"addresses": list(config.addresses), "ports": [int(p) for p in config.ports],
            "max_payload": int(config.max_payload), "perf_pages": int(config.perf_pages),
            "use_perf": bool(use_perf), "keep_caps": int(keep_caps)}


def _recv(sock: socket.socket, size: int, maxfds: int):
    msg, ancdata, _flags, _addr = sock.recvmsg(
        size, socket.CMSG_SPACE(maxfds * struct.calcsize("i")))
    out: List[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % struct.calcsize("i")
            out += list(struct.unpack(f"{usable // 4}i", data[:usable]))
    return msg, out


def _send(sock: socket.socket, manifest: dict, fds: List[int]) -> None:
    manifest["nfds"] = len(fds)
    sock.sendmsg([json.dumps(manifest).encode()])
    for i in range(0, len(fds), MAX_FDS_PER_MESSAGE):
        chunk = fds[i:i + MAX_FDS_PER_MESSAGE]
        sock.sendmsg([b"f"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                               struct.pack(f"{len(chunk)}i", *chunk))])


# ---- compiling (in the loader process) -------------------------------------------------------
def _next_pow2(n: int) -> int:
    p = 1
    while p < n:
        p <<= 1
    return p


def ring_pages(perf_pages: int) -> int:
    return _next_pow2(max(int(perf_pages) * bpfsys.possible_cpus(), 8))


def compile_flags(spec: dict) -> list[str]:
    """-D settings for bpf/common.h from the spec."""
    limit = int(spec["max_payload"])
    cap = max(_next_pow2(limit), 1024, RESPONSE_BYTES)
    flags = [
        f"-I{BPF_DIR}",
        f"-DIMDS_PAYLOAD_LIMIT={limit}",
        f"-DIMDS_PAYLOAD_CAP={cap}",
        f"-DIMDS_RESPONSE_BYTES={RESPONSE_BYTES}",
        f"-DIMDS_RING_PAGES={ring_pages(spec['perf_pages'])}",
        f"-DIMDS_NCPU={bpfsys.possible_cpus()}",
        "-Wno-unused-function",
    ]
    if spec.get("use_perf"):
        flags.append("-DIMDS_USE_PERF")
    child_off = tracepoint_field_offset("sched", "sched_process_fork", "child_pid")
    if child_off is not None:
        flags.append(f"-DIMDS_FORK_CHILD_PID_OFF={child_off}")
    return flags


def tracepoint_field_offset(category: str, event: str, field: str,
                            tracefs: Path = Path("/sys/kernel/tracing")) -> int | None:
    """Offset of a field in a tracepoint's record, from its format file (a stable ABI)."""
    try:
        text = (tracefs / "events" / category / event / "format").read_text()
    except OSError:
        return None
    match = re.search(r"field:[^;]*\b" + re.escape(field) + r"(\[\d*\])?;\s*offset:(\d+);", text)
    return int(match.group(2)) if match else None


_LOCAL_INCLUDE = re.compile(r'^#include "([\w./-]+)"\s*$', re.M)


def bpf_source(filename: str, _seen: set | None = None) -> str:
    """bpf/<filename> with its local #include "..." files inlined.

    BCC rewrites map calls (`map.lookup(...)`) in the main file only; helpers in a header that
    touch maps must therefore reach BCC as part of the main text.
    """
    seen = set() if _seen is None else _seen
    text = (BPF_DIR / filename).read_text()

    def inline(match):
        name = match.group(1)
        if name in seen:
            return ""
        seen.add(name)
        return f"/* ---- {name} ---- */\n" + bpf_source(name, seen)

    return _LOCAL_INCLUDE.sub(inline, text)


def load_bpf(filename: str, cflags: list[str]):
    """Compile bpf/<filename> with BCC. Raises SourceError with a one-line reason."""
    BPF = import_bcc().BPF  # lazy on purpose: raises SourceError naming the package
    path = BPF_DIR / filename
    try:
        text = bpf_source(filename)
    except OSError as exc:
        raise SourceError(f"cannot read {path}: {exc.strerror}") from None
    build = Path("/lib/modules") / platform.release() / "build"
    if not os.path.exists(build):
        raise SourceError(f"no kernel headers at {build} (BCC needs them to compile "
                          f"{filename}); install linux-headers; see imds-tracer doctor")
    with _captured_stderr() as captured:
        try:
            return BPF(text=text.encode(), cflags=cflags)
        except Exception as exc:  # BCC raises bare Exception on compile/load errors
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            why = _first_error(captured())
            raise SourceError(f"loading {filename} failed: {first}"
                              + (f" ({why})" if why else "")
                              + "; see imds-tracer doctor") from None


def _first_error(text: str) -> str:
    """The line of BCC's stderr that says why: a clang error or the verifier's verdict."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in lines:
        if "error:" in line:
            return line[:300]
    verifier = [line for line in lines if not line.startswith(("processed ", "HINT"))]
    for line in reversed(verifier):
        if not re.match(r"^\d+: \(", line) and not line.startswith(";"):
            return line[:300]
    return ""


@contextlib.contextmanager
def _captured_stderr():
    """BCC (C++) writes clang warnings and verifier logs straight to fd 2. Keep them out of
    the agent's stderr (the 6.1-vs-6.18 header warnings mean nothing for the tracepoint
    backend) but available for the error message; pass them through when debugging."""
    if os.environ.get("IMDS_TRACER_DEBUG"):
        yield lambda: ""
        return
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield lambda: (tmp.seek(0), tmp.read().decode("utf-8", "replace"))[1]
        finally:
            os.dup2(saved, 2)
            os.close(saved)


# ---- per backend (in the loader process) -----------------------------------------------------
class Job:
    """One load: the BCC object, the descriptors for the agent, and what to tell it."""

    def __init__(self, spec: dict):
        self.spec = spec
        self.bpf = None
        self.fds: List[int] = []       # handed to the agent, in this order
        self.links: List[int] = []     # indices into fds: attachments the agent keeps
        self.info: dict = {}           # backend facts for the agent (stats, log context)
        self.cleanups: list = []       # undone if the load fails
        self.manifest: dict = {}
        self.flags: List[str] = []     # what the programs were compiled with
        # CLOCK_MONOTONIC (system-wide) at each step, for where start-up time goes
        self.marks: dict = {"interpreter": _STARTED}

    def mark(self, step: str) -> None:
        self.marks[step] = time.monotonic()

    def keep(self, fd: int) -> int:
        self.fds.append(fd)
        return len(self.fds) - 1


def _attach_fork(job: Job) -> int:
    """The fork tracepoint (exec's are TRACEPOINT_PROBEs, attached by BCC at load)."""
    try:
        job.bpf.attach_tracepoint(tp=b"sched:sched_process_fork", fn_name=b"imds_on_fork")
        return 1
    except Exception as exc:  # noqa: BLE001 - BCC raises bare Exception
        log.warning("sched:sched_process_fork not attached (%s): parents of processes "
                    "that exit early will be unknown", exc)
        return 0


def _cgroup_cflags(job: Job) -> list[str]:
    from .btf import VMLINUX_BTF, Btf, BtfError, exec_argv_constants
    from .cgroup import hook_support, port_match
    flags = [f"-DIMDS_PORT_MATCH(p)={port_match(job.spec['ports'])}"]
    if hook_support().packet_current_task:
        flags.append("-DIMDS_SKB_CURRENT_TASK")
    try:
        constants = exec_argv_constants(Btf.load(VMLINUX_BTF))
    except BtfError as exc:
        log.info("argv at exec not captured (%s): argv comes from /proc at connect", exc)
        job.info["exec_argv"] = False
        return flags
    job.info["exec_argv"] = True
    return flags + [f"-D{k}={v}" for k, v in sorted(constants.items())]


def _cgroup_attach(job: Job) -> int:
    from .cgroup import (HOOKS, PRIVATE_CGROUP2, cgroup2_root, link_create,
                         mount_private_cgroup2, unmount_private_cgroup2)
    root = cgroup2_root()
    private = False
    if root is None:
        try:
            root = mount_private_cgroup2()
        except OSError as exc:
            raise SourceError(f"cgroup backend: no cgroup v2 hierarchy mounted (a cgroup v1 "
                              f"host) and mounting one at {PRIVATE_CGROUP2} failed: "
                              f"{exc.strerror}") from None
        private = True
        job.cleanups.append(unmount_private_cgroup2)
    job.info["root"] = root
    try:
        cgroup_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        raise SourceError(f"cgroup backend: cannot open the cgroup v2 root "
                          f"{root}: {exc.strerror}") from None
    try:
        for func, prog_type, attach_type in HOOKS:
            prog_fd, ours = _load_hook(job, func, prog_type, attach_type)
            try:
                job.links.append(job.keep(link_create(prog_fd, cgroup_fd, attach_type)))
            except OSError as exc:
                raise SourceError(f"cgroup backend: attaching {func} to {root} "
                                  f"failed: {exc.strerror}") from None
            finally:
                if ours:   # the link holds the program
                    os.close(prog_fd)
    finally:
        os.close(cgroup_fd)
    if not job.links:
        raise SourceError(f"no cgroup hook attached to {root}; see imds-tracer doctor")
    attached = len(job.links) + _attach_fork(job)
    if job.info.get("exec_argv"):
        try:
            job.bpf.attach_tracepoint(tp=b"sched:sched_process_exec", fn_name=b"imds_on_exec")
            attached += 1
        except Exception as exc:  # noqa: BLE001 - BCC raises bare Exception
            log.warning("sched:sched_process_exec not attached (%s): argv of processes "
                        "that exit early will be unknown", exc)
    # after attaching, so that a connect racing with the scan is seen by one or the other;
    # before a private mount goes: the holders' cgroup ids are read through it
    try:
        adopted, missed = _adopt_cgroup_sockets(job, root)
    except OSError as exc:
        log.warning("start-up scan of connected sockets failed: %s", exc)
    else:
        job.info["adopted"] = adopted
        if adopted:
            log.info("adopted %d connection(s) opened before the agent started", adopted)
        if missed:
            log.warning("%d connection(s) opened before the agent started could not be "
                        "adopted (%s): their requests are logged without their process "
                        "where this kernel cannot tell", len(missed), missed[0])
    if private:
        # the links hold the hierarchy's root cgroup, not the mount: unmounted now, so the
        # agent needs no CAP_SYS_ADMIN to undo it (tests/kernel/test_cgroup_v1.py)
        unmount_private_cgroup2()
        job.cleanups.remove(unmount_private_cgroup2)
        log.warning("cgroup backend: no cgroup v2 hierarchy mounted (a cgroup v1 host): "
                    "mounted one at %s for attaching the socket hooks (every process is in "
                    "its root), unmounted again once they were attached", root)
    return attached


def _adopt_cgroup_sockets(job: Job, root: str) -> tuple[int, list[str]]:
    """Sockets connected to a watched address before the hooks were attached: their cookies
    are given their holder, as the connect hooks would have. (adopted, why each one that
    could not be was not)."""
    from . import adopt
    socks = job.bpf[b"socks"]
    adopted, missed = 0, []
    for held in adopt.scan_connected(job.spec["addresses"], job.spec["ports"]):
        try:
            cookie = adopt.socket_cookie(held.tgid, held.fd)
        except OSError as exc:
            missed.append(f"pid {held.tgid} fd {held.fd}: {exc.strerror}")
            continue
        key = socks.Key(cookie)
        if key in socks:
            continue                  # seen by a hook meanwhile, or held by two processes
        who = adopt.holder(held.tgid, root)
        if who is None:
            continue                  # exited meanwhile
        leaf = socks.Leaf()
        leaf.cgroup_id, leaf.tgid, leaf.tid = who.cgroup_id, who.tgid, who.tgid
        leaf.uid, leaf.ppid, leaf.flags = who.uid, who.ppid, 0
        leaf.comm = who.comm
        socks[key] = leaf
        adopted += 1
    return adopted, missed


def _load_hook(job: Job, func: str, prog_type: int, attach_type: int) -> tuple[int, bool]:
    """(program fd, whether we own it). BCC before 0.19 (Debian 11's 0.18) has no
    attach_type for load_func, which cgroup/connect programs need at load: there, BCC's
    compiled instructions are loaded with it directly."""
    try:
        return job.bpf.load_func(func.encode(), prog_type, attach_type=attach_type).fd, False
    except TypeError:
        pass
    try:
        return helpers.load_program(prog_type, attach_type,
                                    job.bpf.dump_func(func.encode()), func), True
    except (OSError, helpers.ProbeError) as exc:
        raise SourceError(f"cgroup backend: loading {func} failed: "
                          f"{getattr(exc, 'strerror', None) or exc}") from None


def _kprobe_cflags(job: Job) -> list[str]:
    from .btf import Btf, BtfError, kprobe_constants
    try:
        constants = kprobe_constants(Btf.load())
    except BtfError as exc:
        raise SourceError(f"kprobe backend: {exc}; use --backend cgroup or "
                          "--backend tracepoint") from None
    return [f"-D{name}={value}" for name, value in sorted(constants.items())]


LEGACY_KPROBE = re.compile(r"^[pr]:kprobes/([pr]_\w+_bcc_(\d+))\s", re.M)


def remove_stale_kprobe_events(events: Path) -> int:
    """BCC on kernels without the kprobe PMU (before 4.17) creates kprobes by writing
    `kprobe_events` and removes them only in its clean-up, which a loader that hands its
    descriptors over never runs. Entries of loaders that are gone (their event has no
    perf fd left) are removed here, at the next load. Returns how many."""
    try:
        text = events.read_text()
    except OSError:
        return 0
    removed = 0
    for name, pid in LEGACY_KPROBE.findall(text):
        if int(pid) == os.getpid() or os.path.exists(f"/proc/{pid}"):
            continue
        try:
            with open(events, "a") as fh:
                fh.write(f"-:kprobes/{name}\n")
            removed += 1
        except OSError:   # EBUSY: an agent still holds it
            continue
    return removed


def _kprobe_attach(job: Job) -> int:
    from .kprobe import KPROBE_EVENTS, NO_KPROBES, RECV_FUNCTION, SEND_FUNCTIONS, kernel_symbols
    remove_stale_kprobe_events(KPROBE_EVENTS)
    existing = kernel_symbols(SEND_FUNCTIONS + (RECV_FUNCTION,))
    attached = 0
    for fn in SEND_FUNCTIONS:
        if fn not in existing:
            continue
        try:
            job.bpf.attach_kprobe(event=fn.encode(), fn_name=b"imds_tcp_sendmsg")
        except Exception as exc:  # noqa: BLE001 - BCC raises bare Exception
            log.info("kprobe on %s not attached: %s", fn, exc)
            continue
        job.info["send_function"] = fn
        attached += 1
        break
    if not attached:
        raise SourceError(NO_KPROBES)
    if RECV_FUNCTION in existing:
        try:
            job.bpf.attach_kprobe(event=RECV_FUNCTION.encode(), fn_name=b"imds_tcp_recvmsg")
            job.bpf.attach_kretprobe(event=RECV_FUNCTION.encode(),
                                     fn_name=b"imds_tcp_recvmsg_ret")
            attached += 2
        except Exception as exc:  # noqa: BLE001
            log.warning("response status unavailable: %s not probed (%s)", RECV_FUNCTION, exc)
    _attach_fork(job)
    return attached + int(job.bpf.num_open_tracepoints())


def _tracepoint_attach(job: Job) -> int:
    # TRACEPOINT_PROBE functions are attached by BCC when the program loads
    _attach_fork(job)
    probes = int(job.bpf.num_open_tracepoints())
    if probes == 0:
        raise SourceError("no syscall tracepoint attached (mount tracefs at /sys/kernel/tracing; "
                          "kernel needs CONFIG_FTRACE_SYSCALLS); use --backend kprobe; see "
                          "imds-tracer doctor")
    # after attaching, so that a connect racing with the scan is seen by one or the other
    try:
        job.info["adopted"] = _adopt_existing(job)
    except OSError as exc:
        log.warning("start-up scan of connected sockets failed: %s", exc)
    if job.info.get("adopted"):
        log.info("adopted %d connection(s) opened before the agent started",
                 job.info["adopted"])
    return probes


def _adopt_existing(job: Job) -> int:
    """Sockets connected to a watched address before the load, in every network namespace,
    entered into the kernel's connection table (see adopt.scan_connected)."""
    from .adopt import scan_connected
    from .tracepoint import ADOPTED_ID_BASE
    bpf = job.bpf
    conns, epochs, maybe = bpf[b"conns"], bpf[b"tgid_epoch"], bpf[b"maybe_tracked"]
    slots = len(maybe)
    count = 0
    for tgid, fd, ip, port in scan_connected(job.spec["addresses"], job.spec["ports"]):
        key = conns.Key((tgid << 32) | fd)
        try:
            conns[key]
            continue            # already seen by connect()
        except KeyError:
            pass
        conn_id = ADOPTED_ID_BASE | (os.getpid() << 24) | count
        ekey = epochs.Key(tgid)
        try:
            epoch = int(epochs[ekey].value)
        except KeyError:
            epoch = conn_id
            epochs[ekey] = epochs.Leaf(epoch)
        leaf = conns.Leaf()
        leaf.conn_id = conn_id
        leaf.epoch = epoch
        leaf.family = 10 if ":" in ip else 2
        leaf.dport = port
        ctypes.memmove(ctypes.addressof(leaf.daddr), addr_key_bytes(ip), 16)
        conns[key] = leaf
        maybe[maybe.Key(tgid % slots)] = maybe.Leaf(1)  # the kernel's fast test
        count += 1
    return count


# program, extra -D flags, attach (returns the probe count), maps the agent reads beyond the
# common ones
BACKENDS = {
    "cgroup": ("cgroup.c", _cgroup_cflags, _cgroup_attach, ()),
    "kprobe": ("kprobe.c", _kprobe_cflags, _kprobe_attach, ()),
    "tracepoint": ("tracepoint.c", lambda job: [], _tracepoint_attach, ("conns",)),
}
AGENT_MAPS = ("argv_cache", "parent_of", "counters")


def _fill_watched(job: Job) -> None:
    table = job.bpf[b"watched"]
    for addr in job.spec["addresses"]:
        for port in job.spec["ports"]:
            key = table.Key()
            ctypes.memmove(ctypes.byref(key), addr_key_bytes(addr), 16)
            key.port = int(port)
            table[key] = ctypes.c_uint8(1)


def _open_output(job: Job) -> dict:
    """The event output, opened before anything is attached so that no event is lost."""
    events = job.bpf[b"events"]
    if not job.spec.get("use_perf"):
        return {"ring": _map_entry(job, events)}
    array = bpfsys.BpfMap(events.map_fd, 4, 4, events.max_entries)
    fds = []
    for cpu in bpfsys.online_cpus():
        fd = bpfsys.open_bpf_output(cpu)
        array.update(struct.pack("<i", cpu), struct.pack("<I", fd))
        fds.append(job.keep(fd))
    # the array's entries live as long as the map *file* they were written through: the
    # agent keeps that file open (the kernel clears them when it is released)
    return {"perf": fds, "perf_pages": _next_pow2(job.spec["perf_pages"]),
            "array": _map_entry(job, events)}


def _map_entry(job: Job, table) -> dict:
    """The map's fd for the agent and its sizes as the kernel has them (BCC's ctypes Leaf of
    a per-CPU map is the array over CPUs, not the value)."""
    info = bpfsys.map_info(table.map_fd)
    return {"fd": job.keep(os.dup(table.map_fd)), "key_size": info["key_size"],
            "value_size": info["value_size"], "max_entries": info["max_entries"],
            "type": info["type"]}


def _attachment_fds(bpf) -> List[int]:
    """Every perf event / raw tracepoint fd BCC attached with (kprobe_fds is
    {event: {function: fd}} since BCC 0.22, {event: fd} before)."""
    out: List[int] = []
    for table in (bpf.kprobe_fds, bpf.tracepoint_fds, bpf.raw_tracepoint_fds):
        for value in table.values():
            out += list(value.values()) if isinstance(value, dict) else [value]
    return out


def _bpf_needs(job: Job) -> int:
    """Which capability, beyond those the agent keeps, its bpf() map calls need: 0 on kernels
    that check only loads and map creation (6.5+), CAP_BPF (or CAP_SYS_ADMIN before 5.8)
    where `kernel.unprivileged_bpf_disabled` applies to every bpf() command. Found by trying
    with the agent's set as this process's effective set (permitted stays: restored after)."""
    counters = job.bpf[b"counters"]
    info = bpfsys.map_info(counters.map_fd)
    probe = bpfsys.BpfMap(counters.map_fd, info["key_size"], info["value_size"],
                          info["max_entries"], info["type"])
    keep = int(job.spec.get("keep_caps", 0))
    before = caps.effective_caps()
    try:
        for extra in (0, 1 << caps.CAP_BPF, 1 << caps.CAP_SYS_ADMIN):
            if extra and not before & extra:
                continue
            try:
                caps.set_effective(keep & before | extra)
                probe.lookup(struct.pack("<i", 0))
                return extra
            except OSError:
                continue
        return 1 << caps.CAP_SYS_ADMIN
    finally:
        with contextlib.suppress(OSError):
            caps.set_effective(before)


def _load(job: Job) -> dict:
    program, cflags, attach, extra_maps = BACKENDS[job.spec["backend"]]
    import_bcc()
    job.mark("bcc_imported")
    flags = job.flags = compile_flags(job.spec) + cflags(job)
    job.mark("flags")
    job.bpf = load_bpf(program, flags)
    job.mark("compiled")
    _fill_watched(job)
    output = _open_output(job)
    probes = attach(job)
    job.links += [job.keep(os.dup(fd)) for fd in _attachment_fds(job.bpf)]
    maps = {name: _map_entry(job, job.bpf[name.encode()])
            for name in AGENT_MAPS + tuple(extra_maps)}
    job.mark("attached")
    return {"backend": job.spec["backend"], "probes": probes, "output": output, "maps": maps,
            "links": job.links, "info": job.info, "bpf_needs": _bpf_needs(job),
            "marks": job.marks}


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list = []

    def emit(self, record):
        self.records.append((record.levelno, record.getMessage()))


def load_here(spec: dict) -> Job:
    """The load itself, in this process: `job.manifest` (with "error" when it failed; then
    what it had mounted is undone) and `job.fds`. The loader's main runs it; tests run it
    in-process to stand in for other BCC versions and kernels."""
    job = Job(spec)
    helpers.raise_memlock()
    try:
        job.manifest = _load(job)
    except SourceError as exc:
        job.manifest = {"error": str(exc)}
    except Exception as exc:  # noqa: BLE001 - one line for the user, not a traceback
        job.manifest = {"error": f"{spec.get('backend')} backend: {exc}; see imds-tracer doctor"}
    if "error" in job.manifest:
        for undo in job.cleanups:
            with contextlib.suppress(OSError):
                undo()
        job.fds = []
    return job


def main(argv: List[str]) -> None:
    sock = socket.socket(fileno=int(argv[0]))
    collect = _Collect()
    log.addHandler(collect)
    log.setLevel(logging.DEBUG if os.environ.get("IMDS_TRACER_DEBUG") else logging.INFO)
    log.propagate = False
    job = load_here(json.loads(argv[1]))
    job.manifest["log"] = collect.records
    hold = os.environ.get("IMDS_TRACER_LOADER_HOLD")   # tests: a loader that dies here
    if hold and "error" not in job.manifest:
        print("imds-tracer loader: attached, holding", file=sys.stderr, flush=True)
        time.sleep(float(hold))
    try:
        _send(sock, job.manifest, job.fds)
    finally:
        # no BCC clean-up (it would detach what the agent now holds), no destructors
        os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1:])
