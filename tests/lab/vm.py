"""The kernel lab: Debian kernels booted under qemu, a Debian root shared read-only over 9p,
and a command (usually pytest) run inside; its exit status and output come back to the host.

Two halves:

- `setup(suite)` fills a cache outside the clone (``$IMDS_TRACER_LAB_CACHE``, default
  /var/cache/imds-tracer-lab); safe to run again, and quick once cached:

  * ``kernel/<suite>/``  that suite's newest generic ``linux-image-*-amd64`` and its headers
    (``-amd64``, ``-common``, ``linux-kbuild-*``), unpacked with ``dpkg-deb -x`` -- never
    installed on the host. The packages come through a private apt configuration
    (``apt/<suite>/``); the host's own apt sources are not touched.
  * ``kernel/<suite>/initrd.img``  busybox-static, the kernel's virtio/9p/overlay modules
    (decompressed) and `INIT`.
  * ``root/<suite>/``  a debootstrap root (Python, BCC, the test dependencies) for the suites
    that are not this machine's own; the host's root (/) stands for its own suite.

- `boot(...)` runs ``qemu-system-x86_64`` (KVM when a probe shows it works, else TCG) with the
  root as the lower layer of an overlay (tmpfs upper: the guest can write /tmp, /run, ...), the
  checkout read-only at /lab/src (a copy made at boot), the kernel tree read-only at /lab/kernel (its modules and
  headers linked into place for BCC) and a writable results directory at /lab/run. The guest
  runs ``/lab/run/command.sh`` and writes its exit status to ``/lab/run/status``; `boot` returns
  a `GuestRun` with the status, the command's output and the serial console.

Command line: ``python -m tests.lab.vm setup [SUITE...]`` fills the cache;
``python -m tests.lab.vm shell SUITE [--cgroup v1] -- CMD`` boots a guest and runs CMD.
"""
from __future__ import annotations

import argparse
import gzip
import lzma
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

CACHE = Path(os.environ.get("IMDS_TRACER_LAB_CACHE", "/var/cache/imds-tracer-lab"))
MIRROR = "http://deb.debian.org/debian"
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
REPO_ROOT = Path(__file__).resolve().parents[2]

# Debian suite -> what is in its root beside minbase (the agent's runtime and test dependencies).
ROOT_PACKAGES = {
    "bullseye": "python3 python3-bpfcc python3-psutil python3-scapy python3-prometheus-client "
                "python3-pytest python3-hypothesis python3-botocore python3-toml "
                "iproute2 curl wget procps kmod tcpdump tshark bpftool",
    "trixie": "python3 python3-bpfcc python3-psutil python3-scapy python3-prometheus-client "
              "python3-pytest python3-hypothesis python3-botocore "
              "iproute2 curl wget procps kmod tcpdump bpftool",
}
# Modules the initramfs loads (with what they depend on), where they are not built in.
INITRD_MODULES = ["virtio_pci", "9pnet_virtio", "9p", "overlay"]
BUSYBOX = "/bin/busybox"


def host_suite() -> str:
    """This machine's Debian suite (its root stands for that suite's guest)."""
    text = Path("/etc/os-release").read_text()
    match = re.search(r"^VERSION_CODENAME=(\w+)", text, re.M)
    return match.group(1) if match else ""


def log(msg: str) -> None:
    print(f"lab: {msg}", file=sys.stderr, flush=True)


def _run(argv: Sequence[str], **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(argv), capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): "
                           f"{(proc.stderr or proc.stdout).strip()[-2000:]}")
    return proc


