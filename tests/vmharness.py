"""A tiny Linux VM that mounts an NBD export with the kernel's client (helper, no tests).

This machine has no ``/dev/nbd*``, so the kernel NBD client is proven inside a VM:
Debian's own kernel (``linux-image-<version>-amd64``, fetched with ``apt-get download``
and unpacked into the cache, never installed), ``busybox-static`` and Debian's
``nbd-client`` with its shared libraries, booted by ``qemu-system-x86_64`` under TCG.
The guest reaches the host's loopback as 10.0.2.2 (qemu's user network), connects
``nbd-client -readonly`` to the port it is given on the kernel command line, mounts the
ext4 file system with ``-o ro,noload``, prints ``sha256sum`` of every file between
markers on the serial console, unmounts, disconnects and powers off.

The kernel and the initramfs are built once and cached in ``$XENCBT_VM_CACHE`` (default
``~/.cache/xencbt-vm``), keyed by everything they are made of.  Missing Debian packages
are installed with apt-get (the Makefile's ``deps`` installs them too).  Every step is
bounded by a timeout: a hung VM fails the test, it never hangs CI.
"""

from __future__ import annotations

import fcntl
import hashlib
import lzma
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

PACKAGES = ("qemu-system-x86", "busybox-static", "nbd-client", "cpio")
# In load order; a module the kernel has built in is skipped (modules.builtin).
MODULES = (
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "failover",
    "net_failover",
    "virtio_net",
    "nbd",
    "crc16",
    "mbcache",
    "jbd2",
    "crc32c_generic",
    "libcrc32c",
    "ext4",
)
BOOT_TIMEOUT = 150.0  # seconds for one VM run; ~6 s when the machine is idle
APT_TIMEOUT = 600.0

INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
fail() { echo "XENCBT-FAIL $*"; poweroff -f; }
for w in $(cat /proc/cmdline); do
  case "$w" in xencbt.port=*) PORT="${w#*=}";; xencbt.opts=*) OPTS="${w#*=}";; esac
