"""Replay throughput: `imds-tracer replay` against `tshark -r FILE -Y http.request`, same pcap.

The capture (default 1,000,000 packets, about 1% metadata traffic: whole TCP conversations
of the workload mix in bench/workload.py, spread evenly among unrelated HTTPS, HTTP and DNS
packets) is generated into /tmp, never into the repository, and removed afterwards unless
--keep. Both tools run as separate processes, timed wall-clock from start to exit (start-up
included), interleaved, best of --repeat. Prints one JSON object.

    .venv/bin/python bench/replay_bench.py [--packets 1000000] [--repeat 3]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

from bench import workload  # noqa: E402


def imds_tracer_cmd() -> list[str]:
    venv = os.path.join(REPO, ".venv", "bin", "imds-tracer")
    if os.path.exists(venv):
        return [venv]
    return [sys.executable, "-m", "imds_tracer"]


def time_replay(pcap: str, tmp: str, run: int) -> dict:
    log_dir = os.path.join(tmp, f"log{run}")
    start = time.perf_counter()
    proc = subprocess.run(imds_tracer_cmd() + ["replay", pcap, "--log-dir", log_dir,
                                               "--no-progress"],
                          capture_output=True, text=True, cwd=REPO)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"imds-tracer replay failed: {proc.stderr.strip()}")
    with open(os.path.join(log_dir, "imds-trace.log"), encoding="utf-8") as fh:
        lines = [line for line in fh if "agent dropped" not in line]
    shutil.rmtree(log_dir, ignore_errors=True)
    return {"seconds": round(elapsed, 3), "logged": len(lines),
            "warnings": sum(1 for line in lines if "[WARNING]" in line)}


def time_tshark(pcap: str) -> dict:
    start = time.perf_counter()
    proc = subprocess.run(["tshark", "-r", pcap, "-Y", "http.request"],
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"tshark failed with status {proc.returncode}")
    return {"seconds": round(elapsed, 3), "http_requests": proc.stdout.count(b"\n")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--packets", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--keep", action="store_true", help="keep the generated pcap")
    args = parser.parse_args(argv)
    if not shutil.which("tshark"):
        print(json.dumps({"bench": "replay", "error": "tshark is not installed"}))
        return 1
    tmp = tempfile.mkdtemp(prefix="imds-replay-bench-", dir="/tmp")
    pcap = os.path.join(tmp, "bench.pcap")
    try:
        start = time.perf_counter()
        facts = workload.write_pcap(pcap, args.packets)
        write_s = time.perf_counter() - start
        ours, theirs = [], []
        for run in range(args.repeat):
            ours.append(time_replay(pcap, tmp, run))
            theirs.append(time_tshark(pcap))
        best_ours = min(ours, key=lambda r: r["seconds"])
        best_theirs = min(theirs, key=lambda r: r["seconds"])
        packets = facts["packets"]
        print(json.dumps({
            "bench": "replay",
            "pcap": {**facts, "bytes": os.path.getsize(pcap), "write_seconds": round(write_s, 2)},
            "imds_tracer": {**best_ours, "packets_per_s": round(packets / best_ours["seconds"]),
                            "all_seconds": [r["seconds"] for r in ours],
                            "all_requests_logged": best_ours["logged"] == facts["requests"]},
            "tshark": {**best_theirs,
                       "packets_per_s": round(packets / best_theirs["seconds"]),
                       "all_seconds": [r["seconds"] for r in theirs],
                       "filter": "http.request"},
            "ratio": round(best_theirs["seconds"] / best_ours["seconds"], 2),
            "note": "ratio > 1: imds-tracer replay is faster than tshark on the same file; "
                    "wall clock per process, start-up included",
        }))
    finally:
        if args.keep:
            print(f"pcap kept: {pcap}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
