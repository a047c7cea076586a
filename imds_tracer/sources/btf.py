"""Struct field offsets and enum values of the *running* kernel, read from its BTF.

The kprobe backend reads kernel structs (sock_common, msghdr, iov_iter). Their layout moves
between versions (iov_iter's ubuf/__iov: +24 in 6.1, +16 in 6.18) and the headers BCC compiles
against may be another kernel's (SPEC §6); the verifier does not notice a wrong probe-read
offset. So every offset the kprobe program uses comes from here and is passed to it as a -D
constant. Plain Python over the documented BTF format (linux/btf.h): no tool needed at run
time; tests cross-check it against `bpftool btf dump`.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

VMLINUX_BTF = Path("/sys/kernel/btf/vmlinux")
BTF_MAGIC = 0xEB9F

# kinds (linux/btf.h)
INT, PTR, ARRAY, STRUCT, UNION, ENUM, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT = range(1, 12)
FUNC, FUNC_PROTO, VAR, DATASEC, FLOAT, DECL_TAG, TYPE_TAG, ENUM64 = range(12, 20)
_MODIFIERS = {TYPEDEF, VOLATILE, CONST, RESTRICT, TYPE_TAG}


class BtfError(Exception):
    """The BTF is missing, malformed, or lacks what was asked for."""


@dataclass(frozen=True)
class BtfType:
    kind: int
    name: str
    size_or_type: int
    vlen: int
    kind_flag: bool
    extra: tuple   # members (name, type_id, bit_offset) / enum values (name, value) / array


class _Types:
    """Type id -> BtfType (id 0 is void: None), decoded on first use."""

    def __init__(self, btf: "Btf"):
        self._btf = btf

    def __getitem__(self, type_id: int) -> BtfType | None:
        cache = self._btf._decoded
        if type_id not in cache:
            cache[type_id] = self._btf._decode(type_id)
        return cache[type_id]

    def __len__(self) -> int:
        return len(self._btf._records)


class Btf:
    def __init__(self, data: bytes):
        if len(data) < 24:
            raise BtfError("BTF too short")
        magic, _version, _flags, hdr_len = struct.unpack_from("<HBBI", data, 0)
        if magic != BTF_MAGIC:
            raise BtfError("not BTF (bad magic; big-endian BTF is not supported)")
        type_off, type_len, str_off, str_len = struct.unpack_from("<IIII", data, 8)
        self._strings = data[hdr_len + str_off:hdr_len + str_off + str_len]
        self._by_name: dict[tuple[int, int], list[int]] = {}   # (kind, name offset) -> ids
        self._parse(data[hdr_len + type_off:hdr_len + type_off + type_len])

    @classmethod
    def load(cls, path: str | Path = VMLINUX_BTF) -> "Btf":
        try:
            return cls(Path(path).read_bytes())
        except OSError as exc:
            raise BtfError(f"cannot read {path}: {exc.strerror} (kernel built without "
                           "CONFIG_DEBUG_INFO_BTF?)") from None

    def _str(self, off: int) -> str:
        end = self._strings.find(b"\0", off)
        return self._strings[off:end].decode("ascii", "replace")

    def _parse(self, buf: bytes) -> None:
        """One pass that only records where each type is (vlinux holds >100k of them);
        members and enum values are decoded when a query reaches that type."""
        self._buf = buf
        self._records: list = [None]   # type id -> (kind, name_off, size_or_type, vlen, flag, pos)
        self._decoded: dict = {}
        by_name = self._by_name
        record = self._records.append
        unpack = struct.unpack_from
        fixed = {INT: 4, VAR: 4, DECL_TAG: 4, ARRAY: 12}
        per_member = {STRUCT: 12, UNION: 12, ENUM: 8, ENUM64: 12, FUNC_PROTO: 8, DATASEC: 12}
        plain = {PTR, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT, FUNC, FLOAT, TYPE_TAG}
        pos = 0
        n = len(buf)
        while pos + 12 <= n:
            name_off, info, size_or_type = unpack("<III", buf, pos)
            pos += 12
            kind = (info >> 24) & 0x1F
            vlen = info & 0xFFFF
            if name_off:
                by_name.setdefault((kind, name_off), []).append(len(self._records))
            record((kind, name_off, size_or_type, vlen, bool(info >> 31), pos))
            if kind in fixed:
                pos += fixed[kind]
            elif kind in per_member:
                pos += per_member[kind] * vlen
            elif kind not in plain:
                raise BtfError(f"unknown BTF kind {kind} at type {len(self._records) - 1}")
        self.types = _Types(self)

    def _decode(self, type_id: int) -> BtfType | None:
        rec = self._records[type_id]
        if rec is None:
            return None
        kind, name_off, size_or_type, vlen, kind_flag, pos = rec
        buf = self._buf
        extra: tuple = ()
        if kind == ARRAY:
            extra = struct.unpack_from("<III", buf, pos)  # type, index_type, nelems
        elif kind in (STRUCT, UNION):
            members = []
            for i in range(vlen):
                m_name, m_type, m_off = struct.unpack_from("<III", buf, pos + 12 * i)
                bit_off = m_off & 0xFFFFFF if kind_flag else m_off
                members.append((self._str(m_name), m_type, bit_off))
            extra = tuple(members)
        elif kind == ENUM:
            extra = tuple((self._str(e_name), e_val) for e_name, e_val in
                          (struct.unpack_from("<Ii", buf, pos + 8 * i) for i in range(vlen)))
        elif kind == ENUM64:
            extra = tuple((self._str(e_name), (hi << 32) | lo) for e_name, lo, hi in
                          (struct.unpack_from("<III", buf, pos + 12 * i) for i in range(vlen)))
        return BtfType(kind, self._str(name_off), size_or_type, vlen, kind_flag, extra)

    def _ids(self, kind: int, name: str) -> list:
        wanted = b"\0" + name.encode() + b"\0"
        out: list = []
        at = self._strings.find(wanted)
        while at >= 0:
            out += self._by_name.get((kind, at + 1), [])
            at = self._strings.find(wanted, at + 1)
        return sorted(out)

    # ---- queries --------------------------------------------------------------------------
    def find(self, kind: int, name: str) -> BtfType:
        ids = self._ids(kind, name)
        if not ids:
            raise BtfError(f"type {name!r} not in this kernel's BTF")
        # a complete definition (FWD declarations are another kind anyway)
        return self.types[ids[0]]

    def resolve(self, type_id: int) -> BtfType | None:
        t = self.types[type_id]
        while t is not None and t.kind in _MODIFIERS:
            t = self.types[t.size_or_type]
        return t

    def has_member(self, struct_name: str, member: str) -> bool:
        try:
            self.member_offset(struct_name, member)
            return True
        except BtfError:
            return False

    def member_offset(self, struct_name: str, member: str) -> int:
        """Byte offset of `member` in `struct struct_name`, looking into anonymous
        structs/unions; a dotted path (`a.b`) descends into named members."""
        t = self.find(STRUCT, struct_name)
        offset_bits = 0
        for part in member.split("."):
            found = self._member_in(t, part)
            if found is None:
                raise BtfError(f"struct {struct_name} has no member {member!r} in this kernel")
            bits, t_id = found
            offset_bits += bits
            t = self.resolve(t_id)
        if offset_bits % 8:
            raise BtfError(f"{struct_name}.{member} is a bit field")
        return offset_bits // 8

    def member_size(self, struct_name: str, member: str) -> int:
        t = self.find(STRUCT, struct_name)
        for part in member.split("."):
            found = self._member_in(t, part)
            if found is None:
                raise BtfError(f"struct {struct_name} has no member {member!r} in this kernel")
            t = self.resolve(found[1])
        return self.sizeof(t)

    def sizeof(self, t: BtfType) -> int:
        if t.kind in (INT, STRUCT, UNION, ENUM, ENUM64, FLOAT):
            return t.size_or_type
        if t.kind == PTR:
            return 8
        if t.kind == ARRAY:
            elem_type, _index, nelems = t.extra
            return self.sizeof(self.resolve(elem_type)) * nelems
        raise BtfError(f"no size for BTF kind {t.kind}")

    def _member_in(self, t: BtfType, name: str):
        if t is None or t.kind not in (STRUCT, UNION):
            return None
        for m_name, m_type, bit_off in t.extra:
            if m_name == name:
                return bit_off, m_type
        for m_name, m_type, bit_off in t.extra:
            if not m_name:   # anonymous struct/union: its members are ours
                inner = self._member_in(self.resolve(m_type), name)
                if inner is not None:
                    return bit_off + inner[0], inner[1]
        return None

    def enum_values(self, enum_name: str) -> tuple:
        """((name, value), ...) of `enum enum_name`. Raises BtfError."""
        for kind in (ENUM, ENUM64):
            for tid in self._ids(kind, enum_name):
                return self.types[tid].extra
        raise BtfError(f"enum {enum_name} not in this kernel's BTF")

    def enum_value(self, enum_name: str, value_name: str) -> int:
        for name, value in self.enum_values(enum_name):
            if name == value_name:
                return value
        raise BtfError(f"enum {enum_name} has no {value_name} in this kernel")


# Every offset bpf/kprobe.c uses: -D name -> (struct, member). The iov pointer moved from
# `iov` to `__iov` in 6.4; whichever exists is used. The iterator type is `iter_type_layout`'s.
KPROBE_OFFSETS = {
    "IMDS_OFF_SKC_FAMILY": ("sock_common", "skc_family"),
    "IMDS_OFF_SKC_DADDR": ("sock_common", "skc_daddr"),
    "IMDS_OFF_SKC_DPORT": ("sock_common", "skc_dport"),
    "IMDS_OFF_SKC_V6_DADDR": ("sock_common", "skc_v6_daddr"),
    "IMDS_OFF_SK_COMMON": ("sock", "__sk_common"),
    "IMDS_OFF_MSG_ITER": ("msghdr", "msg_iter"),
    "IMDS_OFF_ITER_IOV_OFFSET": ("iov_iter", "iov_offset"),
    "IMDS_OFF_ITER_COUNT": ("iov_iter", "count"),
    "IMDS_OFF_ITER_UBUF": ("iov_iter", "ubuf"),
    "IMDS_OFF_ITER_IOV": ("iov_iter", ("__iov", "iov")),
    "IMDS_OFF_ITER_NR_SEGS": ("iov_iter", "nr_segs"),
}


def iter_type_layout(btf: Btf) -> dict[str, int]:
    """Where an iov_iter says what it iterates over, and which values mean user memory:
    -D constants for bpf/kprobe.c (the program reads IMDS_ITER_TYPE_SIZE bytes at
    IMDS_OFF_ITER_TYPE, keeps the IMDS_ITER_TYPE_MASK bits and compares them with
    IMDS_ITER_IOVEC / IMDS_ITER_UBUF, -1 where the kernel has no ITER_UBUF).

    Two layouts exist, both told apart by the BTF alone:
    - 5.14+: a byte of its own, `u8 iter_type`, holding a value of `enum iter_type`
      (0-based; ITER_UBUF since 6.0; the values were reordered in 6.5);
    - 4.20-5.13 (Debian 11's 5.10, Amazon Linux 2, Alibaba Cloud Linux 3): `unsigned int type`
      holding one `enum iter_type` bit (ITER_IOVEC = 4, ITER_KVEC = 8, ...) OR'ed with the
      direction (READ = 0 / WRITE = 1): the type is the word masked by the enum's bits.
    Raises BtfError for anything else (e.g. 4.19 and older, whose type enum has no name)."""
    try:
        values = dict(btf.enum_values("iter_type"))
    except BtfError:
        raise BtfError("this kernel's BTF has no enum iter_type (a kernel before 4.20?)") \
            from None
    if "ITER_IOVEC" not in values:
        raise BtfError("enum iter_type has no ITER_IOVEC in this kernel")
    for field in ("iter_type", "type"):
        if btf.has_member("iov_iter", field):
            break
    else:
        raise BtfError("struct iov_iter has neither iter_type nor type in this kernel")
    size = btf.member_size("iov_iter", field)
    if size not in (1, 2, 4):
        raise BtfError(f"iov_iter.{field} is {size} bytes in this kernel")
    if field == "iter_type":
        mask = (1 << 8 * size) - 1
    else:
        # the type shares its word with the direction bit: the enum must be bit flags
        flags = list(values.values())
        mask = 0
        for value in flags:
            mask |= value
        if any(v <= 0 or v & (v - 1) for v in flags) or len(set(flags)) != len(flags) \
                or mask & 1:
            raise BtfError(f"iov_iter.{field} shares its word with the direction, but enum "
                           f"iter_type is not bit flags in this kernel: {values}")
    ubuf = values.get("ITER_UBUF", -1)
    if ubuf >= 0 and not btf.has_member("iov_iter", "ubuf"):
        raise BtfError("enum iter_type has ITER_UBUF but iov_iter has no ubuf in this kernel")
    return {"IMDS_OFF_ITER_TYPE": btf.member_offset("iov_iter", field),
            "IMDS_ITER_TYPE_SIZE": size, "IMDS_ITER_TYPE_MASK": mask,
            "IMDS_ITER_IOVEC": values["ITER_IOVEC"], "IMDS_ITER_UBUF": ubuf}


def kprobe_constants(btf: Btf) -> dict[str, int]:
    """-D constants for bpf/kprobe.c from this kernel's BTF. Raises BtfError naming what is
    missing."""
    out: dict[str, int] = {}
    for define, (struct_name, member) in KPROBE_OFFSETS.items():
        names = member if isinstance(member, tuple) else (member,)
        for name in names:
            if btf.has_member(struct_name, name):
                out[define] = btf.member_offset(struct_name, name)
                break
        else:
            if define == "IMDS_OFF_ITER_UBUF":
                out[define] = -1      # kernels before 6.0 have no ITER_UBUF
                continue
            raise BtfError(f"struct {struct_name} has no member {'/'.join(names)} in this kernel")
    out.update(iter_type_layout(btf))
    return out


# What bpf/cgroup.c reads to take argv from a new image at sched_process_exec.
EXEC_ARGV_OFFSETS = {
    "IMDS_TASK_MM_OFF": ("task_struct", "mm"),
    "IMDS_MM_ARG_START_OFF": ("mm_struct", "arg_start"),
    "IMDS_MM_ARG_END_OFF": ("mm_struct", "arg_end"),
}


def exec_argv_constants(btf: Btf) -> dict[str, int]:
    """-D constants for the exec-time argv program of bpf/cgroup.c. Raises BtfError."""
    out = {define: btf.member_offset(struct_name, member)
           for define, (struct_name, member) in EXEC_ARGV_OFFSETS.items()}
    for struct_name, member in EXEC_ARGV_OFFSETS.values():
        if btf.member_size(struct_name, member) != 8:
            raise BtfError(f"{struct_name}.{member} is not 8 bytes in this kernel")
    return out
