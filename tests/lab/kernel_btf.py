"""The BTF of the lab's Debian kernels (tests/lab/vm.py's cache), read from the packages
without booting them: what a guest would show at /sys/kernel/btf/vmlinux.

The kernel image (bzImage) carries vmlinux compressed (xz on Debian 11/12, zstd on 13); the
first compressed stream that unpacks to an ELF file is it, and its `.BTF` section is the
vmlinux BTF. Kept beside the kernel in the cache as `vmlinux.btf`, extracted again when the
cached kernel changes.
"""
from __future__ import annotations

import lzma
import os
import shutil
import struct
import subprocess
import zlib
from pathlib import Path
from typing import Optional

from tests.lab import vm

# Debian suite -> the lab's cell name for it
SUITES = {"bullseye": "debian11-5.10", "bookworm": "debian12-6.1", "trixie": "debian13-6.12"}


def _decompress(kind: str, data: bytes) -> bytes:
    if kind == "xz":
        return lzma.LZMADecompressor().decompress(data)
    if kind == "gzip":
        return zlib.decompressobj(31).decompress(data)
    if not shutil.which("zstd"):
        raise RuntimeError("zstd not installed (apt-get install zstd)")
    return subprocess.run(["zstd", "-dcq"], input=data, capture_output=True).stdout


def vmlinux_of(vmlinuz: bytes) -> bytes:
    """The ELF vmlinux inside a compressed kernel image. Raises RuntimeError."""
    for magic, kind in ((b"\xfd7zXZ\x00", "xz"), (b"\x28\xb5\x2f\xfd", "zstd"),
                        (b"\x1f\x8b\x08", "gzip")):
        pos = vmlinuz.find(magic)
        while pos >= 0:
            try:
                out = _decompress(kind, vmlinuz[pos:])
            except (lzma.LZMAError, zlib.error, EOFError):
                out = b""
            if out[:4] == b"\x7fELF":
                return out
            pos = vmlinuz.find(magic, pos + 1)
    raise RuntimeError("no compressed ELF vmlinux found in the kernel image")


def elf_section(elf: bytes, wanted: str) -> bytes:
    """A section of a little-endian ELF64 file, by name. Raises RuntimeError."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        raise RuntimeError("not a little-endian ELF64 file")
    shoff, = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)

    def header(i):   # (name offset, file offset, size)
        base = shoff + i * shentsize
        name, = struct.unpack_from("<I", elf, base)
        offset, size = struct.unpack_from("<QQ", elf, base + 0x18)
        return name, offset, size

    _, str_off, str_size = header(shstrndx)
    names = elf[str_off:str_off + str_size]
    for i in range(shnum):
        name, offset, size = header(i)
        if names[name:names.index(b"\0", name)].decode() == wanted:
            return elf[offset:offset + size]
    raise RuntimeError(f"no {wanted} section")


def cached_btf(suite: str, fetch: bool = False) -> Optional[Path]:
    """`suite`'s kernel BTF as a file, or None when its kernel is not in the lab cache (with
    `fetch`, vm.setup_kernel downloads it first). Raises RuntimeError."""
    kernel = vm.setup_kernel(suite) if fetch else vm.cached_kernel(suite)
    if kernel is None:
        return None
    dest = vm.kernel_dir(suite) / "vmlinux.btf"
    stamp = dest.with_suffix(".release")
    if dest.exists() and stamp.exists() and stamp.read_text() == kernel.release:
        return dest
    btf = elf_section(vmlinux_of(kernel.vmlinuz.read_bytes()), ".BTF")
    tmp = dest.with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(btf)
    tmp.rename(dest)
    stamp.write_text(kernel.release)
    return dest
