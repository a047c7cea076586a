"""The offsets the kprobe backend compiles in, read by our BTF parser, must be what an
independent reader (bpftool's raw BTF dump) says -- for this kernel and for the Debian kernels
of the lab (5.10, 6.1, 6.12: their BTF taken from the cached packages, tests/lab/kernel_btf.py)
-- so the kprobe backend cannot silently rot when struct layouts move."""
from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from imds_tracer.sources import btf as btfmod
from tests.kernel.conftest import skip_or_fail
from tests.lab import kernel_btf

_TYPE = re.compile(r"^\[(\d+)\] (\w+) '([^']*)'(.*)$")
_MEMBER = re.compile(r"^\s+'([^']*)' type_id=(\d+) bits_offset=(\d+)")
_ENUMVAL = re.compile(r"^\s+'([^']*)' val=(-?\d+)")
REQUIRE_LAB = os.environ.get("IMDS_TRACER_REQUIRE_LAB") == "1"
# BTF source -> the iterator layout measured for it (None: whatever the running kernel has)
KERNELS = {
    "running": None,
    # unsigned int type: an enum bit OR'ed with the direction; no ITER_UBUF
    "bullseye": {"IMDS_ITER_TYPE_SIZE": 4, "IMDS_ITER_TYPE_MASK": 0x7C, "IMDS_ITER_IOVEC": 4,
                 "IMDS_ITER_UBUF": -1, "IMDS_OFF_ITER_UBUF": -1, "IMDS_OFF_ITER_IOV": 24},
    # u8 iter_type, ITER_UBUF (6.0) last, ubuf/iov at +24
    "bookworm": {"IMDS_ITER_TYPE_SIZE": 1, "IMDS_ITER_TYPE_MASK": 0xFF, "IMDS_ITER_IOVEC": 0,
                 "IMDS_ITER_UBUF": 6, "IMDS_OFF_ITER_UBUF": 24, "IMDS_OFF_ITER_IOV": 24},
    # ITER_UBUF first since 6.5, ubuf/__iov at +16
    "trixie": {"IMDS_ITER_TYPE_SIZE": 1, "IMDS_ITER_TYPE_MASK": 0xFF, "IMDS_ITER_IOVEC": 1,
               "IMDS_ITER_UBUF": 0, "IMDS_OFF_ITER_UBUF": 16, "IMDS_OFF_ITER_IOV": 16},
}


def btf_path(source: str) -> Path:
    if source == "running":
        if not btfmod.VMLINUX_BTF.exists():
            skip_or_fail("no /sys/kernel/btf/vmlinux")
        return btfmod.VMLINUX_BTF
    path = kernel_btf.cached_btf(source, fetch=REQUIRE_LAB)
    if path is None:
        message = (f"{source}'s kernel is not in the lab cache (python -m tests.lab.vm setup "
                   f"{source})")
        if REQUIRE_LAB:
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return path


@pytest.fixture(scope="module", params=list(KERNELS), ids=lambda s: kernel_btf.SUITES.get(s, s))
def source(request):
    return request.param


@pytest.fixture(scope="module")
def ours(source):
    return btfmod.kprobe_constants(btfmod.Btf.load(btf_path(source)))


@pytest.fixture(scope="module")
def bpftool_types(source):
    tool = shutil.which("bpftool") or shutil.which("bpftool", path="/usr/sbin:/sbin")
    if not tool:
        skip_or_fail("bpftool not installed (apt-get install bpftool)")
    out = subprocess.run([tool, "btf", "dump", "file", str(btf_path(source)), "format", "raw"],
                         check=True, capture_output=True, text=True).stdout
    types = {}
    current = None
    for line in out.splitlines():
        m = _TYPE.match(line)
        if m:
            tid, kind, name, rest = int(m.group(1)), m.group(2), m.group(3), m.group(4)
            ref = re.search(r"type_id=(\d+)", rest)
            size = re.search(r"size=(\d+)", rest)
            current = {"kind": kind, "name": name, "members": [], "values": {},
                       "ref": int(ref.group(1)) if ref else None,
                       "size": int(size.group(1)) if size else None}
            types[tid] = current
            continue
        m = _MEMBER.match(line)
        if m and current is not None:
            current["members"].append((m.group(1), int(m.group(2)), int(m.group(3))))
            continue
        m = _ENUMVAL.match(line)
        if m and current is not None:
            current["values"][m.group(1)] = int(m.group(2))
    return types


