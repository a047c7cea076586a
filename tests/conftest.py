"""Shared fixtures. The lab (network namespace + fake IMDS) lives in tests/lab/."""
import os
import shutil
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# CI's one switch: machines that can run the kernel tests must run them, lab tests included.
if os.environ.get("IMDS_TRACER_REQUIRE_KERNEL") == "1":
    os.environ.setdefault("IMDS_TRACER_REQUIRE_LAB", "1")

from tests.lab.fixtures import fake_imds, imds_lab, imds_lab_required, lab_factory  # noqa: E402,F401


@pytest.fixture(scope="session")
def installed_copy():
    """A world-readable copy of the package for code run as another uid (tests/unprivileged)."""
    from tests.unprivileged import install_copy
    root = install_copy()
    yield root
    shutil.rmtree(root, ignore_errors=True)
