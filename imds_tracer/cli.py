"""`imds-tracer`: run | replay | report | doctor. Errors are one line and a non-zero exit."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import time

from . import __version__
from .classify import detect_cloud
from .config import BACKENDS, CLOUDS, Config, ConfigError, load, override, parse_metrics_addr
from .enrich import Enricher
from .owner import OwnerResolver
from .evidence import EvidenceSink
from .pipeline import Pipeline
from .report import ReportError
from .sinks.console import ConsoleSink
from .sinks.jsonl import JsonLinesSink
from .sinks.metrics import MetricsError, MetricsSink
from .sinks.tracelog import TraceLogSink
from .sources.base import SourceError

log = logging.getLogger("imds_tracer")
EXIT_OK, EXIT_ERROR = 0, 2  # report's own codes: imds_tracer.verdict
NO_ROTATION = sys.maxsize  # a size limit no file reaches


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage + message
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _metrics_arg(value: str) -> str:
    try:
        return parse_metrics_addr(value) or ""
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


REPORT_EXIT_CODES = (
    "exit status: 0 safe to enforce (the agent watched the whole window, lost nothing, and "
    "saw no normal-mode request); 1 not safe (a normal-mode request was seen); 2 error; "
    "3 not enough evidence (no normal-mode request seen, but no evidence file, a watch "
    "shorter than the window or with gaps, lost events, or unreadable lines)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="imds-tracer", description=(
        "Find the processes that read the cloud instance metadata service (IMDS) in normal "
        "(token-less) mode, so hardened-only mode (IMDSv2, Alibaba 加固模式) can be enforced "
        "without breaking them."))
    parser.add_argument("--version", action="version", version=f"imds-tracer {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    def common(p, *, metrics_default_help: str):
        p.add_argument("--config", metavar="FILE",
                       help="config file (default /etc/imds-tracer/config.toml if present)")
        p.add_argument("--log-dir", metavar="DIR", help="trace log directory (/var/log/imds)")
        p.add_argument("--json", metavar="FILE|-", help="also write JSON lines here")
        p.add_argument("--metrics-addr", metavar="HOST:PORT", type=_metrics_arg,
                       help=metrics_default_help)
        p.add_argument("--cloud", choices=CLOUDS,
                       help="the cloud this VM runs on (default: auto, from DMI)")
        p.add_argument("--quiet", action="store_true", help="no per-request console lines")

    run = sub.add_parser("run", help="the live agent (BCC)",
                         description="Capture metadata requests in the kernel and log them.")
    run.add_argument("--backend", choices=BACKENDS, help="kernel source (default: auto)")
    common(run, metrics_default_help='Prometheus endpoint (default 127.0.0.1:9796; "" off)')

    replay = sub.add_parser("replay", help="run the pipeline on pcap/pcapng files",
                            description="Replay captures through the agent's pipeline.")
    replay.add_argument("files", nargs="+", metavar="FILE")
    common(replay, metrics_default_help="serve Prometheus metrics while replaying (off)")
    replay.add_argument("--linger", action="store_true",
                        help="keep serving metrics after the replay until interrupted")
    replay.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress line on stderr (default: when stderr is a terminal)")

    report = sub.add_parser("report", help="offenders in the trace logs and the verdict",
                            description="List normal-mode offenders from the trace logs and "
                                        "the agent's evidence file (imds-evidence.json) and "
                                        "say whether hardened-only mode can be enforced.",
                            epilog=REPORT_EXIT_CODES)
    report.add_argument("--config", metavar="FILE")
    report.add_argument("--log-dir", metavar="DIR")
    report.add_argument("--since", default="14d", help="window, e.g. 14d, 12h (default 14d)")
    report.add_argument("--json", action="store_true", help="machine-readable output")

    cgroup2 = sub.add_parser(
        "cgroup2", help="mount/unmount a cgroup v2 hierarchy for the cgroup backend",
        description="On a cgroup v1 host (no cgroup v2 mounted), 'mount' mounts the cgroup v2 "
                    "hierarchy at /run/imds-tracer/cgroup2 for the cgroup backend's hooks, "
                    "and does nothing where its root is mounted already; 'unmount' removes "
                    "that mount. The systemd unit runs them before and after the agent, "
                    "which then needs no CAP_SYS_ADMIN. Needs root.")
    cgroup2.add_argument("action", choices=("mount", "unmount"))

    doctor = sub.add_parser("doctor", help="what this kernel supports and which backend runs")
    doctor.add_argument("--config", metavar="FILE")
    return parser


def _config(args) -> Config:
    config = load(args.config, required=args.config is not None)
    flags = {"log_dir": getattr(args, "log_dir", None),
             "backend": getattr(args, "backend", None),
             "cloud": getattr(args, "cloud", None)}
    json_target = getattr(args, "json", None)
    if isinstance(json_target, str):
        flags["json"] = json_target
    metrics = getattr(args, "metrics_addr", None)
    if metrics is not None:
        flags["metrics_addr"] = metrics or None
    if getattr(args, "quiet", False):
        flags["console"] = False
    return override(config, **flags)


def _cloud(config: Config) -> str | None:
    if config.cloud == "auto":
        return detect_cloud()
    return None if config.cloud == "none" else config.cloud


def _build(config: Config, *, backend: str, console: bool, metrics_addr: str | None,
           enricher: Enricher | None) -> tuple[Pipeline, MetricsSink]:
    """The sinks and the pipeline, the same for run and replay."""
    cloud = _cloud(config)
    metrics = MetricsSink(backend=backend, cloud=cloud, max_exe_labels=config.max_exe_labels)
    if metrics_addr:
        metrics.serve(metrics_addr)
    pipeline = Pipeline(config, [metrics], cloud=cloud, enricher=enricher)
    failed = lambda n: pipeline.drop("log_write", n)  # noqa: E731
    files = [(lambda: TraceLogSink(config.log_dir, config.log_max_bytes, config.log_backups,
                                   on_failure=failed), config.log_dir, "--log-dir / log.dir")]
    if config.json:
        files.append((lambda: JsonLinesSink(config.json, config.json_max_bytes,
                                            config.json_backups, on_failure=failed),
                      config.json, "--json / log.json"))
    for make, where, setting in files:
        try:
            pipeline.sinks.append(make())
        except OSError as exc:
            pipeline.close()
            raise ConfigError(f"cannot write {exc.filename or where}: {exc.strerror} "
                              f"({setting})") from None
    if console:
        pipeline.sinks.append(ConsoleSink())
    return pipeline, metrics


def cmd_replay(args) -> int:
    from .sources.replay import PcapReplay

    # the trace log (and --json) are the output: no per-request console lines, and no size
    # rotation, which would move records of the capture out of the file the user named
    config = override(_config(args), log_max_bytes=NO_ROTATION, json_max_bytes=NO_ROTATION)
    pipeline, metrics = _build(config, backend="replay", console=False,
                               metrics_addr=config.metrics_addr if args.metrics_addr else None,
                               enricher=None)
    replay = PcapReplay(config.addresses, config.ports, progress=args.progress,
                        max_conns=config.max_flows)
    errors = 0
    for path in args.files:
        try:
            replay.replay(path, pipeline)
        except SourceError as exc:
            print(f"imds-tracer: error: {exc}", file=sys.stderr)
            errors += 1
    pipeline.flush()
    print(f"imds-tracer: replayed {replay.stats.packets} packets from {len(args.files)} "
          f"file(s): {pipeline.requests} request(s) to metadata addresses", file=sys.stderr)
    if args.linger and metrics.port:
        host = config.metrics_addr.rpartition(":")[0]
        print(f"imds-tracer: serving metrics on {host}:{metrics.port}; Ctrl-C to stop",
              file=sys.stderr, flush=True)
        _wait_for_signal()
    pipeline.close()
    return EXIT_ERROR if errors else EXIT_OK


def _wait_for_signal() -> None:
    stop = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.append(1))
    while not stop:
        time.sleep(0.2)


def sd_notify(message: str) -> None:
    """Tell systemd (Type=notify) we are ready; nothing when not under systemd."""
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


def _can_load_bpf() -> bool:
    """Root, or the capabilities BCC needs (CAP_BPF + CAP_PERFMON, or CAP_SYS_ADMIN)."""
    from .sources.caps import CAP_BPF, CAP_PERFMON, CAP_SYS_ADMIN, effective_caps

    caps = effective_caps()
    has = lambda cap: bool(caps >> cap & 1)  # noqa: E731
    return has(CAP_SYS_ADMIN) or (has(CAP_BPF) and has(CAP_PERFMON))


def cmd_run(args) -> int:
    from .sources.select import open_source

    if not _can_load_bpf():
        raise SourceError("imds-tracer run needs root, or CAP_BPF and CAP_PERFMON "
                          "(this process has neither); see 'imds-tracer doctor'")
    config = _config(args)
    # outputs first: a taken metrics port or an unwritable log dir fails before the
    # seconds BCC takes to compile
    enricher = Enricher(parents=config.parents, owners=OwnerResolver())
    pipeline, metrics = _build(config, backend=config.backend, console=config.console,
                               metrics_addr=config.metrics_addr, enricher=enricher)
    try:
        source = open_source(config, config.backend)  # raises SourceError
    except BaseException:
        pipeline.close()
        raise
    metrics.set_backend(source.name)
    enricher.lookup = getattr(source, "lookup_process", None)
    flags = {"stop": False, "reopen": False}
    signal.signal(signal.SIGTERM, lambda *_: flags.__setitem__("stop", True))
    signal.signal(signal.SIGINT, lambda *_: flags.__setitem__("stop", True))
    signal.signal(signal.SIGHUP, lambda *_: flags.__setitem__("reopen", True))
    try:
        probes = source.start()
        if probes <= 0:
            raise SourceError(f"backend {source.name} attached no probe; "
                              "run 'imds-tracer doctor'")
        # the watch starts now: from here on the evidence file records it
        pipeline.sinks.append(EvidenceSink(config.log_dir))
        print(f"ready backend={source.name} probes={probes}", file=sys.stderr, flush=True)
        log.info("capturing requests to %s on port(s) %s with the %s backend",
                 ", ".join(config.addresses), ", ".join(map(str, config.ports)), source.name)
        sd_notify("READY=1\nSTATUS=capturing with the %s backend" % source.name)
        while not flags["stop"]:
            pipeline.take(source.poll(200))
            pipeline.tick(time.time())
            if flags["reopen"]:
                flags["reopen"] = False
                pipeline.reopen()
                log.info("log files reopened (SIGHUP)")
    finally:
        sd_notify("STOPPING=1")
        source.stop()
        pipeline.flush(time.time())
        pipeline.close()
    return EXIT_OK


def cmd_report(args) -> int:
    from . import report

    config = _config(args)
    since = report.parse_since(args.since)
    summary = report.summarise(config.log_dir, since)
    render = report.render_json if args.json else report.render_text
    return render(summary, since)


def cmd_cgroup2(args) -> int:
    from .sources import cgroup

    step = cgroup.mount_cgroup2_for_hooks if args.action == "mount" else \
        cgroup.unmount_cgroup2_for_hooks
    try:
        print(f"imds-tracer: {step()}", file=sys.stderr)
    except OSError as exc:
        raise SourceError(f"cgroup2 {args.action} at {cgroup.PRIVATE_CGROUP2} failed: "
                          f"{exc.strerror}") from None
    return EXIT_OK


def cmd_doctor(args) -> int:
    from .doctor import main as doctor_main

    return doctor_main(_config(args))


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="imds-tracer: %(levelname)s: %(message)s")
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return EXIT_ERROR
        command = {"run": cmd_run, "replay": cmd_replay, "report": cmd_report,
                   "cgroup2": cmd_cgroup2, "doctor": cmd_doctor}[args.command]
        return command(args)
    except (UsageError, ConfigError, SourceError, MetricsError, ReportError) as exc:
        print(f"imds-tracer: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EXIT_OK
    except PermissionError as exc:
        print(f"imds-tracer: error: permission denied: {exc.filename or exc} (run as root, "
              "or with CAP_BPF, CAP_PERFMON, CAP_SYS_PTRACE, CAP_DAC_READ_SEARCH; "
              "see 'imds-tracer doctor')", file=sys.stderr)
        return EXIT_ERROR
    except Exception as exc:  # noqa: BLE001 - the contract is one line, never a traceback
        if os.environ.get("IMDS_TRACER_DEBUG"):
            raise
        print(f"imds-tracer: error: {type(exc).__name__}: {exc} "
              "(IMDS_TRACER_DEBUG=1 shows where)", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