def _resolve(types, tid):
    while types[tid]["kind"] in ("TYPEDEF", "CONST", "VOLATILE", "RESTRICT", "TYPE_TAG"):
        tid = types[tid]["ref"]
    return tid


def bpftool_offset(types, struct_name, member):
    def search(tid, name):
        for m_name, m_type, bits in types[tid]["members"]:
            if m_name == name:
                return bits
        for m_name, m_type, bits in types[tid]["members"]:
            if m_name == "(anon)":
                inner = search(_resolve(types, m_type), name)
                if inner is not None:
                    return bits + inner
        return None

    for tid, t in types.items():
        if t["kind"] == "STRUCT" and t["name"] == struct_name:
            bits = search(tid, member)
            if bits is not None:
                return bits // 8
    return None


def test_every_kprobe_offset_matches_bpftool(bpftool_types, ours):
    for define, (struct_name, member) in btfmod.KPROBE_OFFSETS.items():
        names = member if isinstance(member, tuple) else (member,)
        theirs = next((o for o in (bpftool_offset(bpftool_types, struct_name, n) for n in names)
                       if o is not None), -1)
        assert ours[define] == theirs, f"{define}: {struct_name}.{names} ours={ours[define]} bpftool={theirs}"


def test_iter_type_layout_matches_bpftool(bpftool_types, ours):
    """Which field holds the iterator type (5.14+: u8 iter_type; before: the unsigned int
    type word), its size, and the enum iter_type values, as bpftool reads them."""
    iov_iter = next(t for t in bpftool_types.values()
                    if t["kind"] == "STRUCT" and t["name"] == "iov_iter")
    field = next((m for m in iov_iter["members"] if m[0] == "iter_type"), None) or \
        next(m for m in iov_iter["members"] if m[0] == "type")
    assert ours["IMDS_OFF_ITER_TYPE"] == field[2] // 8
    assert ours["IMDS_ITER_TYPE_SIZE"] == bpftool_types[_resolve(bpftool_types, field[1])]["size"]
    enum = next(t for t in bpftool_types.values() if t["kind"] == "ENUM" and t["name"] == "iter_type")
    assert ours["IMDS_ITER_IOVEC"] == enum["values"]["ITER_IOVEC"]
    assert ours["IMDS_ITER_UBUF"] == enum["values"].get("ITER_UBUF", -1)
    if field[0] == "type":   # the direction bit (READ 0 / WRITE 1) is outside the mask
        assert ours["IMDS_ITER_TYPE_MASK"] & 1 == 0
        assert all(v & ours["IMDS_ITER_TYPE_MASK"] == v for v in enum["values"].values())


def test_known_layout_of_each_kernel(source, ours):
    """The layouts measured from Debian's packages (bullseye 5.10, bookworm 6.1, trixie 6.12)
    and SPEC §6's fact for this machine (6.4+: ubuf/__iov at +16, where the 6.1 headers BCC
    compiles against say +24)."""
    want = KERNELS[source]
    if want is None:
        release = tuple(int(x) for x in re.match(r"(\d+)\.(\d+)", platform.release()).groups())
        if release < (6, 5):
            pytest.skip("layout facts recorded for the running kernel only for 6.5+")
        want = KERNELS["trixie"]
    assert {k: ours[k] for k in want} == want
    assert ours["IMDS_OFF_ITER_TYPE"] == 0
    assert ours["IMDS_OFF_SKC_DADDR"] == 0 and ours["IMDS_OFF_SKC_DPORT"] == 12
