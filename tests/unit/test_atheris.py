"""Bounded coverage-guided fuzzing runs (tests/fuzz/atheris_targets.py) of the HTTP parser
with reassembly, the packet decoder and the pcap reader. IMDS_FUZZ_SCALE multiplies the
number of inputs (a soak run)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parents[1]
HARNESS = HERE / "fuzz" / "atheris_targets.py"
SCALE = int(os.environ.get("IMDS_FUZZ_SCALE", "1"))

try:
    import atheris  # noqa: F401
except ImportError:  # pragma: no cover - installed by `make test` ([test] extra) on x86_64
    atheris = None


@pytest.mark.skipif(atheris is None, reason="atheris not installed (pip install atheris; "
                                            "x86_64 Linux wheels)")
@pytest.mark.parametrize("target,runs,seeds", [("http", 30000, False),
                                               ("packets", 30000, False),
                                               ("pcap", 3000, True)])
def test_fuzz_target_finds_nothing(target, runs, seeds, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    if seeds:   # start from the real captures
        for pcap in (HERE / "data").glob("*.pcap*"):
            shutil.copy(pcap, corpus)
    run = subprocess.run([sys.executable, str(HARNESS), target, f"-runs={runs * SCALE}",
                          "-seed=1", "-max_len=4096", str(corpus)],
                         capture_output=True, text=True, timeout=600, cwd=HERE.parent)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-3000:]
    assert re.search(rf"Done {runs * SCALE} runs", out), out[-2000:]
