"""Kernel tests: need root, BCC and BPF. Skipped with the reason elsewhere; with
IMDS_TRACER_REQUIRE_KERNEL=1 (set by .ci/run) a missing prerequisite is a failure instead."""
from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import pytest

from tests.lab import SLOW

REQUIRE = os.environ.get("IMDS_TRACER_REQUIRE_KERNEL") == "1"


def kernel_unavailable() -> str | None:
    """Why BPF tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "not root"
    try:
        import bcc  # noqa: F401
    except ImportError:
        return ("bcc not importable (python3-bpfcc; use a venv made with "
                "--system-site-packages from /usr/bin/python3)")
    if not Path("/sys/kernel/tracing/events/syscalls").is_dir():
        return "no syscall tracepoints under /sys/kernel/tracing (tracefs not mounted?)"
    if not Path(f"/lib/modules/{platform.release()}/build").exists():
        return f"no kernel headers at /lib/modules/{platform.release()}/build"
    return None


def skip_or_fail(reason: str) -> None:
    if REQUIRE:
        pytest.fail(f"IMDS_TRACER_REQUIRE_KERNEL=1 but {reason}", pytrace=False)
    pytest.skip(reason)


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.kernel)


@pytest.fixture(autouse=True)
def _kernel_required():
    reason = kernel_unavailable()
    if reason:
        skip_or_fail(reason)


class Recorder:
    """Stands in for the pipeline: records what a source's polls returned."""

    def __init__(self):
        self.chunks = []
        self.closed = []
        self.drops = []

    def feed(self, chunk):
        self.chunks.append(chunk)

    def close_flow(self, flow, ts):
        self.closed.append(flow)

    def client_gave_up(self, flow, ts):
        pass

    def drop(self, kind, count=1, detail=""):
        self.drops.append((kind, count, detail))

    def take(self, items):
        """What one poll of a source returned."""
        from imds_tracer.model import Chunk, ClientGaveUp, FlowClosed
        for item in items:
            if isinstance(item, Chunk):
                self.feed(item)
            elif isinstance(item, FlowClosed):
                self.close_flow(item.flow, item.ts)
            elif not isinstance(item, ClientGaveUp):
                self.drop(item.kind, item.count, item.detail)


@pytest.fixture
def recorder():
    return Recorder()


@pytest.fixture
def lab():
    """tests.lab.netns.Lab, cleaned up after the test."""
    from tests.lab import netns
    reason = netns.available()
    if reason:
        skip_or_fail(f"lab unavailable: {reason}")
    with netns.Lab() as the_lab:
        yield the_lab


@pytest.fixture(scope="module")
def module_lab():
    """One lab for a whole module (modules whose tests share a running agent)."""
    from tests.lab import netns
    reason = netns.available()
    if reason:
        skip_or_fail(f"lab unavailable: {reason}")
    with netns.Lab(mode="optional") as the_lab:
        yield the_lab


def run_client(lab, argv, cgroup=None, timeout=30, env=None):
    """Run a client inside the lab to the end; it must succeed. The Popen (its pid names the
    records it caused) with the client's stdout as `.output`. `env`: added to the lab's."""
    proc = lab.popen([str(a) for a in argv], cgroup=cgroup, stdout=subprocess.PIPE,
                     stderr=subprocess.PIPE, text=True, env={**lab.env(), **(env or {})})
    out, err = proc.communicate(timeout=timeout * SLOW)
    assert proc.returncode == 0, f"{argv}: {err}"
    proc.output = out
    return proc


def map_ids(source) -> set[int]:
    """Kernel ids of the BPF maps a started kernel source holds."""
    from imds_tracer.sources import bpfsys
    return {bpfsys.map_info(table.fd)["id"] for table in source.maps.values()}


def live_map_ids() -> set[int]:
    """Ids of every BPF map alive in the kernel (bpftool). A program that is still attached
    keeps its maps alive: maps gone means programs gone."""
    import json
    out = subprocess.run(["bpftool", "-j", "map", "show"], capture_output=True, text=True,
                         check=True).stdout
    return {m["id"] for m in json.loads(out.strip() or "[]")}


def wait_maps_gone(ids: set[int], seconds: float = 5.0) -> None:
    import time
    deadline = time.monotonic() + seconds
    while ids & live_map_ids():
        assert time.monotonic() < deadline, f"still alive: maps {sorted(ids & live_map_ids())}"
        time.sleep(0.1)
