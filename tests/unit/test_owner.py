"""Owner lookup against the real on-disk layouts of dpkg, the kubelet, Docker and Podman,
built in a temporary root; and against this machine's own dpkg database."""
import json
import os
import shutil
import sys

import pytest

from imds_tracer.enrich import Enricher, container_from_cgroup
from imds_tracer.model import Container, Owner, ProcessSnapshot
from imds_tracer.owner import OwnerResolver, unit_of

CID = "3f" * 32
POD_UID = "6b3c1a2e-91d4-4c1f-9e2b-0a1b2c3d4e5f"


@pytest.mark.parametrize("path,unit", [
    ("/system.slice/cron.service", "cron.service"),
    ("/user.slice/user-0.slice/user@0.service/app.slice/backup.service", "backup.service"),
    ("/user.slice/user-0.slice/session-3.scope", None),
    ("/system.slice/docker-" + CID + ".scope", None),
    ("/", None), (None, None),
])
def test_unit_from_the_cgroup_path(path, unit):
    assert unit_of(path) == unit


def _write(root, rel, text):
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_package_from_the_dpkg_lists_script_before_interpreter(tmp_path):
    _write(tmp_path, "var/lib/dpkg/info/curl.list", "/.\n/usr\n/usr/bin\n/usr/bin/curl\n")
    _write(tmp_path, "var/lib/dpkg/info/awscli.list", "/usr/bin/aws\n/usr/share/doc/awscli\n")
    _write(tmp_path, "var/lib/dpkg/info/python3.11-minimal:amd64.list", "/usr/bin/python3.11\n")
    r = OwnerResolver(root=str(tmp_path))
    assert r.package_of("/usr/bin/curl", ("curl", "http://x")) == "curl"
    assert r.package_of("/usr/bin/python3.11", ("python3", "/usr/bin/aws", "s3")) == "awscli"
    assert r.package_of("/usr/bin/python3.11", ("python3", "app.py")) == "python3.11-minimal"
    assert r.package_of("/opt/app/bin/app", ("app",)) is None
    owner = r.owner("/system.slice/cron.service", None, "/usr/bin/curl", ("curl",))
    assert owner == Owner(unit="cron.service", package="curl")


def test_package_from_this_machines_dpkg():
    if not os.path.isdir("/var/lib/dpkg/info"):
        pytest.skip("no dpkg database on this machine")
    curl = shutil.which("curl")
    owner = OwnerResolver().package_of(os.path.realpath(curl) if curl else None, ("curl",))
    assert owner == "curl"


def test_kubernetes_names_from_the_kubelet_log_layout(tmp_path):
    pods = tmp_path / "var/log/pods" / f"payments_api-7d9f_{POD_UID}"
    (pods / "api").mkdir(parents=True)
    (pods / "api" / "0.log").write_text("")
    links = tmp_path / "var/log/containers"
    links.mkdir(parents=True)
    os.symlink(pods / "api" / "0.log", links / f"api-7d9f_payments_api-{CID}.log")
    r = OwnerResolver(root=str(tmp_path))
    path = (f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod"
            f"{POD_UID.replace('-', '_')}.slice/cri-containerd-{CID}.scope")
    container = container_from_cgroup(path)
    assert container.pod_uid == POD_UID and container.id == CID
    owner = r.owner(path, container, "/app/api", ("api",))
    assert (owner.k8s_namespace, owner.k8s_pod, owner.k8s_container) == \
        ("payments", "api-7d9f", "api")
    assert owner.unit is None and owner.package is None  # not the host's packages
    # no link for this container id: the pod by its uid; the container only if it is alone
    other = Container("containerd", "4e" * 32, POD_UID)
    assert OwnerResolver(root=str(tmp_path)).owner(None, other, None, None) == Owner(
        k8s_namespace="payments", k8s_pod="api-7d9f", k8s_container="api")
    (pods / "sidecar").mkdir()
    assert OwnerResolver(root=str(tmp_path)).owner(None, other, None, None) == Owner(
        k8s_namespace="payments", k8s_pod="api-7d9f")


def test_docker_and_podman_names_and_images(tmp_path):
    _write(tmp_path, f"var/lib/docker/containers/{CID}/config.v2.json", json.dumps(
        {"ID": CID, "Name": "/billing-worker", "Config": {"Image": "registry/billing:1.4"}}))
    pid = "5a" * 32
    _write(tmp_path, "var/lib/containers/storage/overlay-containers/containers.json",
           json.dumps([{"id": pid, "names": ["cron-job"], "image": "ab" * 32,
                        "metadata": json.dumps({"image-name": "quay.io/x/cron:2"})}]))
    r = OwnerResolver(root=str(tmp_path))
    assert r.owner(None, Container("docker", CID), None, None) == Owner(
        container_name="billing-worker", image="registry/billing:1.4")
    assert r.owner(None, Container("podman", pid), None, None) == Owner(
        container_name="cron-job", image="quay.io/x/cron:2")
    # unreadable or absent state: nothing, not a guess
    _write(tmp_path, f"var/lib/docker/containers/{'6c' * 32}/config.v2.json", "{not json")
    assert r.owner(None, Container("docker", "6c" * 32), None, None) is None
    assert r.owner(None, Container("docker", "7d" * 32), None, None) is None


def test_the_enricher_names_the_owner_of_a_live_process(tmp_path):
    _write(tmp_path, "var/lib/dpkg/info/python3.11-minimal.list",
           os.path.realpath(sys.executable) + "\n")
    e = Enricher(owners=OwnerResolver(root=str(tmp_path)))
    snap = ProcessSnapshot(pid=os.getpid(), comm=None)
    info, _, container = e.describe(snap)
    owner = e.owner(snap, info, container)
    if "/bin/" in os.path.realpath(sys.executable):
        assert owner is not None and owner.package == "python3.11-minimal"
    assert Enricher().owner(snap, info, container) is None
