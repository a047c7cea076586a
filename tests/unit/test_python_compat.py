"""What lets the agent run on the Pythons its users have (3.9 and up): BCC's Python module
found in another Python's site-packages (python39 on EL8, whose BCC is Python 3.6's), and a
TOML parser from whichever of tomllib / tomli / toml is installed."""
from __future__ import annotations

import sys
import textwrap

import pytest

from imds_tracer import config as config_mod
from imds_tracer.sources import bcc_module
from imds_tracer.sources.base import SourceError


@pytest.fixture
def no_bcc_here(monkeypatch):
    """This interpreter without the bcc it may have: sys.path without it, bcc unloaded."""
    saved = {name: mod for name, mod in sys.modules.items()
             if name == "bcc" or name.startswith("bcc.")}
    for name in saved:
        del sys.modules[name]
    monkeypatch.setattr(sys, "path", [p for p in sys.path
                                      if not (bcc_module.Path(p or ".") / "bcc").exists()])
    try:
        yield
    finally:
        for name in [n for n in sys.modules if n == "bcc" or n.startswith("bcc.")]:
            del sys.modules[name]
        sys.modules.update(saved)


def make_bcc(lib, python: str, kind: str, version: str):
    package = lib / python / kind / "bcc"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(textwrap.dedent(f"""\
        from .table import TABLE_MARK
        __version__ = {version!r}
        """))
    (package / "table.py").write_text("TABLE_MARK = 'loaded from the package directory'\n")
    return package.parent


def test_bcc_of_another_python_is_found_and_only_it_is_imported(tmp_path, no_bcc_here):
    usr_lib = tmp_path / "usr" / "lib"
    make_bcc(usr_lib, "python3.6", "site-packages", "0.19.0-el8")
    (usr_lib / "python3.6" / "site-packages" / "six_of_36.py").write_text("X = 1\n")
    (usr_lib / "python3.11" / "site-packages").mkdir(parents=True)   # no bcc in this one
    assert bcc_module.other_bcc_dirs([usr_lib, tmp_path / "missing"]) == [
        usr_lib / "python3.6" / "site-packages"]
    path_before = list(sys.path)
    bcc = bcc_module.import_bcc([usr_lib])
    assert bcc.__version__ == "0.19.0-el8"
    assert bcc.TABLE_MARK == "loaded from the package directory"
    assert sys.path == path_before          # the other Python's directory is not left behind
    with pytest.raises(ImportError):
        __import__("six_of_36")


def test_newest_python_wins_and_dist_packages_count(tmp_path, no_bcc_here):
    usr_lib = tmp_path / "usr" / "lib"
    make_bcc(usr_lib, "python3.6", "site-packages", "old")
    make_bcc(usr_lib, "python3", "dist-packages", "debian")
    make_bcc(usr_lib, "python3.12", "site-packages", "new")
    dirs = bcc_module.other_bcc_dirs([usr_lib])
    assert dirs[0] == usr_lib / "python3.12" / "site-packages"
    assert set(dirs) == {usr_lib / p for p in ("python3.6/site-packages",
                                               "python3/dist-packages",
                                               "python3.12/site-packages")}
    assert bcc_module.import_bcc([usr_lib]).__version__ == "new"


def test_no_bcc_anywhere_is_one_line_naming_the_packages(tmp_path, no_bcc_here):
    (tmp_path / "usr" / "lib" / "python3.9" / "site-packages").mkdir(parents=True)
    with pytest.raises(SourceError) as err:
        bcc_module.import_bcc([tmp_path / "usr" / "lib"])
    message = str(err.value)
    assert "\n" not in message
    assert "python3-bpfcc" in message and "python3-bcc" in message


CONFIG = b'[capture]\nmax_payload = 512\n'


@pytest.mark.parametrize("hidden", [(), ("tomllib",), ("tomllib", "tomli")])
def test_config_is_read_with_whichever_toml_parser_is_installed(tmp_path, monkeypatch, hidden):
    for name in hidden:
        monkeypatch.setitem(sys.modules, name, None)     # import of it fails
    available = [n for n in config_mod.TOML_MODULES if n not in hidden]
    try:
        __import__(available[0])
    except ImportError:
        pytest.skip(f"{available[0]} is not installed for this Python")
    path = tmp_path / "config.toml"
    path.write_bytes(CONFIG)
    assert config_mod.load(str(path)).max_payload == 512
    path.write_bytes(b"[capture\n")
    with pytest.raises(config_mod.ConfigError, match="not valid TOML"):
        config_mod.load(str(path))


def test_no_toml_parser_is_one_line_naming_the_package(tmp_path, monkeypatch):
    for name in config_mod.TOML_MODULES:
        monkeypatch.setitem(sys.modules, name, None)
    path = tmp_path / "config.toml"
    path.write_bytes(CONFIG)
    with pytest.raises(config_mod.ConfigError) as err:
        config_mod.load(str(path))
    assert "python3-tomli" in str(err.value) and "\n" not in str(err.value)
