"""The offsets the kprobe backend compiles in, read by our BTF parser, must be what an
independent reader (bpftool's raw BTF dump) says for this kernel, so the kprobe backend cannot
silently rot when struct layouts move."""
from __future__ import annotations

import platform
import re
import shutil
import subprocess

import pytest

from imds_tracer.sources import btf as btfmod
from tests.kernel.conftest import skip_or_fail

_TYPE = re.compile(r"^\[(\d+)\] (\w+) '([^']*)'(.*)$")
_MEMBER = re.compile(r"^\s+'([^']*)' type_id=(\d+) bits_offset=(\d+)")
_ENUMVAL = re.compile(r"^\s+'([^']*)' val=(-?\d+)")


@pytest.fixture(scope="module")
def bpftool_types():
    tool = shutil.which("bpftool") or shutil.which("bpftool", path="/usr/sbin:/sbin")
    if not tool:
        skip_or_fail("bpftool not installed (apt-get install bpftool)")
    if not btfmod.VMLINUX_BTF.exists():
        skip_or_fail("no /sys/kernel/btf/vmlinux")
    out = subprocess.run([tool, "btf", "dump", "file", str(btfmod.VMLINUX_BTF), "format", "raw"],
                         check=True, capture_output=True, text=True).stdout
    types = {}
    current = None
    for line in out.splitlines():
        m = _TYPE.match(line)
        if m:
            tid, kind, name, rest = int(m.group(1)), m.group(2), m.group(3), m.group(4)
            ref = re.search(r"type_id=(\d+)", rest)
            current = {"kind": kind, "name": name, "members": [], "values": {},
                       "ref": int(ref.group(1)) if ref else None}
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


def bpftool_offset(types, struct_name, member):
    def resolve(tid):
        while types[tid]["kind"] in ("TYPEDEF", "CONST", "VOLATILE", "RESTRICT", "TYPE_TAG"):
            tid = types[tid]["ref"]
        return tid

    def search(tid, name):
        for m_name, m_type, bits in types[tid]["members"]:
            if m_name == name:
                return bits
        for m_name, m_type, bits in types[tid]["members"]:
            if m_name == "(anon)":
                inner = search(resolve(m_type), name)
                if inner is not None:
                    return bits + inner
        return None

    for tid, t in types.items():
        if t["kind"] == "STRUCT" and t["name"] == struct_name:
            bits = search(tid, member)
            if bits is not None:
                return bits // 8
    return None


def test_every_kprobe_offset_matches_bpftool(bpftool_types):
    ours = btfmod.kprobe_constants(btfmod.Btf.load())
    for define, (struct_name, member) in btfmod.KPROBE_OFFSETS.items():
        names = member if isinstance(member, tuple) else (member,)
        theirs = next((o for o in (bpftool_offset(bpftool_types, struct_name, n) for n in names)
                       if o is not None), -1)
        assert ours[define] == theirs, f"{define}: {struct_name}.{names} ours={ours[define]} bpftool={theirs}"


def test_iter_type_values_match_bpftool(bpftool_types):
    ours = btfmod.kprobe_constants(btfmod.Btf.load())
    enum = next(t for t in bpftool_types.values() if t["kind"] == "ENUM" and t["name"] == "iter_type")
    assert ours["IMDS_ITER_IOVEC"] == enum["values"]["ITER_IOVEC"]
    assert ours["IMDS_ITER_UBUF"] == enum["values"].get("ITER_UBUF", -1)


def test_known_layout_of_this_kernel_family():
    """SPEC §6's measured facts: on 6.18 iov_iter's ubuf/__iov sit at +16 (they were at +24 in
    the 6.1 headers BCC compiles against)."""
    release = tuple(int(x) for x in re.match(r"(\d+)\.(\d+)", platform.release()).groups())
    if release < (6, 4):
        pytest.skip("layout facts recorded for 6.4+")
    ours = btfmod.kprobe_constants(btfmod.Btf.load())
    assert ours["IMDS_OFF_ITER_UBUF"] == ours["IMDS_OFF_ITER_IOV"] == 16
    assert ours["IMDS_OFF_ITER_TYPE"] == 0
    assert ours["IMDS_OFF_SKC_DADDR"] == 0 and ours["IMDS_OFF_SKC_DPORT"] == 12
