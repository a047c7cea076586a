"""The kernel-lab matrix: each Debian userland booted on its own kernel under qemu
(tests/lab/vm.py), running the live end-to-end suite inside on every backend and on
`--backend auto`, plus what runs on that userland's Python (Debian 11: unit and replay, the
Python 3.9 floor).

What each cell expects is written down here, not discovered: the backends that must load on
that kernel, and the one `auto` must pick. A backend that does not load fails the cell.

A cell boots once, runs pytest in the guest (junit and summary back to the host) and powers
off. Its console, output and agent figures (ready time, RSS) stay in
$IMDS_TRACER_LAB_CACHE/runs/<cell>/ (default /var/cache/imds-tracer-lab). The cost per kernel
is measured outside the tests: bench/matrix_bench.py (`make bench-matrix`).

Needs root, qemu-system-x86_64, debootstrap and busybox-static (the Makefile's OS packages) and
the network to deb.debian.org for the first set-up; skipped with the reason elsewhere, a
failure when IMDS_TRACER_REQUIRE_LAB=1 (set by .ci/run).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.lab import vm

REQUIRE = os.environ.get("IMDS_TRACER_REQUIRE_LAB") == "1" or \
    os.environ.get("IMDS_TRACER_REQUIRE_KERNEL") == "1"
# Under TCG BCC compiles 10-30x slower than natively (an agent start: 15-170 s here, the most
# when other guests share the CPUs): the lab's waits in the guest scale by it.
GUEST_SLOW = os.environ.get("IMDS_TRACER_GUEST_SLOW", "10")


@dataclass
class Cell:
    suite: str                     # Debian suite: its kernel and its userland
    backends: tuple                # must load on this kernel (each gets its own agent)
    auto: str                      # what --backend auto must pick
    cgroup: str = "v2"             # v1: only cgroup v1 hierarchies mounted (net_cls in use)
    also: tuple = ()               # more test paths run on this userland's Python
    python: str = "/usr/bin/python3"   # the guest's own; this machine's root: the checkout's venv
    deselect: tuple = field(default=())  # -k exclusions, each with its reason in the cell

    def mounts(self) -> tuple:
        """The checkout's venv, when the cell runs its Python: CI's clone is under /tmp."""
        venv = vm.REPO_ROOT / ".venv"
        return (venv,) if self.python.startswith(str(venv) + "/") else ()

    def e2e_backends(self) -> str:
        # auto's agent stands for the backend it picks: one BCC compile less per guest
        return ",".join(["auto"] + [b for b in self.backends if b != self.auto])


# the long-running agent without BCC: its capabilities (CAP_BPF kept before 6.5), no LLVM
# mapped, nothing left attached when it or its loader is killed, both event buffers. Not in
# the v1 cell: its checks read the hooks on the cgroup2 root, which that host does not mount
LOADER = "tests/kernel/test_loader.py"

CELLS = {
    # Debian 11: Python 3.9, BCC 0.18, kernel 5.10 (the Alibaba Cloud Linux 3 / AL2 generation)
    "debian11-5.10": Cell("bullseye", ("cgroup", "kprobe", "tracepoint"), "cgroup",
                          also=(LOADER, "tests/unit", "tests/replay")),
    # Debian 12: this machine's root, on bookworm's own 6.1
    "debian12-6.1": Cell("bookworm", ("cgroup", "kprobe", "tracepoint"), "cgroup",
                         also=(LOADER,), python=str(vm.REPO_ROOT / ".venv" / "bin" / "python")),
    # Debian 13: Python 3.13, BCC 0.30, kernel 6.12
    "debian13-6.12": Cell("trixie", ("cgroup", "kprobe", "tracepoint"), "cgroup",
                          also=(LOADER,)),
    # EL8 / Alinux 3 defaults: no cgroup2 mounted, v1 net_cls/net_prio in use by the tests'
    # processes. The agent mounts a private cgroup2 for its hooks (auto still picks cgroup).
    # The docker-like-cgroup test makes a cgroup v2 directory for its client, which a v1-only
    # host does not have: left out here (it runs in every other cell).
    "debian11-5.10-cgroup-v1": Cell("bullseye", ("cgroup",), "cgroup", cgroup="v1",
                                    deselect=("docker_like_cgroup",)),
}

GUEST_SCRIPT = r"""
set -u
PY={python}
export PYTHONPATH=/lab/src PYTHONDONTWRITEBYTECODE=1
export IMDS_TRACER_REQUIRE_KERNEL=1 IMDS_TRACER_REQUIRE_LAB=1 IMDS_TRACER_SLOW={slow}
export IMDS_TRACER_E2E_BACKENDS={backends} IMDS_TRACER_E2E_AUTO={auto} IMDS_TRACER_E2E_LATE=auto
export IMDS_TRACER_LAB_STATS=/lab/run/stats.jsonl
if [ {cgroup} = v1 ]; then      # net_cls / net_prio in use: this shell and all it starts
    d=/sys/fs/cgroup/net_cls,net_prio/lab && mkdir -p $d && echo 0x100001 > $d/net_cls.classid \
        && echo "lo 5" > $d/net_prio.ifpriomap && echo $$ > $d/tasks
    echo "net_cls: $(cat /proc/self/cgroup | grep net_cls)"
