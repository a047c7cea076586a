"""Settings: built-in defaults < /etc/imds-tracer/config.toml < command-line flags.

Every key is validated when the file is read; a bad key or value raises `ConfigError` with a
one-line message that names it.
"""
from __future__ import annotations

import dataclasses
import importlib
import ipaddress
import os
from dataclasses import dataclass, field

from .classify import CLOUD_NAMES, WATCHED_ADDRESSES

DEFAULT_CONFIG_PATH = "/etc/imds-tracer/config.toml"
DEFAULT_LOG_DIR = "/var/log/imds"
# 9796 is not taken by node_exporter (9100), ebpf_exporter (9435), process-exporter (9256),
# blackbox (9115) or any other exporter in Prometheus' default port allocations list.
DEFAULT_METRICS_ADDR = "127.0.0.1:9796"
DEFAULT_ADDRESSES = WATCHED_ADDRESSES  # every provider's metadata addresses (classify.py)
BACKENDS = ("auto", "cgroup", "kprobe", "tracepoint")
CLOUDS = ("auto", "none", *CLOUD_NAMES)


class ConfigError(Exception):
    """A setting is wrong; the message is one line that names it."""


@dataclass
class Config:
    # [capture]
    backend: str = "auto"
    addresses: tuple[str, ...] = DEFAULT_ADDRESSES
    ports: tuple[int, ...] = (80,)
    max_payload: int = 4096          # bytes copied per send in the kernel
    perf_pages: int = 256            # perf/ring buffer pages per CPU
    # [log]
    log_dir: str = DEFAULT_LOG_DIR
    log_max_bytes: int = 1024 * 1024
    log_backups: int = 5
    json: str | None = None          # a file, "-" for stdout, None for off
    json_max_bytes: int = 16 * 1024 * 1024
    json_backups: int = 5
    console: bool = True             # one line per request on stderr (off with --quiet)
    # [metrics]
    metrics_addr: str | None = DEFAULT_METRICS_ADDR   # None: no HTTP endpoint
    max_exe_labels: int = 100        # offending executables with a label of their own
    # [classify]
    cloud: str = "auto"              # the cloud this VM runs on; auto reads DMI
    # [enrich]
    parents: int = 3
    # [flows]
    response_wait: float = 2.0       # seconds to wait for a response status before logging
    flow_idle: float = 300.0         # seconds after which an idle connection is forgotten
    max_flows: int = 65536
    extra: dict = field(default_factory=dict)


# config.toml layout: section -> key -> (Config attribute, validator)
def _positive_int(lo: int, hi: int):
    def check(value):
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise ValueError(f"must be an integer from {lo} to {hi}")
        return value
    return check


def _positive_float(lo: float, hi: float):
    def check(value):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
            raise ValueError(f"must be a number from {lo} to {hi}")
        return float(value)
    return check


def _choice(options):
    def check(value):
        if value not in options:
            raise ValueError(f"must be one of {', '.join(options)}")
        return value
    return check


def _bool(value):
    if not isinstance(value, bool):
        raise ValueError("must be true or false")
    return value


def _addresses(value):
    if not isinstance(value, list) or not value:
        raise ValueError("must be a non-empty list of IP addresses")
    out = []
    for item in value:
        try:
            out.append(str(ipaddress.ip_address(str(item))))
        except ValueError:
            raise ValueError(f"{item!r} is not an IP address") from None
    return tuple(out)


def _ports(value):
    if not isinstance(value, list) or not value or len(value) > 8:
        raise ValueError("must be a list of 1 to 8 TCP ports")
    return tuple(_positive_int(1, 65535)(p) for p in value)


def _path(value):
    if not isinstance(value, str) or not value:
        raise ValueError("must be a non-empty path")
    return value


def _optional_path(value):
    if not isinstance(value, str):
        raise ValueError('must be a path, "-" for stdout, or "" for off')
    return value or None


