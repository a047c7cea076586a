"""The event layout in imds_tracer/sources/events.py must match bpf/event.h: the ctypes mirror of
struct imds_event, and every IMDS_EV_ / IMDS_F_ / IMDS_CNT_ constant.

Two independent readings of the header: a C compiler (offsetof/sizeof, when gcc or cc is
installed) and a small parser of the header's fixed-width fields (always). Needs no BCC.
"""
import ctypes
import re
import shutil
import subprocess

import pytest

from imds_tracer.sources import events as kernel

HEADER = kernel.BPF_DIR / "event.h"
C_SIZES = {"__u8": 1, "char": 1, "__u16": 2, "__u32": 4, "__u64": 8}


def parsed_fields():
    text = HEADER.read_text()
    body = re.search(r"struct imds_event \{(.*?)\};", text, re.S).group(1)
    body = re.sub(r"/\*.*?\*/", "", body, flags=re.S)
    out = []
    for decl in body.split(";"):
        decl = decl.strip()
        if not decl:
            continue
        m = re.fullmatch(r"(\w+)\s+(\w+)(?:\[(\d+)\])?", decl)
        assert m, f"unexpected declaration in event.h: {decl!r}"
        ctype, name, count = m.group(1), m.group(2), int(m.group(3) or 1)
        out.append((name, C_SIZES[ctype], count))
    return out


def test_mirror_matches_parsed_header():
    offset = 0
    mirror = {name: getattr(kernel.EventHeader, name) for name, *_ in kernel.EventHeader._fields_}
    assert [f[0] for f in parsed_fields()] == list(mirror)
    for name, size, count in parsed_fields():
        offset = (offset + size - 1) // size * size
        assert mirror[name].offset == offset, name
        assert mirror[name].size == size * count, name
        offset += size * count
    assert ctypes.sizeof(kernel.EventHeader) == (offset + 7) // 8 * 8


def test_header_has_fixed_width_fields_and_payload_last():
    names = [f[0] for f in parsed_fields()]
    assert "payload_len" in names and "lost_bytes" in names
    assert ctypes.sizeof(kernel.EventHeader) % 8 == 0   # the payload starts 8-aligned


@pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc")), reason="no C compiler")
def test_mirror_matches_c_compiler(tmp_path):
    names = [name for name, *_ in kernel.EventHeader._fields_]
    src = tmp_path / "layout.c"
    prints = "".join(
        f'printf("{n} %zu %zu\\n", offsetof(struct imds_event, {n}), '
        f"sizeof(((struct imds_event *)0)->{n}));" for n in names)
    src.write_text(
        "#include <stdio.h>\n#include <stddef.h>\n#include <linux/types.h>\n"
        f'#include "{HEADER}"\n'
        f'int main(void) {{ {prints} printf("SIZE %zu 0\\n", sizeof(struct imds_event)); return 0; }}\n')
    exe = tmp_path / "layout"
    cc = shutil.which("cc") or shutil.which("gcc")
    subprocess.run([cc, "-o", str(exe), str(src)], check=True)
    got = {}
    for line in subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.splitlines():
        name, off, size = line.split()
        got[name] = (int(off), int(size))
    for name in names:
        field = getattr(kernel.EventHeader, name)
        assert got[name] == (field.offset, field.size), name
    assert got["SIZE"][0] == ctypes.sizeof(kernel.EventHeader) == kernel.HEADER_SIZE


def test_constants_match_header():
    """Every IMDS_EV_*, IMDS_F_*, IMDS_CNT_* of the header has its twin in events.py (EV_*,
    F_*, CNT_*) with the same value, and events.py has no constant the header lacks."""
    text = HEADER.read_text()
    defines = {name: int(value, 0) for name, value in
               re.findall(r"#define IMDS_((?:EV|F|CNT)_\w+) (0x[0-9a-f]+|\d+)", text)}
    assert {"EV_PACKET", "F_OWNER_GUESSED", "CNT_STALE_FD", "CNT_SLOTS"} <= set(defines)
    ours = {name: getattr(kernel, name) for name in dir(kernel)
            if re.fullmatch(r"(EV|F|CNT)_\w+", name)}
    assert ours == defines
    common = (kernel.BPF_DIR / "common.h").read_text()
    limit = int(re.search(r"#define IMDS_ARGV_LIMIT (\d+)", common).group(1))
    arg = int(re.search(r"#define IMDS_ARG_BYTES (\d+)", common).group(1))
    assert kernel.ARGV_BUF == limit + arg


def test_no_other_module_defines_event_constants():
    """One place: no other module of the package assigns an EV_/F_/CNT_ name."""
    sources = kernel.BPF_DIR.parent / "sources"
    for path in sources.glob("*.py"):
        if path.name == "events.py":
            continue
        assert not re.search(r"^(EV|F|CNT)_\w+\s*[,=]", path.read_text(), re.M), path.name


def test_address_helpers():
    assert kernel.format_addr(kernel.addr_key_bytes("169.254.169.254")) == "169.254.169.254"
    assert kernel.format_addr(kernel.addr_key_bytes("fd00:ec2::254")) == "fd00:ec2::254"
    assert kernel.split_argv(b"curl\0-s\0http://x/\0") == ("curl", "-s", "http://x/")
    assert kernel.split_argv(b"") == ()


def test_only_the_loader_uses_bcc():
    """BCC (and with it libLLVM / libclang) is the loader's alone: no other module of the
    package imports it or calls the finder (doctor reports BCC's version: a short-lived
    command, not the running agent)."""
    package = kernel.BPF_DIR.parent
    users = sorted(str(p.relative_to(package)) for p in package.rglob("*.py")
                   if re.search(r"^\s*(from bcc|import bcc)|import_bcc\(", p.read_text(), re.M))
    assert users == ["doctor.py", "sources/bcc_module.py", "sources/loader.py"]
