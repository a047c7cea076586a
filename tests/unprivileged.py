"""Running the agent as another user, wherever the checkout lives.

The checkout (and its .venv) may sit under a directory only root may enter (`/root`,
`mktemp -d`): a test that runs code as another uid must not read it from there. It gets an
installed copy instead: the package copied (bpf/ included, symlink resolved) into a fresh
world-readable directory and run by the OS interpreter the venv was made from, which is how a
package install looks to a user who forgot `sudo`.
"""
from __future__ import annotations

import os
import shutil
import stat
import sys
import tempfile
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "imds_tracer"
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def base_python() -> str:
    """The interpreter the venv was made from (`/usr/bin/python3` here): a venv inside a
    private checkout cannot be executed by another user."""
    return os.path.realpath(getattr(sys, "_base_executable", sys.executable))


def _world_readable(path: Path) -> None:
    if not path.stat().st_mode & stat.S_IROTH:
        raise RuntimeError(f"{path} is not readable by other users")
    for parent in path.parents:
        if not parent.stat().st_mode & stat.S_IXOTH:
            raise RuntimeError(f"{parent} is not searchable by other users")


def install_copy() -> Path:
    """A world-readable copy of the package; the directory to put on PYTHONPATH.
    The caller removes it (`shutil.rmtree`)."""
    root = Path(tempfile.mkdtemp(prefix="imds-tracer-copy-", dir="/tmp"))
    try:
        root.chmod(0o755)
        shutil.copytree(PACKAGE, root / "imds_tracer", symlinks=False,
                        ignore=shutil.ignore_patterns("__pycache__"))
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames:
                os.chmod(os.path.join(dirpath, name), 0o755)
            for name in filenames:
                os.chmod(os.path.join(dirpath, name), 0o644)
        _world_readable(root / "imds_tracer" / "__init__.py")
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    return root


def as_nobody(args: list[str], copy: Path) -> tuple[list[str], dict]:
    """argv and environment that run `python -m imds_tracer ARGS` as uid 65534 from `copy`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHON"))}
    env["PYTHONPATH"] = str(copy)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return NOBODY + [base_python(), "-m", "imds_tracer", *args], env