fi
echo "python: $($PY -V 2>&1) ($PY); bcc: $($PY -c 'import bcc; print(getattr(bcc, "__version__", "?"))' 2>&1)"
$PY -m pytest -p no:cacheprovider -ra -v --junitxml=/lab/run/junit.xml {deselect} \
    tests/kernel/test_e2e.py tests/kernel/test_e2e_late.py {also}
"""


def lab_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "the kernel lab needs root (9p shares of root-owned files, BPF in the guest)"
    for tool, package in (("qemu-system-x86_64", "qemu-system-x86"), ("debootstrap", "debootstrap"),
                          ("dpkg-deb", "dpkg"), ("apt-get", "apt")):
        if not shutil.which(tool):
            return f"{tool} not found (Debian package {package}; `make os-deps` installs it)"
    if not Path(vm.BUSYBOX).exists():
        return f"{vm.BUSYBOX} not found (Debian package busybox-static)"
    return None


@pytest.fixture(scope="module")
def lab_cache():
    """Every cell's kernel and root, made side by side (downloads and debootstraps overlap:
    from an empty cache about 5 minutes instead of 9); quick when cached."""
    reason = lab_unavailable()
    if reason:
        if REQUIRE:
            pytest.fail(f"IMDS_TRACER_REQUIRE_LAB=1 but {reason}", pytrace=False)
        pytest.skip(reason)
    started = time.monotonic()
    suites = sorted({cell.suite for cell in CELLS.values()})
    with ThreadPoolExecutor(len(suites)) as pool:
        list(pool.map(vm.setup, suites))
    print(f"lab set-up: {time.monotonic() - started:.0f}s")


def summary_line(output: str) -> str:
    lines = re.findall(r"^=+ (.* in [\d.]+s.*) =+$", output, re.M)
    return lines[-1] if lines else "(no pytest summary)"


@pytest.mark.parametrize("name", list(CELLS))
def test_guest_cell(name, lab_cache):
    cell = CELLS[name]
    deselect = " ".join(f"-k 'not {k}'" for k in cell.deselect)
    command = GUEST_SCRIPT.format(python=cell.python, slow=GUEST_SLOW,
                                  backends=cell.e2e_backends(), auto=cell.auto, cgroup=cell.cgroup,
                                  also=" ".join(cell.also), deselect=deselect)
    run_dir = vm.CACHE / "runs" / name
    shutil.rmtree(run_dir, ignore_errors=True)
    run = vm.boot(cell.suite, command, run_dir, cgroup=cell.cgroup, mounts=cell.mounts())
    stats = [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()] \
        if (run_dir / "stats.jsonl").exists() else []
    report = {"cell": name, "suite": cell.suite, "seconds": round(run.seconds),
              "status": run.status, "summary": summary_line(run.output), "agents": stats}
    (run_dir / "report.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report))
    assert run.status == 0, (
        f"{name}: guest exit status {run.status} ({report['summary']}) after {run.seconds:.0f}s; "
        f"files in {run_dir}\n--- output (tail)\n{run.output[-8000:]}\n--- console (tail)\n{run.tail()}")
