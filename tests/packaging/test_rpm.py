"""packaging/rpm: the spec builds a noarch rpm with rpmbuild (Debian's `rpm` package provides
it) holding the agent, real BPF sources, the unit, the config as %config(noreplace), and the
%systemd_* scriptlets. Installing it needs an rpm-based system; that is not tested here."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.packaging import build_package


pytestmark = pytest.mark.skipif(not shutil.which("rpmbuild"),
                                reason="rpmbuild not installed (apt-get install rpm)")


@pytest.fixture(scope="module")
def rpm_file() -> Path:
    return build_package("rpm", ".noarch.rpm")


def _q(rpm: Path, *args: str) -> str:
    return subprocess.run(["rpm", "-qp", *args, str(rpm)], capture_output=True, text=True,
                          check=True).stdout


def test_contents(rpm_file):
    files = _q(rpm_file, "-l").split()
    assert "/usr/bin/imds-tracer" in files
    assert "/usr/lib/systemd/system/imds-tracer.service" in files
    assert "/etc/logrotate.d/imds-tracer" in files
    assert any(f.endswith("/imds_tracer/cli.py") for f in files)
    assert any(f.endswith("/imds_tracer/bpf/tracepoint.c") for f in files)
    dump = _q(rpm_file, "--dump")
    # the BPF sources are regular files, not the source tree's symlink
    for line in dump.splitlines():
        if "/imds_tracer/bpf/" in line and line.split()[0].endswith((".c", ".h")):
            mode = int(line.split()[4], 8)
            assert (mode & 0o170000) == 0o100000, line
    configs = _q(rpm_file, "-c").split()
    assert configs == ["/etc/imds-tracer/config.toml", "/etc/logrotate.d/imds-tracer"]


def test_requires_and_scriptlets(rpm_file):
    requires = _q(rpm_file, "--requires")
    for dep in ("python3-bcc", "python3-psutil", "python3-prometheus_client"):
        assert dep in requires
    assert "scapy" not in requires   # replay reads captures with its own reader
    scripts = _q(rpm_file, "--scripts")
    assert "systemctl" in scripts and "imds-tracer.service" in scripts
