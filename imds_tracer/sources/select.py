"""Which kernel backend runs: `run` and `doctor` both call `select_backend`, so what doctor
says `--backend auto` would use is what `run` uses."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, List, NamedTuple

from . import caps
from .base import SourceError

if TYPE_CHECKING:
    from ..config import Config
    from .kernel import KernelSource

log = logging.getLogger("imds_tracer")


def backend_classes() -> dict:
    """name -> source class, in the order --backend auto tries them: by cost to the rest of
    the machine. cgroup (socket hooks, nothing on the syscall path), kprobe (the TCP send
    path only), tracepoint (every read and write of every process)."""
    from .cgroup import CgroupSource
    from .kprobe import KprobeSource
    from .tracepoint import TracepointSource
    return {cls.name: cls for cls in (CgroupSource, KprobeSource, TracepointSource)}


class Selection(NamedTuple):
    source: "KernelSource"
    passed_over: List[str]   # "<backend>: <why it cannot run here>", in the order tried


def candidates(backend_name: str) -> list:
    """The source classes --backend NAME tries, in order. Raises SourceError."""
    backends = backend_classes()
    if backend_name == "auto":
        return list(backends.values())
    if backend_name in backends:
        return [backends[backend_name]]
    raise SourceError(f"unknown backend {backend_name!r} (use auto, {', '.join(backends)})")


def select_backend(config: "Config", backend_name: str, *, load: bool = True) -> Selection:
    """The started source for --backend auto|cgroup|kprobe|tracepoint, and why each backend
    tried before it could not run. With load=False, the first backend not ruled out by the
    checks that need no compile (not started: a guess that loading may still refute).
    Raises SourceError."""
    passed_over = []
    for cls in candidates(backend_name):
        why_not = cls.unavailable_reason()
        if why_not:
            if backend_name != "auto":
                raise SourceError(f"{cls.name} backend cannot run: {why_not}; "
                                  "use --backend auto; see imds-tracer doctor")
            passed_over.append(f"{cls.name}: {why_not}")
            continue
        source = cls(config)
        if not load:
            return Selection(source, passed_over)
        try:
            source.start()
        except SourceError as exc:
            source.stop()
            if backend_name != "auto":
                raise
            passed_over.append(f"{cls.name}: {exc}")
            continue
        except BaseException:
            source.stop()
            raise
        return Selection(source, passed_over)
    raise SourceError("no backend could start (" + "; ".join(passed_over)
                      + "); see imds-tracer doctor")


def open_source(config: "Config", backend_name: str, *,
                drop_privileges: bool = True) -> "KernelSource":
    """The started source for `run`; each backend `auto` passed over is logged in one line.
    Once the descriptors are in hand, this process keeps only the capabilities the running
    agent needs (caps.AGENT_KEEPS, plus what the kernel wants for bpf() map calls; threads
    already running keep theirs: start them after this call)."""
    source, passed_over = select_backend(config, backend_name)
    for why in passed_over:
        log.warning("backend auto: not %s", why)
    if backend_name == "auto":
        log.info("backend auto: using %s (%d probes)", source.name, source.probes)
    try:
        kept = caps.drop_to(source.keep_caps) if drop_privileges else caps.effective_caps()
    except OSError as exc:
        source.stop()
        raise SourceError(f"dropping capabilities after the load failed: {exc.strerror}") \
            from None
    log.info("loaded in %.2fs (%s); capabilities kept: %s", source.load_seconds,
             " ".join(f"{k}={v}" for k, v in source.load_phases.items()),
             ", ".join(caps.names(kept)) or "none")
    return source
