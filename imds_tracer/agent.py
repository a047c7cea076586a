"""The agent: one object that owns the outputs, the pipeline, a source, the ticks and the
signals, for `run` (a kernel source, polled) and `replay` (capture files, read once).

Data flows one way: a source returns what it read (sources/base.py), the agent hands it to
`Pipeline.take` and ticks the pipeline after each poll; the pipeline writes to the sinks.
Heavy modules are imported when a command needs them: a replay without --metrics-addr loads
neither prometheus_client nor the kernel sources.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import time
from typing import Callable, Iterable, Optional

from .classify import detect_cloud
from .config import Config, ConfigError
from .enrich import Enricher
from .pipeline import Pipeline
from .sinks.jsonl import JsonLinesSink
from .sinks.tracelog import TraceLogSink
from .sources.base import Source, SourceError

log = logging.getLogger("imds_tracer")

POLL_MS = 200   # longest wait for a kernel source between two ticks


def cloud_of(config: Config) -> Optional[str]:
    if config.cloud == "auto":
        return detect_cloud()
    return None if config.cloud == "none" else config.cloud


def sd_notify(message: str) -> None:
    """Tell systemd (Type=notify) our state; nothing when not under systemd."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(path)
            sock.sendall(message.encode())
    except OSError as exc:
        log.warning("sd_notify failed: %s", exc)


