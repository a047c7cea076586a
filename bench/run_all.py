"""Run every benchmark, one after the other (they must not share the CPUs), and print one
JSON object per benchmark, one per line, plus a first line describing the machine.

    sudo .venv/bin/python bench/run_all.py [--quick]

The kernel benchmark needs root and BPF; elsewhere it prints {"bench": "kernel",
"skipped": ...}. Benchmarks are measurements, not tests: nothing here fails on a figure.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PYTHON = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv").exists() else sys.executable


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0
    try:
        mem = int(Path("/proc/meminfo").read_text().split()[1]) // 1024
    except (OSError, IndexError, ValueError):
        pass
    return {"bench": "machine", "kernel": platform.release(), "cpus": os.cpu_count(),
            "cpu": cpu, "mem_mib": mem, "python": platform.python_version(),
            "load_1m": os.getloadavg()[0]}


def run(script: str, args: list[str]) -> None:
    proc = subprocess.run([PYTHON, str(HERE / script), *args], capture_output=True,
                          text=True, cwd=REPO)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        print(json.dumps({"bench": script, "error": (proc.stderr.strip().splitlines() or
                                                     ["no output"])[-1]}), flush=True)
        return
    print(lines[-1], flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, one repeat")
    args = parser.parse_args(argv)
    print(json.dumps(machine()), flush=True)
    if args.quick:
        run("pipeline_bench.py", ["--events", "20000", "--repeat", "1"])
        run("replay_bench.py", ["--packets", "200000", "--repeat", "1"])
        run("kernel_bench.py", ["--quick", "--rounds", "1"])
    else:
        run("pipeline_bench.py", [])
        run("replay_bench.py", [])
        run("kernel_bench.py", [])
    return 0


if __name__ == "__main__":
    sys.exit(main())
