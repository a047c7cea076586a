"""Run a command inside the parts of systemd/imds-tracer.service's sandbox that decide whether
BCC works, without systemd as PID 1: the capability bounding set (setpriv), NoNewPrivileges,
MemoryDenyWriteExecute (systemd's seccomp rules) and SystemCallFilter (the groups expanded by
`systemd-analyze syscall-filter`, default action kill, as systemd does).

    /usr/bin/python3 sandbox.py UNIT -- COMMAND...

Needs root, setpriv and python3-seccomp (the OS python's module).
"""
from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
import sys


def unit_settings(path: str) -> dict[str, list[str]]:
    """Service-section settings; repeated keys accumulate, as in systemd."""
    settings: dict[str, list[str]] = {}
    section = None
    for raw in open(path):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if m := re.fullmatch(r"\[(\w+)\]", line):
            section = m.group(1)
            continue
        key, _, value = line.partition("=")
        settings.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return settings


def syscall_groups() -> dict[str, list[str]]:
    out = subprocess.run(["systemd-analyze", "syscall-filter", "--no-pager"],
                         capture_output=True, text=True, check=True).stdout
    groups: dict[str, list[str]] = {}
    current = None
    for line in out.splitlines():
        if line.startswith("@"):
            current = line.split()[0]
            groups[current] = []
        elif current and line.strip() and not line.strip().startswith("#"):
            groups[current].append(line.strip())
    return groups


def expand(names, groups) -> set[str]:
    out: set[str] = set()
    for name in names:
        out |= expand(groups.get(name, []), groups) if name.startswith("@") else {name}
    return out


def setpriv_prefix(settings) -> list[str]:
    caps = " ".join(settings.get("Service.CapabilityBoundingSet", [])).split()
    spec = ",".join(["-all"] + ["+" + c.lower().removeprefix("cap_") for c in caps])
    cmd = ["setpriv", f"--bounding-set={spec}", "--inh-caps=-all"]
    if settings.get("Service.NoNewPrivileges", ["no"])[-1] == "yes":
        cmd.append("--no-new-privs")
    return cmd


def install_filters(settings) -> None:
    import seccomp  # python3-seccomp

    if settings.get("Service.MemoryDenyWriteExecute", ["no"])[-1] == "yes":
        mdwe = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
        deny = seccomp.ERRNO(errno.EPERM)
        w, x = 0x2, 0x4
        mdwe.add_rule(deny, "mmap", seccomp.Arg(2, seccomp.MASKED_EQ, w | x, w | x))
        mdwe.add_rule(deny, "mprotect", seccomp.Arg(2, seccomp.MASKED_EQ, x, x))
        mdwe.add_rule(deny, "pkey_mprotect", seccomp.Arg(2, seccomp.MASKED_EQ, x, x))
        mdwe.add_rule(deny, "shmat", seccomp.Arg(2, seccomp.MASKED_EQ, 0o100000, 0o100000))
        mdwe.load()
    allow, deny_list = set(), set()
    groups = syscall_groups()
    for value in settings.get("Service.SystemCallFilter", []):
        if value.startswith("~"):
            deny_list |= expand(value[1:].split(), groups)
        else:
            allow |= expand(value.split(), groups)
    if allow:
        flt = seccomp.SyscallFilter(defaction=seccomp.KILL_PROCESS)
        for name in sorted((allow - deny_list) | {"execve"}):
            try:
                flt.add_rule(seccomp.ALLOW, name)
            except (RuntimeError, ValueError):
                pass  # not a syscall of this architecture
        flt.load()


def wrap(unit: str, command: list[str]) -> list[str]:
    """The command line that runs `command` in the sandbox of `unit`."""
    here = os.path.abspath(__file__)
    return setpriv_prefix(unit_settings(unit)) + ["/usr/bin/python3", here, unit, "--"] + command


def available() -> str | None:
    """None, or why the sandbox cannot be emulated here."""
    if os.geteuid() != 0:
        return "needs root"
    if not shutil.which("setpriv") or not shutil.which("systemd-analyze"):
        return "needs setpriv and systemd-analyze"
    probe = subprocess.run(["/usr/bin/python3", "-c", "import seccomp"], capture_output=True)
    if probe.returncode != 0:
        return "needs python3-seccomp (apt-get install python3-seccomp)"
    return None


if __name__ == "__main__":
    unit, sep, *command = sys.argv[1:]
    assert sep == "--" and command, __doc__
    install_filters(unit_settings(unit))
    os.execvp(command[0], command)
