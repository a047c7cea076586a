"""`imds-tracer`: run | replay | report | doctor. Errors are one line and a non-zero exit."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from . import __version__
from .config import BACKENDS, CLOUDS, Config, ConfigError, load, override, parse_metrics_addr
from .sources.base import SourceError

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


def cmd_replay(args) -> int:
    from .agent import Agent

    # the trace log (and --json) are the output: no per-request console lines, and no size
    # rotation, which would move records of the capture out of the file the user named
    config = override(_config(args), log_max_bytes=NO_ROTATION, json_max_bytes=NO_ROTATION)
    agent = Agent(config, backend="replay",
                  metrics_addr=config.metrics_addr if args.metrics_addr else None)
    errors = agent.replay(args.files, progress=args.progress)
    print(f"imds-tracer: replayed {agent.replayed_packets} packets from {len(args.files)} "
          f"file(s): {agent.pipeline.requests} request(s) to metadata addresses",
          file=sys.stderr)
    if args.linger and agent.metrics_port:
        host = config.metrics_addr.rpartition(":")[0]
        print(f"imds-tracer: serving metrics on {host}:{agent.metrics_port}; Ctrl-C to stop",
              file=sys.stderr, flush=True)
        agent.linger()
    agent.close()
    return EXIT_ERROR if errors else EXIT_OK


def cmd_run(args) -> int:
    from .agent import Agent
    from .sources.caps import can_load_bpf
    from .sources.select import open_source

    if not can_load_bpf():
        raise SourceError("imds-tracer run needs root, or CAP_BPF and CAP_PERFMON "
                          "(this process has neither); see 'imds-tracer doctor'")
    config = _config(args)
    agent = Agent(config, backend=config.backend, console=config.console,
                  metrics_addr=config.metrics_addr,
                  open_source=lambda: open_source(config, config.backend), enrich=True)
    return agent.run()


def cmd_report(args) -> int:
    from . import report

    config = _config(args)
    render = report.render_json if args.json else report.render_text
    try:
        since = report.parse_since(args.since)
        return render(report.summarise(config.log_dir, since), since)
    except report.ReportError as exc:
        raise UsageError(str(exc)) from None


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
    except (UsageError, ConfigError, SourceError) as exc:   # MetricsError is a ConfigError
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