class Agent:
    """Outputs, then the source, then the pipeline, in that order:

    - the outputs first: a taken metrics port or an unwritable log directory fails before a
      kernel source spends seconds compiling (`open_source` is called only then);
    - the enricher is built with the source's process caches (`lookup_process(pid) ->
      (ppid, argv)`) when `enrich` is True, or is the Enricher given, or none (replay);
    - threads (the metrics endpoint's) start last: the port is taken with the outputs, but
      answered only once the source is open and has dropped what it needed to load.

    `metrics`: keep Prometheus counters (default: when `metrics_addr` serves them).
    """

    def __init__(self, config: Config, *, backend: str = "replay", console: bool = False,
                 metrics_addr: Optional[str] = None, metrics: Optional[bool] = None,
                 open_source: Optional[Callable[[], Source]] = None,
                 enrich: "bool | Enricher" = False):
        self.config = config
        self.cloud = cloud_of(config)
        self.metrics = None
        self.pipeline: Optional[Pipeline] = None
        self.source: Optional[Source] = None
        self._replay = self._progress = None
        self._stop = self._reopen = False
        sinks = self._open_outputs(backend, console, metrics_addr,
                                   bool(metrics_addr) if metrics is None else metrics)
        try:
            if open_source is not None:
                self.source = open_source()   # raises SourceError
            if enrich is True:
                from .owner import OwnerResolver
                enrich = Enricher(parents=config.parents, owners=OwnerResolver(),
                                  lookup=getattr(self.source, "lookup_process", None))
            self.pipeline = Pipeline(config, sinks, cloud=self.cloud,
                                     enricher=enrich or None)
        except BaseException:
            for sink in sinks:
                sink.close()
            raise
        if self.metrics is not None:
            if self.source is not None:
                self.metrics.set_backend(self.source.name)
            # threads only now: a kernel source drops capabilities once loaded, and
            # capabilities are per thread (a thread started before keeps them all)
            self.metrics.start()

    # -- outputs ------------------------------------------------------------------------
    def _open_outputs(self, backend: str, console: bool, metrics_addr: Optional[str],
                      metrics: bool) -> list:
        config, sinks = self.config, []
        try:
            if metrics:
                from .sinks.metrics import MetricsSink   # prometheus_client: only when wanted
                self.metrics = MetricsSink(backend=backend, cloud=self.cloud,
                                           max_exe_labels=config.max_exe_labels)
                sinks.append(self.metrics)
                if metrics_addr:
                    self.metrics.bind(metrics_addr)   # its thread starts after the source
            files = [(lambda: TraceLogSink(config.log_dir, config.log_max_bytes,
                                           config.log_backups, on_failure=self._write_failed),
                      config.log_dir, "--log-dir / log.dir")]
            if config.json:
                files.append((lambda: JsonLinesSink(config.json, config.json_max_bytes,
                                                    config.json_backups,
                                                    on_failure=self._write_failed),
                              config.json, "--json / log.json"))
            for make, where, setting in files:
                try:
                    sinks.append(make())
                except OSError as exc:
                    raise ConfigError(f"cannot write {exc.filename or where}: "
                                      f"{exc.strerror} ({setting})") from None
        except BaseException:
            for sink in sinks:
                sink.close()
            raise
        if console:
            from .sinks.console import ConsoleSink
            sinks.append(ConsoleSink())
        return sinks

    def _write_failed(self, lines: int) -> None:
        self.pipeline.drop("log_write", lines)

    @property
    def metrics_port(self) -> Optional[int]:
        return self.metrics.port if self.metrics is not None else None

    def close(self) -> None:
        self.pipeline.close()

    # -- run: a kernel source, until SIGTERM / SIGINT -------------------------------------
    def run(self) -> int:
        """Attach, say ready, then poll and tick until stopped. Returns the exit status."""
        from .evidence import EvidenceSink

        source, pipeline = self.source, self.pipeline
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_reopen)
        try:
            probes = source.start()
            if probes <= 0:
                raise SourceError(f"backend {source.name} attached no probe; "
                                  "run 'imds-tracer doctor'")
            # the watch starts now: from here on the evidence file records it
            pipeline.sinks.append(EvidenceSink(self.config.log_dir))
            print(f"ready backend={source.name} probes={probes}", file=sys.stderr, flush=True)
            log.info("capturing requests to %s on port(s) %s with the %s backend",
                     ", ".join(self.config.addresses), ", ".join(map(str, self.config.ports)),
                     source.name)
            sd_notify("READY=1\nSTATUS=capturing with the %s backend" % source.name)
            while not self._stop:
                pipeline.take(source.poll(POLL_MS))
                # the time the source has caught up to, not the clock: requests whose
                # answer waits unread in the buffer are not unanswered
                pipeline.tick(min(time.time(), source.watermark()))
                if self._reopen:
                    self._reopen = False
                    pipeline.reopen()
                    log.info("log files reopened (SIGHUP)")
        finally:
            sd_notify("STOPPING=1")
            source.stop()
            pipeline.flush(time.time())
            pipeline.close()
        return 0

    def _on_stop(self, *_args) -> None:
        self._stop = True

    def _on_reopen(self, *_args) -> None:
        self._reopen = True

    # -- replay: capture files, once ------------------------------------------------------
    def replay(self, paths: Iterable[str], *, progress: Optional[bool] = None) -> int:
        """Every file through the pipeline, then flush; one error line on stderr per file
        that cannot be read (after what could be). Returns how many failed."""
        errors = 0
        self._replayer(progress)
        for path in paths:
            try:
                self.replay_file(path)
            except SourceError as exc:
                print(f"imds-tracer: error: {exc}", file=sys.stderr)
                errors += 1
        self.pipeline.flush()
        return errors

    def replay_file(self, path: str) -> None:
        """One capture file into the pipeline. Raises SourceError (one line), after feeding
        every packet that could be read."""
        replay, progress = self._replayer()
        take, tick = self.pipeline.take, self.pipeline.tick
        try:
            for batch, now in replay.read(path):
                take(batch)
                if now is not None:
                    tick(now)
                progress.show(replay.stats, self.pipeline.requests)
        finally:
            progress.show(replay.stats, self.pipeline.requests, final=True)

    @property
    def replayed_packets(self) -> int:
        return self._replay.stats.packets if self._replay is not None else 0

    def _replayer(self, progress: Optional[bool] = None):
        """The capture reader (one for all files: connections may span two) and the progress
        line (default: when stderr is a terminal)."""
        if self._replay is None:
            from .sources.replay import PcapReplay, Progress
            self._replay = PcapReplay(self.config.addresses, self.config.ports,
                                      max_conns=self.config.max_flows)
            self._progress = Progress(progress)
        return self._replay, self._progress

    def linger(self) -> None:
        """Keep serving metrics until SIGTERM or SIGINT."""
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        while not self._stop:
            time.sleep(0.2)
