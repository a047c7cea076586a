"""Who sent a request: argv, the parent chain and the container, from /proc and cgroups.

The kernel snapshot (pid, comm, cgroup id, and where the source has them, argv captured at
exec time and the parent pid) is the ground truth; /proc fills in what is still there. A
process that exited before we looked keeps the kernel's argv; its parents usually live on.
Parents are cached by (pid, start time) so that a busy shell is read once, not per request.
"""
from __future__ import annotations

import os
import re
import time
from collections import OrderedDict
from typing import TYPE_CHECKING

from . import procfs
from .model import Container, Owner, ProcessInfo, ProcessSnapshot

if TYPE_CHECKING:   # replay builds no enricher: owner.py is loaded by `run` only
    from .owner import OwnerResolver

CACHE_SIZE = 4096
# A process seen within this many seconds is not read from /proc again: a busy client and
# its shell are read once a second, not once a request. (A pid reused within that second by
# a program with the same comm is the only thing that could be misnamed.)
RECENT_TTL = 1.0

# cgroup path patterns of the container runtimes, most specific first.
_CONTAINER_PATTERNS = (
    (re.compile(r"cri-containerd-([0-9a-f]{64})\.scope"), "containerd"),
    (re.compile(r"crio-([0-9a-f]{64})\.scope"), "cri-o"),
    (re.compile(r"docker-([0-9a-f]{64})\.scope"), "docker"),
    (re.compile(r"libpod-([0-9a-f]{64})\.scope"), "podman"),
    (re.compile(r"/docker/([0-9a-f]{64})(?:/|$)"), "docker"),
    (re.compile(r"/containerd/([0-9a-f]{64})(?:/|$)"), "containerd"),
    (re.compile(r"/lxc(?:\.payload)?[./]([^/]+)"), "lxc"),
    (re.compile(r"machine-([^/]+)\.scope"), "systemd-nspawn"),
)
_POD = re.compile(r"kubepods.*?pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}"
                  r"[-_][0-9a-f]{12})")
_K8S_CONTAINER = re.compile(r"/(?:[a-z-]+-)?([0-9a-f]{64})(?:\.scope)?$")


def container_from_cgroup(path: str) -> Container | None:
    """Container of a cgroup v2 path such as
    /kubepods.slice/.../kubepods-pod<uid>.slice/cri-containerd-<id>.scope."""
    if not path or path == "/":
        return None
    pod = _POD.search(path)
    pod_uid = pod.group(1).replace("_", "-") if pod else None
    for pattern, runtime in _CONTAINER_PATTERNS:
        match = pattern.search(path)
        if match:
            return Container(runtime=runtime, id=match.group(1), pod_uid=pod_uid)
    if pod_uid:
        match = _K8S_CONTAINER.search(path)
        return Container(runtime="kubernetes", id=match.group(1) if match else None,
                         pod_uid=pod_uid)
    return None


