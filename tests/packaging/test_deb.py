"""The .deb round trip on this machine: build, install with dpkg, run the installed
/usr/bin/imds-tracer, verify the installed unit, purge, and check nothing is left behind.

Needs root and dpkg (skipped otherwise; IMDS_TRACER_REQUIRE_KERNEL=1, as in CI, turns the
skip into a failure). The runtime dependencies (python3-bpfcc, python3-psutil,
python3-prometheus-client) must be installed as OS packages: `make test`
installs them.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.packaging import build_package

PKG = "imds-tracer"
SITE = Path("/usr/lib/python3/dist-packages")
INSTALLED = [
    Path("/usr/bin/imds-tracer"),
    Path("/lib/systemd/system/imds-tracer.service"),
    Path("/etc/imds-tracer/config.toml"),
    Path("/etc/logrotate.d/imds-tracer"),
    Path("/usr/share/man/man1/imds-tracer.1.gz"),
    SITE / "imds_tracer" / "cli.py",
]
# everything the package or its maintainer scripts may create: none may survive a purge
LEFTOVERS = [
    "/usr/bin/imds-tracer", "/lib/systemd/system/imds-tracer.service",
    "/usr/lib/systemd/system/imds-tracer.service", "/etc/systemd/system/imds-tracer.service",
    "/etc/systemd/system/multi-user.target.wants/imds-tracer.service",
    "/var/lib/systemd/deb-systemd-helper-enabled/imds-tracer.service.dsh-also",
    "/var/lib/systemd/deb-systemd-helper-enabled/multi-user.target.wants/imds-tracer.service",
    "/var/lib/systemd/deb-systemd-helper-masked/imds-tracer.service",
    "/etc/imds-tracer", "/etc/logrotate.d/imds-tracer", "/var/log/imds",
    "/usr/share/man/man1/imds-tracer.1.gz", "/usr/share/doc/imds-tracer",
    str(SITE / "imds_tracer"), str(SITE / "imds_tracer-0.1.0.dist-info"),
]
RUNTIME_DEPS = ["python3-bpfcc", "python3-psutil", "python3-prometheus-client"]


def _skip_or_fail(reason: str):
    if os.environ.get("IMDS_TRACER_REQUIRE_KERNEL") == "1":
        pytest.fail(f"{reason} (IMDS_TRACER_REQUIRE_KERNEL=1)")
    pytest.skip(reason)


def _installed(pkg: str) -> bool:
    out = subprocess.run(["dpkg-query", "-W", "-f=${Status}", pkg], capture_output=True,
                         text=True)
    return out.returncode == 0 and "ok installed" in out.stdout


def _clean_env() -> dict[str, str]:
    # the installed program must work on its own: no venv, no source tree on sys.path
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PATH"] = "/usr/sbin:/usr/bin:/sbin:/bin"
    return env


@pytest.fixture(scope="module")
def deb():
    if os.geteuid() != 0:
        _skip_or_fail("installing a .deb needs root")
    if not shutil.which("dpkg-deb") or not shutil.which("dpkg"):
        _skip_or_fail("dpkg/dpkg-deb not available (not a Debian-family system)")
    missing = [p for p in RUNTIME_DEPS if not _installed(p)]
    if missing:
        _skip_or_fail(f"runtime dependencies not installed as OS packages: {' '.join(missing)}")
    if _installed(PKG):
        pytest.skip(f"{PKG} is already installed on this machine; not touching it")
    yield build_package("deb", "_all.deb")
    # whatever happened, leave the machine clean
    subprocess.run(["dpkg", "--purge", PKG], capture_output=True, timeout=120)


def test_package_metadata(deb):
    info = subprocess.run(["dpkg-deb", "-f", str(deb)], capture_output=True, text=True).stdout
    assert "Architecture: all" in info
    for dep in RUNTIME_DEPS:
        assert dep in info
    assert "scapy" not in info   # replay reads captures with its own reader
    listing = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True,
                             text=True).stdout
    # the BPF sources ship as real files, not as the source tree's symlink
    bpf = [line for line in listing.splitlines() if "/imds_tracer/bpf/" in line]
    assert any(line.startswith("-") and line.endswith(".c") for line in bpf), bpf
    assert not any(line.startswith("l") for line in bpf), bpf
    conffiles = subprocess.run(["dpkg-deb", "-I", str(deb), "conffiles"], capture_output=True,
                               text=True).stdout.split()
    assert conffiles == ["/etc/imds-tracer/config.toml", "/etc/logrotate.d/imds-tracer"]


def test_install_run_purge(deb):
    inst = subprocess.run(["dpkg", "-i", str(deb)], capture_output=True, text=True,
                          timeout=300, env=_clean_env())
    assert inst.returncode == 0, inst.stdout + inst.stderr
    try:
        for path in INSTALLED:
            assert path.exists(), path
        assert (SITE / "imds_tracer" / "bpf").is_dir()
        assert not (SITE / "imds_tracer" / "bpf").is_symlink()
        assert list((SITE / "imds_tracer" / "bpf").glob("*.c"))
        assert Path("/var/log/imds").stat().st_mode & 0o777 == 0o700

        version = subprocess.run(["/usr/bin/imds-tracer", "--version"], capture_output=True,
                                 text=True, timeout=60, env=_clean_env(), cwd="/")
        assert version.returncode == 0, version.stderr
        assert "0.1.0" in version.stdout + version.stderr

        # doctor may exit non-zero (no usable backend), but must run without a traceback
        doctor = subprocess.run(["/usr/bin/imds-tracer", "doctor"], capture_output=True,
                                text=True, timeout=180, env=_clean_env(), cwd="/")
        assert "Traceback" not in doctor.stdout + doctor.stderr, doctor.stderr
        assert doctor.stdout.strip() or doctor.stderr.strip()

        # the installed unit verifies (binary and man page now exist)
        if shutil.which("systemd-analyze"):
            # --man=no: checking Documentation=man: runs man(1), which leaves a cat page in
            # /var/cache/man; the man page itself is checked above
            verify = subprocess.run(["systemd-analyze", "verify", "--man=no",
                                     "/lib/systemd/system/imds-tracer.service"],
                                    capture_output=True, text=True, timeout=60)
            assert verify.returncode == 0, verify.stderr
            assert "imds-tracer.service" not in verify.stderr, verify.stderr

        # the installed config is the shipped one and loads with the installed package
        load = subprocess.run(
            ["/usr/bin/python3", "-c",
             "from imds_tracer import config; "
             "assert config.load('/etc/imds-tracer/config.toml', required=True) "
             "== config.Config()"],
            capture_output=True, text=True, env=_clean_env(), cwd="/")
        assert load.returncode == 0, load.stderr

        # run as root, the agent wrote byte-code and maybe logs: purge must still clean up
        Path("/var/log/imds/imds-trace.log").write_text("[x] [INFO] test\n")
    finally:
        purge = subprocess.run(["dpkg", "--purge", PKG], capture_output=True, text=True,
                               timeout=300)
    assert purge.returncode == 0, purge.stdout + purge.stderr
    assert "warning" not in (purge.stdout + purge.stderr).lower(), purge.stdout + purge.stderr
    assert not _installed(PKG)
    left = [p for p in LEFTOVERS + ["/var/cache/man/cat1/imds-tracer.1.gz"]
            if os.path.lexists(p)]
    assert not left, left