# ---------------------------------------------------------------- private apt per suite
class SuiteApt:
    """apt-get / apt-cache against one Debian suite, with its own lists and status file."""

    def __init__(self, suite: str):
        self.suite = suite
        self.dir = CACHE / "apt" / suite
        self.opts = [
            "-o", f"Dir::Etc::SourceList={self.dir / 'sources.list'}",
            "-o", "Dir::Etc::SourceParts=/nonexistent",
            "-o", f"Dir::State={self.dir / 'state'}",
            "-o", f"Dir::State::status={self.dir / 'status'}",
            "-o", f"Dir::Cache={self.dir / 'cache'}",
            "-o", "APT::Architecture=amd64",
            "-o", "APT::Sandbox::User=root",
            "-o", "Debug::NoLocking=1",
        ]

    def update(self) -> None:
        for sub in ("state/lists/partial", "cache/archives/partial"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        (self.dir / "status").touch()
        (self.dir / "sources.list").write_text(
            f"deb [signed-by={KEYRING}] {MIRROR} {self.suite} main\n")
        stamp = self.dir / "updated"
        if not stamp.exists() or time.time() - stamp.stat().st_mtime > 86400:
            _run(["apt-get", *self.opts, "-qq", "update"])
            stamp.touch()

    def depends(self, package: str) -> list[str]:
        out = _run(["apt-cache", *self.opts, "depends", package]).stdout
        return re.findall(r"^\s+\|?Depends: (\S+)$", out, re.M)

    def download(self, packages: Sequence[str], dest: Path) -> list[Path]:
        dest.mkdir(parents=True, exist_ok=True)
        _run(["apt-get", *self.opts, "-qq", "download", *packages], cwd=dest)
        got = []
        for name in packages:
            found = sorted(dest.glob(f"{name}_*.deb"))
            if not found:
                raise RuntimeError(f"apt-get download {name}: no .deb in {dest}")
            got.append(found[-1])
        return got


# ---------------------------------------------------------------- kernels
@dataclass
class Kernel:
    suite: str
    release: str          # uname -r, e.g. 6.1.0-28-amd64
    tree: Path            # the unpacked packages
    vmlinuz: Path
    initrd: Path


def kernel_dir(suite: str) -> Path:
    return CACHE / "kernel" / suite


def modules_dir(tree: Path, release: str) -> Path:
    for sub in ("lib/modules", "usr/lib/modules"):
        if (tree / sub / release).is_dir():
            return tree / sub / release
    raise RuntimeError(f"no modules for {release} under {tree}")


def cached_kernel(suite: str) -> Optional[Kernel]:
    d = kernel_dir(suite)
    done = d / "release"
    if not done.exists() or not (d / "initrd.img").exists():
        return None
    release = done.read_text().strip()
    return Kernel(suite, release, d / "tree", d / "tree" / "boot" / f"vmlinuz-{release}",
                  d / "initrd.img")


def setup_kernel(suite: str) -> Kernel:
    """The newest generic amd64 kernel of `suite` with its headers, unpacked into the cache."""
    have = cached_kernel(suite)
    if have:
        return have
    apt = SuiteApt(suite)
    apt.update()
    image = next(p for p in apt.depends("linux-image-amd64")
                 if re.fullmatch(r"linux-image-[\d.]+.*-amd64(-unsigned)?", p))
    release = re.sub(r"^linux-image-|-unsigned$", "", image)
    headers = f"linux-headers-{release}"
    extra = [p for p in apt.depends(headers) if re.match(r"linux-(headers|kbuild)-", p)]
    log(f"{suite}: kernel {release}: downloading {image} {headers} {' '.join(extra)}")
    debs = apt.download([image, headers, *extra], CACHE / "debs" / suite)
    d = kernel_dir(suite)
    tmp = d / "tree.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for deb in debs:
        _run(["dpkg-deb", "-x", str(deb), str(tmp)])
        deb.unlink()
    shutil.rmtree(d / "tree", ignore_errors=True)
    tmp.rename(d / "tree")
    vmlinuz = d / "tree" / "boot" / f"vmlinuz-{release}"
    if not vmlinuz.exists():
        raise RuntimeError(f"{image} has no {vmlinuz.name}")
    build_initrd(d / "tree", release, d / "initrd.img")
    (d / "release").write_text(release + "\n")
    return cached_kernel(suite)


def _module_order(mods: Path, wanted: Sequence[str]) -> list[Path]:
    """The wanted modules and what they depend on (their .modinfo ``depends=``), dependencies
    first; built-in modules (no .ko) are left out."""
    files = {re.sub(r"\.ko(\.\w+)?$", "", p.name).replace("-", "_"): p
             for p in mods.rglob("*.ko*")}
    order: list[Path] = []

    def visit(name: str) -> None:
        path = files.get(name.replace("-", "_"))
        if path is None or path in order:
            return
        found = re.search(rb"(?:^|\0)depends=([^\0]*)\0", _module_bytes(path))
        for dep in (found.group(1).decode().split(",") if found else []):
            if dep:
                visit(dep)
        order.append(path)

    for name in wanted:
        visit(name)
    return order


def _module_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    if path.suffix == ".xz":
        return lzma.decompress(data)
    if path.suffix == ".zst":
        return subprocess.run(["zstd", "-dcq", str(path)], capture_output=True,
                              check=True).stdout
    if path.suffix == ".gz":
        return gzip.decompress(data)
    return data


def _cpio_newc(entries: Sequence[tuple]) -> bytes:
    """A newc cpio archive of (name, mode, data-or-link-target) entries."""
    out = bytearray()
    ino = 1

    def add(name: str, mode: int, data: bytes) -> None:
        nonlocal ino
        namebytes = name.encode() + b"\0"
        hdr = "070701" + "".join(f"{v:08x}" for v in (
            ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(namebytes), 0))
        out.extend(hdr.encode() + namebytes)
        out.extend(b"\0" * (-len(out) % 4))
        out.extend(data)
        out.extend(b"\0" * (-len(out) % 4))
        ino += 1

    for name, mode, data in entries:
        add(name, mode, data)
    add("TRAILER!!!", 0, b"")
    return bytes(out)


def build_initrd(tree: Path, release: str, dest: Path) -> None:
    mods = modules_dir(tree, release)
    order = _module_order(mods, INITRD_MODULES)
    entries = [("bin", stat.S_IFDIR | 0o755, b""), ("modules", stat.S_IFDIR | 0o755, b""),
               ("bin/busybox", stat.S_IFREG | 0o755, Path(BUSYBOX).read_bytes()),
               ("bin/sh", stat.S_IFLNK | 0o777, b"busybox"),
               ("init", stat.S_IFREG | 0o755, INIT.encode())]
    names = []
    for i, path in enumerate(order):
        name = "%02d-%s" % (i, re.sub(r"\.ko\.\w+$", ".ko", path.name))
        entries.append((f"modules/{name}", stat.S_IFREG | 0o644, _module_bytes(path)))
        names.append(name)
    entries.append(("modules/order", stat.S_IFREG | 0o644, ("\n".join(names) + "\n").encode()))
    dest.write_bytes(gzip.compress(_cpio_newc(entries), 6))


# ---------------------------------------------------------------- roots
def root_dir(suite: str) -> Path:
    return Path("/") if suite == host_suite() else CACHE / "root" / suite


def setup_root(suite: str) -> Path:
    """A debootstrap root of `suite` with ROOT_PACKAGES (the host's / for its own suite)."""
    root = root_dir(suite)
    if root == Path("/"):
        return root
    done = root / ".lab-complete"
    if done.exists():
        missing = sorted(set(ROOT_PACKAGES[suite].split()) - set(done.read_text().split()))
        if missing:     # the list grew since the root was made: add to it, not again from scratch
            log(f"{suite}: adding {' '.join(missing)} to {root}")
            for argv in (["apt-get", "-qq", "update"],
                         ["apt-get", "-qq", "install", "-y", "--no-install-recommends", *missing],
                         ["apt-get", "clean"]):
                _run(["chroot", str(root), *argv],
                     env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DEBIAN_FRONTEND": "noninteractive"})
            done.write_text(ROOT_PACKAGES[suite] + "\n")
        return root
    tmp = root.with_name(suite + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    include = ",".join(ROOT_PACKAGES[suite].split())
    log(f"{suite}: debootstrap (minbase + {include})")
    started = time.monotonic()
    proc = subprocess.run(["debootstrap", "--variant=minbase", f"--include={include}",
                           f"--keyring={KEYRING}", suite, str(tmp), MIRROR],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-3000:]
        raise RuntimeError(f"debootstrap {suite} failed ({proc.returncode}): {tail}")
    shutil.rmtree(tmp / "var" / "cache" / "apt" / "archives", ignore_errors=True)
    log(f"{suite}: debootstrap took {time.monotonic() - started:.0f}s")
    (tmp / ".lab-complete").write_text(ROOT_PACKAGES[suite] + "\n")   # what it holds
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)
    return root


def setup(suite: str) -> tuple[Kernel, Path]:
    return setup_kernel(suite), setup_root(suite)


# ---------------------------------------------------------------- booting
# The initramfs's /init (busybox sh): modules, the overlay root, the shares, then the new root.
INIT = r"""#!/bin/sh
export PATH=/bin
busybox mkdir -p /proc /sys /dev /lower /upper /newroot
busybox mount -t proc proc /proc
busybox mount -t sysfs sysfs /sys
busybox mount -t devtmpfs dev /dev
for m in $(busybox cat /modules/order); do busybox insmod /modules/$m || echo "lab-init: insmod $m failed"; done
o=trans=virtio,version=9p2000.L,msize=262144
busybox mount -t 9p -o $o,ro,cache=loose root /lower || { echo "lab-init: 9p root"; busybox sh; }
busybox mount -t tmpfs -o mode=755 upper /upper
busybox mkdir -p /upper/u /upper/w
busybox mount -t overlay -o lowerdir=/lower,upperdir=/upper/u,workdir=/upper/w overlay /newroot \
    || { echo "lab-init: overlay failed"; busybox sh; }
for s in run src kernel; do busybox mkdir -p /newroot/lab/$s; done
busybox mount -t 9p -o $o run /newroot/lab/run
busybox mount -t 9p -o $o,ro,cache=loose src /newroot/lab/src
busybox mount -t 9p -o $o,ro,cache=loose kernel /newroot/lab/kernel
for d in proc sys dev; do busybox mount --move /$d /newroot/$d; done
exec busybox switch_root /newroot /bin/sh /lab/run/stage2.sh
"""

# Runs as PID 1 in the new root: the kernel file systems, the kernel's modules and headers
# where BCC looks for them, then the host's command; the status goes to /lab/run/status.
STAGE2 = r"""set -u
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8
for d in /tmp /run /var/tmp /var/log /root; do mount -t tmpfs -o mode=1777 tmpfs $d; done
chmod 755 /run /root
mkdir -p /dev/pts /dev/shm && mount -t devpts devpts /dev/pts && mount -t tmpfs tmpfs /dev/shm
mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null || mount -t debugfs debugfs /sys/kernel/debug
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
mount -t bpf bpf /sys/fs/bpf
if [ "$LAB_CGROUP" = v1 ]; then
    mount -t tmpfs -o mode=755 cgroup /sys/fs/cgroup
    for c in cpu,cpuacct memory pids net_cls,net_prio devices freezer blkio; do
        mkdir -p /sys/fs/cgroup/$c && mount -t cgroup -o $c cgroup /sys/fs/cgroup/$c
    done
else
    mount -t cgroup2 cgroup2 /sys/fs/cgroup
fi
# more host directories at their own paths (after the tmpfs above: a checkout's venv in /tmp)
for m in $LAB_MOUNTS; do
    mkdir -p "${m#*=}" && mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144,ro,cache=loose \
        "${m%%=*}" "${m#*=}" || echo "lab-guest: mounting ${m#*=} failed"
done
rel=$(uname -r)
k=/lab/kernel
for m in $k/lib/modules/$rel $k/usr/lib/modules/$rel; do
    [ -d $m ] && mkdir -p /lib/modules && rm -rf /lib/modules/$rel && ln -s $m /lib/modules/$rel
done
for d in $k/usr/src/linux-* $k/usr/lib/linux-kbuild-*; do
    [ -e "$d" ] && t=${d#$k} && mkdir -p "$(dirname $t)" && rm -rf "$t" && ln -s "$d" "$t"
done
ip link set lo up
hostname lab-guest
cd /lab/src
echo "lab-guest: running command ($(uname -r), $(. /etc/os-release; echo $PRETTY_NAME))"
sh /lab/run/command.sh > /lab/run/output.log 2>&1
echo $? > /lab/run/status.tmp && mv /lab/run/status.tmp /lab/run/status
tail -n 30 /lab/run/output.log
sync
echo "lab-guest: done, status $(cat /lab/run/status)"
echo o > /proc/sysrq-trigger
sleep 30
"""


_ACCEL: list = []


def accel_args(kernel: Kernel) -> list[str]:
    """KVM when it boots a kernel here, else TCG (IMDS_TRACER_LAB_ACCEL=kvm|tcg decides).
    The probe boots `kernel` without a root: it panics and qemu exits within seconds under
    KVM; nested KVM that aborts (or hangs) means TCG."""
    kvm = ["-accel", "kvm", "-cpu", "host"]
    tcg = ["-accel", "tcg,thread=multi", "-cpu", "max"]
    choice = os.environ.get("IMDS_TRACER_LAB_ACCEL", "")
    if choice:
        return kvm if choice == "kvm" else tcg
    if not _ACCEL:
        works = False
        if os.access("/dev/kvm", os.R_OK | os.W_OK):
            try:
                proc = subprocess.run(
                    ["qemu-system-x86_64", *kvm, "-m", "256", "-nographic", "-nodefaults",
                     "-no-reboot", "-serial", "stdio", "-kernel", str(kernel.vmlinuz),
                     "-append", "console=ttyS0 panic=-1 root=/dev/nonexistent"],
                    capture_output=True, text=True, timeout=30)
                works = proc.returncode == 0 and "Kernel panic" in proc.stdout
            except subprocess.TimeoutExpired:
                works = False
        _ACCEL.append(kvm if works else tcg)
        log("qemu accelerator: " + _ACCEL[0][1])
    return _ACCEL[0]


@dataclass
class GuestRun:
    status: Optional[int]      # the command's exit status; None when the guest never wrote it
    output: str                # the command's stdout + stderr
    console: str               # the serial console
    seconds: float
    run_dir: Path

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.console.splitlines()[-lines:])


def boot(suite: str, command: str, run_dir: Path, *, cgroup: str = "v2",
         memory_mib: int = 3072, cpus: int = 2, timeout: float = 1800,
         env: Optional[dict] = None, mounts: Sequence[Path] = ()) -> GuestRun:
    """Boot `suite`'s kernel with its root, run the shell `command` in /lab/src, power off.
    `mounts`: host directories shown read-only at the same path in the guest (a checkout's
    venv may live where the guest has a tmpfs, /tmp)."""
    kernel, root = setup(suite)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in ("status", "output.log", "console.log"):
        (run_dir / name).unlink(missing_ok=True)
    # the guest reads a copy of the checkout as it is now, not a tree that may change under it
    src = run_dir / "src"
    shutil.rmtree(src, ignore_errors=True)
    shutil.copytree(REPO_ROOT, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "__pycache__", ".pytest_cache", ".hypothesis", "dist", "build",
        "*.egg-info"))
    exports = "".join(f"export {k}='{v}'\n" for k, v in (env or {}).items())
    (run_dir / "command.sh").write_text(exports + command + "\n")
    extra = {f"m{i}": Path(path) for i, path in enumerate(mounts)}
    (run_dir / "stage2.sh").write_text(
        f"LAB_CGROUP={cgroup}\nLAB_MOUNTS='{' '.join(f'{t}={p}' for t, p in extra.items())}'\n"
        + STAGE2)
    accel = accel_args(kernel)

    def share(tag: str, path: Path, readonly: bool = True) -> list[str]:
        opts = f"local,path={path},mount_tag={tag},security_model=none,multidevs=remap"
        return ["-virtfs", opts + (",readonly=on" if readonly else "")]

    argv = ["qemu-system-x86_64", *accel, "-m", str(memory_mib), "-smp", str(cpus),
            "-nographic", "-nodefaults", "-no-reboot", "-nic", "none",
            "-serial", f"file:{run_dir / 'console.log'}", "-monitor", "none",
            "-kernel", str(kernel.vmlinuz), "-initrd", str(kernel.initrd),
            "-append", "console=ttyS0 panic=-1 quiet loglevel=4 rdinit=/init",
            *share("root", root), *share("src", src), *share("kernel", kernel.tree),
            *share("run", run_dir, readonly=False),
            *(arg for tag, path in extra.items() for arg in share(tag, path))]
    started = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        qemu_out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        qemu_out, _ = proc.communicate()
        qemu_out += f"\nlab: guest killed after {timeout:.0f}s"
    seconds = time.monotonic() - started
    status_file = run_dir / "status"
    status = int(status_file.read_text().strip()) if status_file.exists() else None
    output = (run_dir / "output.log").read_text(errors="replace") \
        if (run_dir / "output.log").exists() else ""
    console = (run_dir / "console.log").read_text(errors="replace") \
        if (run_dir / "console.log").exists() else ""
    return GuestRun(status, output, console + qemu_out, seconds, run_dir)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.lab.vm")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("setup", help="fill the cache for these suites")
    s.add_argument("suites", nargs="*", default=["bullseye", "bookworm", "trixie"])
    sh = sub.add_parser("shell", help="boot a guest and run a shell command in it")
    sh.add_argument("suite")
    sh.add_argument("--cgroup", choices=["v1", "v2"], default="v2")
    sh.add_argument("command", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    if args.cmd == "setup":
        for suite in args.suites:
            started = time.monotonic()
            kernel, root = setup(suite)
            log(f"{suite}: kernel {kernel.release}, root {root} "
                f"({time.monotonic() - started:.0f}s)")
        return 0
    command = " ".join(a for a in args.command if a != "--") or "uname -a"
    run = boot(args.suite, command, Path(tempfile.mkdtemp(prefix="lab-run-")), cgroup=args.cgroup)
    print(run.output, end="")
    log(f"{args.suite}: status {run.status} in {run.seconds:.0f}s (console: {run.run_dir})")
    return run.status if run.status is not None else 1


if __name__ == "__main__":
    sys.exit(main())