class Enricher:
    def __init__(self, parents: int = 3, proc: str = "/proc", lookup=None,
                 owners: OwnerResolver | None = None):
        """`lookup(pid) -> (ppid, argv)`: the kernel source's exec/fork caches, for
        parents already gone from /proc. `owners`: unit, package, pod and container names
        (owner.py); None: not looked up."""
        self.parents = parents
        self.owners = owners
        self.lookup = lookup
        self.proc = proc
        self._cache: OrderedDict = OrderedDict()   # (pid, starttime) -> (ProcessInfo, ppid)
        self._cgroup_paths: dict[int, str] = {}    # cgroup id (inode) -> path
        self._recent: dict[int, tuple] = {}        # pid -> (expires, _live result)
        self._containers: dict[int, Container | None] = {}  # cgroup id -> container
        mounts = procfs.cgroup2_mounts(os.path.join(proc, "self/mountinfo"))
        self._cgroup_root = mounts[0] if mounts else None

    def _live(self, pid: int) -> tuple[ProcessInfo, int] | None:
        """A live process, cached by (pid, start time) so pid reuse is not confused."""
        now = time.monotonic()
        recent = self._recent.get(pid)
        if recent is not None and recent[0] > now:
            return recent[1]
        result = self._read_live(pid)
        if result is not None:
            if len(self._recent) >= CACHE_SIZE:
                self._recent.clear()
            self._recent[pid] = (now + RECENT_TTL, result)
        return result

    def _read_live(self, pid: int) -> tuple[ProcessInfo, int] | None:
        stat = procfs.stat(pid, self.proc)
        if stat is None:
            return None
        comm, ppid, start = stat
        key = (pid, start)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        argv, truncated = procfs.argv(pid, self.proc)
        info = ProcessInfo(pid=pid, comm=comm, exe=procfs.exe(pid, self.proc), argv=argv,
                           argv_truncated=truncated)
        self._cache[key] = (info, ppid)
        if len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)
        return info, ppid

    # -- the answer ---------------------------------------------------------------------
    def describe(self, snap: ProcessSnapshot | None):
        """(process, parents nearest first, container) for a kernel snapshot."""
        if snap is None:
            return None, (), None
        live = self._live(snap.pid)
        if live is not None and snap.comm and live[0].comm != snap.comm[:15] \
                and snap.argv is None:
            live = None  # the pid now belongs to another program
        if live is not None:
            info, ppid = live
            if snap.argv:  # exec-time argv is the truth at send time
                info = ProcessInfo(snap.pid, snap.comm or info.comm, snap.argv, info.exe,
                                   snap.argv_truncated)
        else:
            info = ProcessInfo(pid=snap.pid, comm=snap.comm, argv=snap.argv,
                               argv_truncated=snap.argv_truncated)
            ppid = snap.ppid
        if snap.ppid:
            ppid = snap.ppid
        return info, self._parents(ppid), self._container(snap)

    def owner(self, snap: ProcessSnapshot, info: ProcessInfo | None,
              container: Container | None) -> Owner | None:
        """Unit, package, pod, container name and image of a sender; None when unknown."""
        if self.owners is None:
            return None
        path = self._cgroup_of_pid(snap.pid)
        if path is None and snap.cgroup_id and snap.cgroup_id > 1:
            path = self._cgroup_by_id(snap.cgroup_id)
        return self.owners.owner(path, container, info.exe if info else None,
                                 info.argv if info else None)

    def _parents(self, ppid: int | None) -> tuple[ProcessInfo, ...]:
        chain = []
        while ppid and len(chain) < self.parents:
            live = self._live(ppid)
            if live is None:
                parent, argv = self.lookup(ppid) if self.lookup else (None, None)
                chain.append(ProcessInfo(pid=ppid, comm=None, argv=argv))
                ppid = parent
                continue
            info, ppid = live
            chain.append(info)
        return tuple(chain)

    def _container(self, snap: ProcessSnapshot) -> Container | None:
        """By the kernel's cgroup id when there is one (it names the cgroup at send time and
        never changes meaning), read once; else from /proc/PID/cgroup."""
        cgroup_id = snap.cgroup_id
        if cgroup_id is not None and cgroup_id in self._containers:
            return self._containers[cgroup_id]
        container = self._read_container(snap)
        if cgroup_id is not None:
            if len(self._containers) >= CACHE_SIZE:
                self._containers.clear()
            self._containers[cgroup_id] = container
        return container

    def _read_container(self, snap: ProcessSnapshot) -> Container | None:
        path = self._cgroup_of_pid(snap.pid)
        if path is None and snap.cgroup_id and snap.cgroup_id > 1:
            path = self._cgroup_by_id(snap.cgroup_id)
        return container_from_cgroup(path) if path else None

    def _cgroup_of_pid(self, pid: int) -> str | None:
        return procfs.cgroup(pid, self.proc)

    def _cgroup_by_id(self, cgroup_id: int) -> str | None:
        """A gone process: find its cgroup directory by inode (cgroup v2 ids are inodes)."""
        if cgroup_id in self._cgroup_paths:
            return self._cgroup_paths[cgroup_id]
        if not self._cgroup_root:
            return None
        found = None
        for dirpath, _dirs, _files in os.walk(self._cgroup_root):
            try:
                if os.stat(dirpath).st_ino == cgroup_id:
                    rel = os.path.relpath(dirpath, self._cgroup_root)
                    found = "/" if rel == "." else "/" + rel
                    break
            except OSError:
                continue
        if len(self._cgroup_paths) > CACHE_SIZE:
            self._cgroup_paths.clear()
        self._cgroup_paths[cgroup_id] = found
        return found