def parse_metrics_addr(value) -> str | None:
    """HOST:PORT, [IPv6]:PORT, or "" for no endpoint."""
    if not isinstance(value, str):
        raise ValueError('must be "HOST:PORT" or "" for off')
    if not value:
        return None
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{value!r} is not HOST:PORT")
    return value


SCHEMA = {
    "capture": {
        "backend": ("backend", _choice(BACKENDS)),
        "addresses": ("addresses", _addresses),
        "ports": ("ports", _ports),
        # memory-heavy: per CPU, perf_pages x 4 KiB (2048: 8 MiB) and max_payload per event
        "max_payload": ("max_payload", _positive_int(256, 16384)),
        "perf_pages": ("perf_pages", _positive_int(8, 2048)),
    },
    "log": {
        "dir": ("log_dir", _path),
        "max_bytes": ("log_max_bytes", _positive_int(4096, 1 << 40)),
        "backups": ("log_backups", _positive_int(0, 1000)),
        "json": ("json", _optional_path),
        "json_max_bytes": ("json_max_bytes", _positive_int(4096, 1 << 40)),
        "json_backups": ("json_backups", _positive_int(0, 1000)),
        "console": ("console", _bool),
    },
    "metrics": {
        "addr": ("metrics_addr", parse_metrics_addr),
        "max_exe_labels": ("max_exe_labels", _positive_int(1, 10000)),
    },
    "classify": {
        "cloud": ("cloud", _choice(CLOUDS)),
    },
    "enrich": {
        "parents": ("parents", _positive_int(0, 16)),
    },
    "flows": {
        "response_wait": ("response_wait", _positive_float(0.0, 60.0)),
        "flow_idle": ("flow_idle", _positive_float(1.0, 86400.0)),
        # each open flow may hold a request head (up to 16 KiB) while it waits
        "max_flows": ("max_flows", _positive_int(16, 262144)),
    },
}


# Python 3.11 reads TOML itself; before it, the tomli package (its origin), or the older toml
TOML_MODULES = ("tomllib", "tomli", "toml")


def toml_parser():
    """(loads, its decode error) from the first TOML module importable. Raises ConfigError."""
    for name in TOML_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        error = getattr(module, "TOMLDecodeError", None) or getattr(module, "TomlDecodeError")
        return module.loads, error
    raise ConfigError("reading the config file needs a TOML parser: install python3-tomli "
                      "(or python3-toml), or run on Python 3.11+")


def load(path: str | None, *, required: bool = False) -> Config:
    """Read a config file over the defaults. A missing default file is fine; a named one is not."""
    config = Config()
    if path is None:
        path = DEFAULT_CONFIG_PATH
        if not os.path.exists(path):
            return config
    parse, decode_error = toml_parser()
    try:
        with open(path, encoding="utf-8") as fh:
            data = parse(fh.read())
    except FileNotFoundError:
        if required:
            raise ConfigError(f"config file {path}: not found") from None
        return config
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror}") from None
    except (decode_error, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path}: not valid TOML: {exc}") from None
    apply(config, data, origin=path)
    return config


def apply(config: Config, data: dict, origin: str = "config") -> None:
    for section, values in data.items():
        keys = SCHEMA.get(section)
        if keys is None:
            raise ConfigError(f"{origin}: unknown section [{section}] "
                              f"(known: {', '.join(sorted(SCHEMA))})")
        if not isinstance(values, dict):
            raise ConfigError(f"{origin}: {section} must be a [section]")
        for key, value in values.items():
            if key not in keys:
                raise ConfigError(f"{origin}: unknown key {section}.{key} "
                                  f"(known: {', '.join(sorted(keys))})")
            attr, check = keys[key]
            try:
                setattr(config, attr, check(value))
            except ValueError as exc:
                raise ConfigError(f"{origin}: {section}.{key} {exc}") from None


def override(config: Config, **flags) -> Config:
    """Apply command-line flags that were given (None means not given)."""
    changes = {k: v for k, v in flags.items() if v is not None}
    return dataclasses.replace(config, **changes)
