"""Cost per kernel: in each kernel-lab guest (tests/matrix), the unrelated-send overhead of
the backend `--backend auto` picks there, as a ratio inside one guest run (TCG makes absolute
times meaningless): bench/kernel_bench.py --only overhead --bracket (runs without the agent,
with it, without again; one agent start, 14-21 s under TCG).

Prints one JSON line per cell; each guest's files stay in $IMDS_TRACER_LAB_CACHE/runs/bench-<cell>/.

    sudo .venv/bin/python bench/matrix_bench.py [--rounds 7] [CELL...]     # make bench-matrix
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.lab import vm  # noqa: E402
from tests.matrix.test_guests import CELLS, GUEST_SLOW  # noqa: E402

COMMAND = """
export PYTHONPATH=/lab/src PYTHONDONTWRITEBYTECODE=1 IMDS_TRACER_SLOW={slow}
{python} bench/kernel_bench.py --only overhead --backend auto --bracket --rounds {rounds} --quick
"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("cells", nargs="*", default=[n for n, c in CELLS.items() if c.cgroup == "v2"])
    args = parser.parse_args(argv)
    for name in args.cells:
        cell = CELLS[name]
        run_dir = vm.CACHE / "runs" / f"bench-{name}"
        shutil.rmtree(run_dir, ignore_errors=True)
        run = vm.boot(cell.suite, COMMAND.format(slow=GUEST_SLOW, python=cell.python,
                                                 rounds=args.rounds), run_dir, cgroup=cell.cgroup,
                      mounts=cell.mounts())
        lines = [ln for ln in run.output.splitlines() if ln.startswith("{")]
        result = json.loads(lines[-1]) if run.status == 0 and lines else \
            {"error": f"status {run.status}", "output": run.output[-2000:], "console": run.tail(20)}
        print(json.dumps({"cell": name, "guest_seconds": round(run.seconds), **result}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
