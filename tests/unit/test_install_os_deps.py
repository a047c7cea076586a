"""scripts/install-os-deps.sh chooses the package manager, the package names and the Python
that runs the agent from /etc/os-release: run for real (--dry-run prints the plan) against
the os-release files of the distributions the README names (tests/data/os-release/)."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "install-os-deps.sh"
OS_RELEASE = REPO / "tests" / "data" / "os-release"
KVER = "5.14.0-427.13.1.el9_4.x86_64"

EL8 = ("el8", "dnf", "/usr/bin/python3.9",
       {"bcc", "python3-bcc", "bcc-tools", f"kernel-devel-{KVER}", "kernel-headers",
        "python39", "python39-pip"})
EL9 = ("el9", "dnf", "/usr/bin/python3",
       {"bcc", "python3-bcc", "bcc-tools", f"kernel-devel-{KVER}", "kernel-headers"})
SUSE = ("suse", "zypper", "/usr/bin/python3.11",
        {"python3-bcc", "bcc-tools", "kernel-default-devel", "python311"})
DEBIAN = ("debian", "apt-get", "/usr/bin/python3",
          {"python3-bpfcc", "bpfcc-tools", f"linux-headers-{KVER}"})

EXPECTED = {
    "amazon-linux-2023": ("al2023", "dnf", "/usr/bin/python3", EL9[3]),
    "rhel-8": EL8, "rocky-8": EL8, "almalinux-8": EL8, "anolis-8": EL8, "alinux-3": EL8,
    "rhel-9": EL9, "rocky-9": EL9, "almalinux-9": EL9,
    "sles-15": SUSE, "opensuse-leap-15": SUSE,
    "ubuntu-20.04": ("debian", "apt-get", "/usr/bin/python3.9",
                     DEBIAN[3] | {"python3.9", "python3.9-venv", "python3-toml"}),
    "ubuntu-22.04": ("debian", "apt-get", "/usr/bin/python3", DEBIAN[3] | {"python3-tomli"}),
    "ubuntu-24.04": DEBIAN,
    "debian-11": ("debian", "apt-get", "/usr/bin/python3", DEBIAN[3] | {"python3-toml"}),
    "debian-12": DEBIAN, "debian-13": DEBIAN,
}


def plan(os_release: Path) -> dict[str, str]:
    env = dict(os.environ, KERNEL_RELEASE=KVER)
    proc = subprocess.run(["sh", str(SCRIPT), "--dry-run", "--os-release", str(os_release)],
                          capture_output=True, text=True, env=env, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return dict(line.split(": ", 1) for line in proc.stdout.splitlines())


def test_every_named_distribution_has_its_os_release_file():
    assert sorted(EXPECTED) == sorted(p.name for p in OS_RELEASE.iterdir() if p.name != "README")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_plan_for(name):
    family, manager, python, must = EXPECTED[name]
    got = plan(OS_RELEASE / name)
    packages = set(got["packages"].split())
    assert (got["family"], got["manager"], got["python"]) == (family, manager, python), got
    assert must <= packages, must - packages
    if family != "el8":   # only there python3 is 3.6 and python39 is the agent's Python
        assert not {p for p in packages if p.startswith("python39")}, packages


def test_unknown_and_too_old_distributions_are_one_line_errors(tmp_path):
    cases = {"gentoo": 'ID=gentoo\nNAME=Gentoo\n',
             "amzn2": 'NAME="Amazon Linux"\nID="amzn"\nID_LIKE="centos rhel fedora"\n'
                      'VERSION_ID="2"\n',
             "centos7": 'NAME="CentOS Linux"\nID="centos"\nID_LIKE="rhel fedora"\n'
                        'VERSION_ID="7"\n'}
    for name, text in cases.items():
        path = tmp_path / name
        path.write_text(text)
        proc = subprocess.run(["sh", str(SCRIPT), "--dry-run", "--os-release", str(path)],
                              capture_output=True, text=True, timeout=30)
        assert proc.returncode == 1 and proc.stdout == "", (name, proc)
        assert len(proc.stderr.strip().splitlines()) == 1, (name, proc.stderr)
