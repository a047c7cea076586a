"""Who owns a sender: its systemd unit, the OS package of its program, its Kubernetes pod and
container, its Docker / Podman container name and image.

Everything comes from local state files, read lazily and cached; no API is called. A fact
that cannot be read is None, never guessed. Every location is relative to `root` so tests
build the real layouts in a temporary directory:

- unit: the deepest ``*.service`` component of the cgroup path
  (``/system.slice/cron.service``, ``/user.slice/user-0.slice/user@0.service/app.slice/x.service``)
- package: dpkg's ``var/lib/dpkg/info/<pkg>[:arch].list`` files (indexed once, only the
  program directories: */bin/, */sbin/, */libexec/), else ``rpm -qf`` (cached per path)
- Kubernetes: the kubelet's ``var/log/containers/<pod>_<namespace>_<container>-<id>.log``
  links (container id -> names), else ``var/log/pods/<namespace>_<pod>_<pod uid>/`` (pod uid ->
  namespace and pod; the container name only when the pod has a single one)
- Docker: ``var/lib/docker/containers/<id>/config.v2.json`` (``Name``, ``Config.Image``);
  Podman: ``var/lib/containers/storage/overlay-containers/containers.json``
"""
from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess

from .model import Container, Owner

_UNIT = re.compile(r"([^/]+\.service)(?:/|$)")
_PROGRAM_DIRS = ("/bin/", "/sbin/", "/libexec/")
_K8S_LOG = re.compile(r"^(?P<pod>[^_]+)_(?P<ns>[^_]+)_(?P<container>.+)-(?P<id>[0-9a-f]{64})\.log$")
CACHE_SIZE = 4096


def unit_of(cgroup_path: str | None) -> str | None:
    """The systemd service a cgroup path belongs to; None outside one (scopes, slices)."""
    if not cgroup_path:
        return None
    units = _UNIT.findall(cgroup_path)
    return units[-1] if units else None


class OwnerResolver:
    def __init__(self, root: str = "/"):
        self.root = root
        self._dpkg: dict[str, str] | None = None   # program path -> package, built once
        self._packages: dict[str, str | None] = {}
        self._containers: dict[str, tuple] = {}    # container id -> (k8s, name, image)
        self._rpm = shutil.which("rpm") if os.path.isdir(self._path("var/lib/rpm")) else None

    def _path(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    def owner(self, cgroup_path: str | None, container: Container | None,
              exe: str | None, argv: tuple[str, ...] | None) -> Owner | None:
        k8s, name, image = self._container(container) if container else ((None,) * 3, None,
                                                                          None)
        # a container's programs are not the host's packages: only host processes are looked up
        package = None if container else self.package_of(exe, argv)
        owner = Owner(unit=None if container else unit_of(cgroup_path), package=package,
                      k8s_namespace=k8s[0], k8s_pod=k8s[1], k8s_container=k8s[2],
                      container_name=name, image=image)
        return None if owner == Owner() else owner

    # -- packages -----------------------------------------------------------------------
    def package_of(self, exe: str | None, argv: tuple[str, ...] | None) -> str | None:
        """The package of the script an interpreter runs (python3 /usr/bin/aws: awscli),
        else of the executable."""
        candidates = []
        if argv and len(argv) > 1 and argv[1].startswith("/"):
            candidates.append(argv[1])
        if exe:
            candidates.append(exe)
        for path in candidates:
            package = self._package(path)
            if package:
                return package
        return None

    def _package(self, path: str) -> str | None:
        if path in self._packages:
            return self._packages[path]
        package = self._dpkg_index().get(path) or self._dpkg_index().get(
            os.path.realpath(path))
        if package is None and self._rpm:
            package = self._rpm_owner(path)
        if len(self._packages) >= CACHE_SIZE:
            self._packages.clear()
        self._packages[path] = package
        return package

    def _dpkg_index(self) -> dict[str, str]:
        if self._dpkg is None:
            self._dpkg = {}
            for list_file in glob.glob(self._path("var/lib/dpkg/info/*.list")):
                package = os.path.basename(list_file)[:-len(".list")].split(":", 1)[0]
                try:
                    with open(list_file, encoding="utf-8", errors="replace") as fh:
                        for line in fh:
                            if any(d in line for d in _PROGRAM_DIRS):
                                self._dpkg[line.rstrip("\n")] = package
                except OSError:
                    continue
        return self._dpkg

    def _rpm_owner(self, path: str) -> str | None:
        try:
            proc = subprocess.run([self._rpm, "-qf", "--qf", "%{NAME}\\n", path],
                                  capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        name = proc.stdout.strip()
        return name if proc.returncode == 0 and name and " " not in name else None

    # -- containers ---------------------------------------------------------------------
    def _container(self, container: Container) -> tuple:
        key = container.id or container.pod_uid or ""
        if key in self._containers:
            return self._containers[key]
        k8s = self._kubernetes(container)
        name, image = self._docker(container.id) if container.id else (None, None)
        if name is None and container.id:
            name, image = self._podman(container.id)
        if len(self._containers) >= CACHE_SIZE:
            self._containers.clear()
        self._containers[key] = result = (k8s, name, image)
        return result

    def _kubernetes(self, container: Container) -> tuple:
        if container.id:
            for link in glob.glob(self._path("var/log/containers", f"*-{container.id}.log")):
                match = _K8S_LOG.match(os.path.basename(link))
                if match:
                    return match.group("ns"), match.group("pod"), match.group("container")
        if container.pod_uid:
            for pod_dir in glob.glob(self._path("var/log/pods", f"*_*_{container.pod_uid}")):
                ns, _, rest = os.path.basename(pod_dir).partition("_")
                pod = rest[:-len(container.pod_uid) - 1]
                try:
                    names = [n for n in os.listdir(pod_dir)
                             if os.path.isdir(os.path.join(pod_dir, n))]
                except OSError:
                    names = []
                return ns, pod, names[0] if len(names) == 1 else None
        return None, None, None

    def _docker(self, cid: str) -> tuple:
        data = _read_json(self._path("var/lib/docker/containers", cid, "config.v2.json"))
        if not isinstance(data, dict):
            return None, None
        name = data.get("Name")
        image = (data.get("Config") or {}).get("Image")
        return (name.lstrip("/") if isinstance(name, str) and name.strip("/") else None,
                image if isinstance(image, str) and image else None)

    def _podman(self, cid: str) -> tuple:
        data = _read_json(self._path("var/lib/containers/storage/overlay-containers",
                                     "containers.json"))
        for entry in data if isinstance(data, list) else ():
            if isinstance(entry, dict) and entry.get("id") == cid:
                names = entry.get("names") or []
                meta = _loads(entry.get("metadata"))
                image = meta.get("image-name") if isinstance(meta, dict) else None
                return (names[0] if names and isinstance(names[0], str) else None,
                        image if isinstance(image, str) else None)
        return None, None


def _loads(text):
    try:
        return json.loads(text) if isinstance(text, str) else None
    except ValueError:
        return None


def _read_json(path: str):
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None
