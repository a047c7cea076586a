"""packaging/config.toml, installed as /etc/imds-tracer/config.toml, documents every key with
its true default: as shipped (all commented) and with every key uncommented it loads to the
built-in defaults, and no key is missing or undocumented."""
from __future__ import annotations

import re
from pathlib import Path

from imds_tracer import config

SHIPPED = Path(__file__).resolve().parents[2] / "packaging" / "config.toml"
KEY_LINE = re.compile(r"^#(\w+) = ")


def _uncommented(text: str) -> str:
    return "\n".join(line[1:] if KEY_LINE.match(line) else line for line in text.splitlines())


def test_shipped_file_loads_to_defaults():
    assert config.load(str(SHIPPED), required=True) == config.Config()


def test_every_key_uncommented_equals_defaults(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text(_uncommented(SHIPPED.read_text()))
    assert config.load(str(path), required=True) == config.Config()


def test_every_schema_key_is_present_and_documented():
    lines = SHIPPED.read_text().splitlines()
    section, seen = None, {}
    for i, line in enumerate(lines):
        if m := re.match(r"^\[(\w+)\]$", line):
            section = m.group(1)
        elif m := KEY_LINE.match(line):
            seen[(section, m.group(1))] = i
    expected = {(s, k) for s, keys in config.SCHEMA.items() for k in keys}
    assert set(seen) == expected
    for i in seen.values():  # one line of doc right above each key
        assert lines[i - 1].startswith("# ") and len(lines[i - 1]) > 8, lines[i]