done
for m in $(cat /modules.load); do insmod "/lib/modules/$m.ko" || fail "insmod $m"; done
ip link set lo up && ip link set eth0 up || fail "eth0"
ip addr add 10.0.2.15/24 dev eth0 && ip route add default via 10.0.2.2 || fail "ip"
nbd-client 10.0.2.2 "$PORT" /dev/nbd0 -readonly -timeout 60 || fail "nbd-client"
echo "XENCBT-CONNECTED size=$(blockdev --getsize64 /dev/nbd0)"
mount -t ext4 -o "${OPTS:-ro,noload}" /dev/nbd0 /mnt || fail "mount"
echo XENCBT-MOUNTED
echo XENCBT-SUMS-BEGIN
cd /mnt && find . -type f | sort | while read -r f; do sha256sum "$f"; done
echo XENCBT-SUMS-END
cd / && umount /mnt || fail "umount"
nbd-client -d /dev/nbd0 || fail "nbd-client -d"
echo XENCBT-DONE
poweroff -f
"""


class VmError(Exception):
    """The VM could not be built, or the guest did not get through its script."""


@dataclass
class Guest:
    """What the guest reported: its serial log and {path: sha256} of the mounted files."""

    log: str
    sums: dict[str, str]


def cache_dir() -> Path:
    path = Path(os.environ.get("XENCBT_VM_CACHE") or Path.home() / ".cache" / "xencbt-vm")
    path.mkdir(parents=True, exist_ok=True)
    return path


def run(argv: list[str], timeout: float = APT_TIMEOUT, **kw) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)
    except subprocess.TimeoutExpired:
        raise VmError("%s timed out after %ds" % (argv[0], timeout)) from None
    if done.returncode != 0:
        raise VmError("%s failed (exit %d): %s" % (argv, done.returncode, done.stderr[-2000:]))
    return done.stdout


def installed(package: str) -> bool:
    r = subprocess.run(
        ["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True
    )
    return r.stdout.startswith("install ok installed")


def ensure_packages() -> None:
    missing = [p for p in PACKAGES if not installed(p)]
    if not missing:
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]
    try:
        run(install, env=env)
    except VmError:  # an old package index: refresh it once
        run(["apt-get", "update", "-q"], env=env)
        run(install, env=env)


def kernel_package() -> str:
    """The versioned package linux-image-amd64 depends on, e.g. linux-image-6.1.0-56-amd64."""
    out = run(["apt-cache", "depends", "linux-image-amd64"])
    found = re.findall(r"Depends: (linux-image-[0-9][^\s]*-amd64)\s", out + "\n")
    if not found:
        raise VmError("apt-cache knows no kernel for linux-image-amd64:\n" + out)
    return found[0]


def fetch_kernel(cache: Path, package: str) -> Path:
    """vmlinuz and the modules we load, unpacked from the package into cache/PACKAGE/."""
    target = cache / package
    if (target / "ready").exists():
        return target
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        run(["apt-get", "download", package], cwd=tmp)
        deb = next(Path(tmp).glob("*.deb"))
        names = ["*/boot/vmlinuz-*", "*/modules.builtin", *("*/%s.ko*" % m for m in MODULES)]
        unpack(deb, Path(tmp), names)
        staging = Path(tmp) / "kernel"
        (staging / "modules").mkdir(parents=True)
        vmlinuz = list(Path(tmp).glob("boot/vmlinuz-*"))
        builtin = list(Path(tmp).glob("lib/modules/*/modules.builtin"))
        if not vmlinuz or not builtin:
            raise VmError("%s holds no boot/vmlinuz-* or modules.builtin" % deb.name)
        shutil.copy(vmlinuz[0], staging / "vmlinuz")
        builtin = builtin[0].read_text()
        load = []
        for m in MODULES:
            files = list(Path(tmp).glob("lib/modules/*/kernel/**/%s.ko*" % m))
            if not files:
                if re.search(r"/%s\.ko$" % re.escape(m), builtin, re.M):
                    continue  # built into the kernel
                raise VmError("%s has no module %s" % (package, m))
            data = files[0].read_bytes()
            if files[0].suffix == ".xz":  # busybox insmod wants plain .ko
                data = lzma.decompress(data)
            (staging / "modules" / (m + ".ko")).write_bytes(data)
            load.append(m)
        (staging / "modules.load").write_text("\n".join(load) + "\n")
        (staging / "ready").write_text("")
        staging.rename(target)
    return target


def unpack(deb: Path, into: Path, patterns: list[str]) -> None:
    """Only the members matching ``patterns`` (a built-in module has none: not an error)."""
    dpkg = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
    tar = ["tar", "-x", "-C", str(into), "--wildcards", *patterns]
    subprocess.run(tar, stdin=dpkg.stdout, stderr=subprocess.DEVNULL, timeout=APT_TIMEOUT)
    dpkg.stdout.close()
    if dpkg.wait(APT_TIMEOUT) != 0:
        raise VmError("dpkg-deb --fsys-tarfile %s failed" % deb)


def libraries(binary: str) -> list[str]:
    """The shared libraries ``binary`` needs (ldd), loader included."""
    return sorted(set(re.findall(r"(/\S+\.so[.\d]*)\s", run(["ldd", binary]) + "\n")))


def initramfs(cache: Path, kernel: Path) -> Path:
    """The initramfs (cpio newc), rebuilt only when what it is made of changes."""
    nbd_client = shutil.which("nbd-client", path="/usr/sbin:/sbin:/usr/bin") or "nbd-client"
    parts = [INIT, kernel.name, "/bin/busybox", nbd_client, *libraries(nbd_client)]
    key = hashlib.sha256()
    for p in parts:
        key.update(p.encode())
        if p.startswith("/"):
            key.update(hashlib.sha256(Path(p).read_bytes()).digest())
    out = cache / ("initramfs-%s.cpio" % key.hexdigest()[:16])
    if out.exists():
        return out
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        root = Path(tmp) / "root"
        for d in ("bin", "sbin", "dev", "proc", "sys", "mnt", "lib/modules"):
            (root / d).mkdir(parents=True)
        shutil.copy("/bin/busybox", root / "bin" / "busybox")
        shutil.copy(nbd_client, root / "sbin" / "nbd-client")
        for lib in libraries(nbd_client):
            dest = root / lib.lstrip("/")
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(lib, dest)  # follows symlinks: the real file under the soname
        for ko in (kernel / "modules").iterdir():
            shutil.copy(ko, root / "lib" / "modules" / ko.name)
        shutil.copy(kernel / "modules.load", root / "modules.load")
        (root / "init").write_text(INIT)
        (root / "init").chmod(0o755)
        files = run(["find", ".", "-print0"], cwd=root)
        partial = Path(tmp) / "initramfs.cpio"
        with open(partial, "wb") as f:
            cpio = ["cpio", "-o", "-H", "newc", "--null", "--quiet", "-R", "0:0"]
            subprocess.run(cpio, input=files.encode(), stdout=f, cwd=root, check=True, timeout=120)
        partial.rename(out)
    return out


@dataclass
class Vm:
    kernel: Path
    initramfs: Path

    def mount_and_hash(
        self, port: int, options: str = "ro,noload", timeout: float = BOOT_TIMEOUT
    ) -> Guest:
        """Boot; the guest mounts the NBD export on 127.0.0.1:``port`` of the host with
        ``mount -o options`` and reports the sha256 of every file."""
        argv = [
            "qemu-system-x86_64",
            "-accel",
            "tcg",
            "-m",
            "256",
            "-nodefaults",
            "-display",
            "none",
            "-serial",
            "stdio",
            "-monitor",
            "none",
            "-no-reboot",
            "-netdev",
            "user,id=n0",
            "-device",
            "virtio-net-pci,netdev=n0,romfile=",
            "-kernel",
            str(self.kernel / "vmlinuz"),
            "-initrd",
            str(self.initramfs),
            "-append",
            "console=ttyS0 panic=-1 quiet xencbt.port=%d xencbt.opts=%s" % (port, options),
        ]
        try:
            done = subprocess.run(
                argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout
            )
        except subprocess.TimeoutExpired as e:
            log = (e.stdout or b"").decode(errors="replace")
            raise VmError(
                "the VM did not finish in %ds; serial log:\n%s" % (timeout, log[-3000:])
            ) from None
        log = done.stdout.decode(errors="replace").replace("\r", "")
        if "XENCBT-DONE" not in log:
            raise VmError(
                "the guest failed (qemu exit %d): %s\nserial log:\n%s"
                % (done.returncode, done.stderr.decode(errors="replace")[-1000:], log[-3000:])
            )
        return Guest(log, parse_sums(log))


def parse_sums(log: str) -> dict[str, str]:
    body = log.split("XENCBT-SUMS-BEGIN\n", 1)[1].split("XENCBT-SUMS-END", 1)[0]
    sums = {}
    for line in body.splitlines():
        digest, _, path = line.strip().partition("  ")
        if re.fullmatch(r"[0-9a-f]{64}", digest):
            sums[path.removeprefix("./")] = digest
    return sums


def build() -> Vm:
    """Install what is missing, then the cached kernel and initramfs (built once)."""
    ensure_packages()
    cache = cache_dir()
    with open(cache / ".lock", "w") as lock:  # parallel test runs build it once
        fcntl.flock(lock, fcntl.LOCK_EX)
        kernel = cached_kernel(cache)
        return Vm(kernel, initramfs(cache, kernel))


def cached_kernel(cache: Path) -> Path:
    """The kernel linux-image-amd64 names now; a cached one if apt cannot help; once
    after refreshing an old package index (a fresh machine, a version gone from the mirror)."""
    try:
        return fetch_kernel(cache, kernel_package())
    except VmError:
        ready = sorted(cache.glob("linux-image-*/ready"))
        if ready:
            return ready[-1].parent
        run(["apt-get", "update", "-q"])
        return fetch_kernel(cache, kernel_package())
