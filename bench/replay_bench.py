"""Replay: start-up on a one-request capture and throughput on a large one, this checkout
side by side with another revision (default `main`) and with `tshark -Y http.request`.

- small: a capture of one connection carrying one request (bench/workload.py). What counts
  is start-up: interpreter, imports, outputs opened, the file read. Both revisions run it
  --small-repeat times, interleaved (the machine is shared: compare within one run, by the
  ratio); median and best wall-clock seconds, CPU seconds (user + system: less moved by
  other load than the wall clock), and the imports' share from
  `python -X importtime` (the sum of the top-level imports).
- large: default 1,000,000 packets, about 1% metadata traffic: whole TCP conversations of
  the workload mix spread evenly among unrelated HTTPS, HTTP and DNS packets. Each tool runs
  as its own process, wall clock from start to exit (start-up included), interleaved, best
  of --repeat.

The captures and the other revision (`git archive REV`) go to /tmp, never into the
repository, and are removed afterwards unless --keep. Both revisions run with this
interpreter, from a directory outside either tree. Prints one JSON object.

    .venv/bin/python bench/replay_bench.py [--packets 1000000] [--repeat 3] [--compare main]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

from bench import workload  # noqa: E402


def export(rev: str, into: str) -> str:
    """The package as of `rev`, in a directory of its own. Raises SystemExit."""
    tree = os.path.join(into, "rev")
    os.makedirs(tree)
    archive = subprocess.run(["git", "-C", REPO, "archive", rev, "imds_tracer", "bpf"],
                             capture_output=True)
    if archive.returncode != 0:
        raise SystemExit(f"git archive {rev}: {archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", tree], input=archive.stdout, check=True)
    return tree


def run_replay(tree: str, pcap: str, log_dir: str, *, importtime: bool = False) -> dict:
    """`python -m imds_tracer replay` of the package in `tree`, timed from start to exit."""
    env = dict(os.environ, PYTHONPATH=tree)
    cmd = [sys.executable] + (["-X", "importtime"] if importtime else []) + \
        ["-m", "imds_tracer", "replay", pcap, "--log-dir", log_dir, "--no-progress"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=os.path.dirname(log_dir),
                          env=env)
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    if proc.returncode != 0:
        raise SystemExit(f"imds-tracer replay ({tree}) failed: {proc.stderr.strip()[-300:]}")
    with open(os.path.join(log_dir, "imds-trace.log"), encoding="utf-8") as fh:
        lines = [line for line in fh if "agent dropped" not in line]
    shutil.rmtree(log_dir, ignore_errors=True)
    result = {"seconds": round(elapsed, 4), "cpu_seconds": round(cpu, 4), "logged": len(lines),
              "warnings": sum(1 for line in lines if "[WARNING]" in line)}
    if importtime:
        result["import_seconds"] = round(top_level_imports(proc.stderr), 4)
    return result


def top_level_imports(stderr: str) -> float:
    """Seconds spent importing, from -X importtime: the cumulative time of the top-level
    imports (those not nested in another)."""
    total = 0
    for line in stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            _self, cumulative, name = line[len("import time:"):].split("|", 2)
            if cumulative.strip().isdigit() and not name.startswith("  "):
                total += int(cumulative)
    return total / 1e6


def time_tshark(pcap: str) -> dict:
    start = time.perf_counter()
    proc = subprocess.run(["tshark", "-r", pcap, "-Y", "http.request"],
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"tshark failed with status {proc.returncode}")
    return {"seconds": round(elapsed, 3), "http_requests": proc.stdout.count(b"\n")}


def small_capture(trees: dict, tmp: str, repeat: int) -> dict:
    pcap = os.path.join(tmp, "one-request.pcap")
    facts = workload.write_one_request_pcap(pcap)
    runs = {name: [] for name in trees}
    imports = {name: [] for name in trees}
    for i in range(repeat):
        for name, tree in trees.items():
            runs[name].append(run_replay(tree, pcap, os.path.join(tmp, f"s-{name}{i}")))
    for i in range(3):   # -X importtime slows a run down: measured apart
        for name, tree in trees.items():
            imports[name].append(run_replay(tree, pcap, os.path.join(tmp, f"i-{name}{i}"),
                                            importtime=True)["import_seconds"])
    out = {"pcap": facts}
    for name, results in runs.items():
        seconds = [r["seconds"] for r in results]
        cpu = [r["cpu_seconds"] for r in results]
        out[name] = {"median_seconds": round(statistics.median(seconds), 4),
                     "best_seconds": min(seconds), "all_seconds": seconds,
                     "cpu_seconds_median": round(statistics.median(cpu), 4),
                     "import_seconds_median": round(statistics.median(imports[name]), 4),
                     "logged": results[0]["logged"]}
    if len(trees) == 2:
        ours, theirs = (out[name]["median_seconds"] for name in trees)
        out["ratio"] = round(theirs / ours, 2)
    return out


def large_capture(trees: dict, tmp: str, packets: int, repeat: int) -> dict:
    pcap = os.path.join(tmp, "bench.pcap")
    start = time.perf_counter()
    facts = workload.write_pcap(pcap, packets)
    write_s = time.perf_counter() - start
    runs = {name: [] for name in trees}
    tshark = []
    for i in range(repeat):
        for name, tree in trees.items():
            runs[name].append(run_replay(tree, pcap, os.path.join(tmp, f"l-{name}{i}")))
        if shutil.which("tshark"):
            tshark.append(time_tshark(pcap))
    out = {"pcap": {**facts, "bytes": os.path.getsize(pcap),
                    "write_seconds": round(write_s, 2)}}
    for name, results in runs.items():
        best = min(results, key=lambda r: r["seconds"])
        out[name] = {**best, "packets_per_s": round(facts["packets"] / best["seconds"]),
                     "all_seconds": [r["seconds"] for r in results],
                     "all_requests_logged": best["logged"] == facts["requests"]}
    ours = out["imds_tracer"]["seconds"]
    if tshark:
        best = min(tshark, key=lambda r: r["seconds"])
        out["tshark"] = {**best, "packets_per_s": round(facts["packets"] / best["seconds"]),
                         "all_seconds": [r["seconds"] for r in tshark],
                         "filter": "http.request"}
        out["ratio_to_tshark"] = round(best["seconds"] / ours, 2)
    else:
        out["tshark"] = {"error": "tshark is not installed"}
    for name in trees:
        if name != "imds_tracer":
            out[f"ratio_to_{name}"] = round(out[name]["seconds"] / ours, 2)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--packets", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3, help="large capture: best of")
    parser.add_argument("--small-repeat", type=int, default=15,
                        help="one-request capture: median of")
    parser.add_argument("--compare", default="main", metavar="REV",
                        help='the revision to run side by side ("" for none)')
    parser.add_argument("--keep", action="store_true", help="keep the generated files")
    args = parser.parse_args(argv)
    tmp = tempfile.mkdtemp(prefix="imds-replay-bench-", dir="/tmp")
    try:
        trees = {"imds_tracer": REPO}
        if args.compare:
            trees[args.compare] = export(args.compare, tmp)
        print(json.dumps({
            "bench": "replay",
            "revisions": {"imds_tracer": "this checkout",
                          **({args.compare: args.compare} if args.compare else {})},
            "small": small_capture(trees, tmp, args.small_repeat),
            "large": large_capture(trees, tmp, args.packets, args.repeat),
            "target_small_seconds": 0.15,
            "note": "wall clock per process, start-up included; ratio > 1: this checkout "
                    "is faster than the other on the same file in the same run",
            "python": sys.version.split()[0],
        }))
    finally:
        if args.keep:
            print(f"files kept: {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
