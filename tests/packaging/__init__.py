"""Packaging tests: the unit's sandbox, the deb and rpm builds, logrotate, Prometheus."""
from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def build_package(kind: str, suffix: str) -> Path:
    """Run packaging/KIND/build.sh; the package file it printed last, which must exist and
    end with `suffix`."""
    run = subprocess.run(["sh", str(ROOT / "packaging" / kind / "build.sh")],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    path = Path(run.stdout.strip().splitlines()[-1])
    assert path.is_file() and path.name.endswith(suffix), path
    return path
