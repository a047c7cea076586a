"""Finding BCC's Python module, also when it was built for another Python.

BCC's Python module is pure Python over libbcc (ctypes), so it works under any Python 3 --
but distributions install it for their platform Python only. On RHEL 8 / Alibaba Cloud
Linux 3 / Anolis 8 that is Python 3.6 (/usr/lib/python3.6/site-packages/bcc), while the
agent needs python39. When `import bcc` fails, the site-/dist-packages directories of the
other Pythons on the machine are searched for a `bcc` package, and only that package is
imported from there: the directory is on sys.path for the import alone, so nothing else of
the other Python's packages shadows this one's.
"""
from __future__ import annotations

import importlib
import logging
import sys
from pathlib import Path

from .base import SourceError

log = logging.getLogger("imds_tracer")

LIB_ROOTS = (Path("/usr/lib"), Path("/usr/lib64"), Path("/usr/local/lib"))
INSTALL_HINT = ("install python3-bpfcc (Debian, Ubuntu) or python3-bcc (RHEL, Rocky, Alma, "
                "Amazon Linux, Alibaba Cloud Linux, Anolis, SUSE)")


def _version_key(path: Path):
    digits = path.parent.name.replace("python", "").split(".")
    return tuple(int(d) if d.isdigit() else 0 for d in digits)


def other_bcc_dirs(roots=LIB_ROOTS) -> list[Path]:
    """Package directories (newest Python first) that hold a `bcc` package."""
    found = []
    for root in roots:
        for pattern in ("python3*/site-packages", "python3*/dist-packages"):
            found += [d for d in root.glob(pattern) if (d / "bcc" / "__init__.py").is_file()]
    return sorted(set(found), key=_version_key, reverse=True)


def import_bcc(roots=LIB_ROOTS):
    """The `bcc` module: this Python's, else another Python's. Raises SourceError."""
    try:
        return importlib.import_module("bcc")
    except ImportError:
        pass
    for directory in other_bcc_dirs(roots):
        sys.path.append(str(directory))
        try:
            module = importlib.import_module("bcc")
        except ImportError:
            continue
        finally:
            sys.path.remove(str(directory))
        log.info("BCC's Python module found in %s (built for another Python; used as is)",
                 directory)
        return module
    raise SourceError(f"BCC's Python module is not importable from {sys.executable}: "
                      f"{INSTALL_HINT}; see imds-tracer doctor")
