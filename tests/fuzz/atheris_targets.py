"""Coverage-guided fuzzing (atheris / libFuzzer) of what reads untrusted bytes: the HTTP parser
with reassembly, the IP/TCP decoder the cgroup backend and replay share, and the pcap reader.
Each target runs the whole pipeline down to the trace-log line and checks what a user would
notice: no exception escapes, every line is one printable line of bounded length.

    python tests/fuzz/atheris_targets.py TARGET -runs=20000 [-seed=1] [CORPUS_DIR...]

TARGET is http, packets or pcap. tests/unit/test_atheris.py runs each for a bounded number
of inputs; without -runs it runs until stopped (a soak run). Exits non-zero on a finding,
printing the input that caused it.
"""
from __future__ import annotations

import sys
from pathlib import Path

import atheris

with atheris.instrument_imports():
    from imds_tracer.agent import Agent  # noqa: F401 - instrumented for pcap
    from imds_tracer.config import Config
    from imds_tracer.model import Chunk, Direction
    from imds_tracer.pipeline import Pipeline
    from imds_tracer.sources.base import Batch
    from imds_tracer.sources.packets import TcpDemux
    from imds_tracer.sources.pcapfile import records  # noqa: F401 - instrumented for pcap
    from imds_tracer.sources.replay import PcapReplay  # noqa: F401 - instrumented for pcap

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))   # the repository: tests.*
from tests.unit.test_fuzz import PRINTABLE, _Lines, _replay_bytes  # noqa: E402

CONFIG = Config()


def new_pipeline() -> tuple[Pipeline, _Lines]:
    sink = _Lines()   # formats each record as the trace log does
    return Pipeline(CONFIG, [sink]), sink


def check(sink: _Lines) -> None:
    for line in sink.lines:
        if not PRINTABLE.fullmatch(line) or len(line) >= 40_000:
            raise AssertionError(f"bad trace-log line: {line[:200]!r}")


def fuzz_http(data: bytes) -> None:
    """Bytes cut into sends and receives of two connections, in the order the input says."""
    fdp = atheris.FuzzedDataProvider(data)
    pipeline, sink = new_pipeline()
    ts = 0.0
    while fdp.remaining_bytes():
        flow = fdp.ConsumeIntInRange(0, 1)
        direction = Direction.RESPONSE if fdp.ConsumeBool() else Direction.REQUEST
        chunk = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 600))
        lost = fdp.ConsumeIntInRange(0, 3) * fdp.ConsumeIntInRange(0, 5000)
        ts += fdp.ConsumeIntInRange(0, 3)
        pipeline.take([Chunk(flow, direction, chunk, ts, "169.254.169.254", 80, "fuzz",
                             lost=lost)])
        pipeline.tick(ts)
    pipeline.flush()
    check(sink)


def fuzz_packets(data: bytes) -> None:
    """Raw IP packets, as the cgroup backend's kernel program hands them over."""
    fdp = atheris.FuzzedDataProvider(data)
    pipeline, sink = new_pipeline()
    demux = TcpDemux(CONFIG.addresses, CONFIG.ports, "cgroup", max_conns=8)
    ts = 0.0
    while fdp.remaining_bytes():
        packet = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 200))
        if fdp.ConsumeBool() and len(packet) >= 20:   # steer towards watched addresses
            packet = packet[:12] + bytes([10, 0, 0, 5, 169, 254, 169, 254]) + packet[20:]
        scope = fdp.ConsumeIntInRange(0, 2)
        ts += 0.5
        version = packet[0] >> 4 if packet else 0
        if version in (4, 6):
            batch = Batch()
            demux.ip_packet(packet, 0, version, ts, batch, scope=scope)
            pipeline.take(batch)
        pipeline.tick(ts)
    pipeline.flush()
    check(sink)


def fuzz_pcap(data: bytes) -> None:
    """A capture file: read, or refused with a one-line error (the hypothesis test's checks)."""
    _replay_bytes(data)


TARGETS = {"http": fuzz_http, "packets": fuzz_packets, "pcap": fuzz_pcap}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(TARGETS)}}} [libFuzzer options]")
    target = TARGETS[sys.argv.pop(1)]
    atheris.Setup(sys.argv, target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
