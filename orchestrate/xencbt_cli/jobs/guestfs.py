"""A guest's disks opened read-only with libguestfs: its appliance, file systems and OS.

libguestfs boots a small Linux appliance under qemu and reads the disks from inside it,
so partition tables, LVM (also spanning disks), ext2/3/4, xfs, btrfs, vfat and NTFS need
no root, no /dev/nbd and no kernel modules of the backup machine.  Every disk is added
``readonly=True``: qemu reads the qcow2 chain (relative backing files) through a
throw-away overlay, so nothing in the repository changes.

Start-up: the appliance is built once per user into its cache directory (supermin, tens
of seconds) and booted at every run (seconds with KVM, 10-20 s under TCG).  On machines
where /dev/kvm exists but a guest cannot run on it (nested virtualisation that hangs or
aborts the vCPU), the first start under KVM is given KVM_TIMEOUT seconds, then the
appliance is killed and started under TCG; the verdict is remembered in the cache
directory (``.xencbt-kvm-unusable-UID``) so later runs go straight to TCG.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from ..errors import CliError
from ..proc.scratch import private_dir

log = logging.getLogger(__name__)

KVM_TIMEOUT = 30.0  # a KVM appliance is up in a few seconds
KVM_VERDICT = ".xencbt-kvm-unusable"  # + "-UID": the cache directory may be shared
NO_FILE_SYSTEM = {"unknown", "swap", "crypto_LUKS", "LVM2_member", "linux_raid_member"}


class GuestError(CliError):
    """The guest's disks cannot be read as asked (no file system, encrypted, bad key)."""


class ApplianceError(GuestError):
    """libguestfs could not start its appliance."""


def import_guestfs():
    try:
        import guestfs
    except ImportError:
        raise GuestError(
            "xencbt files needs libguestfs for Python: apt-get install python3-guestfs "
            "libguestfs-tools linux-image-amd64 (dnf install python3-libguestfs)"
        ) from None
    return guestfs


def writable_dir(path: str | None) -> bool:
    return bool(path) and os.path.isdir(path) and os.access(path, os.W_OK | os.X_OK)


def cache_dir(private: str) -> str:
    """Where libguestfs keeps the appliance it builds (per user inside): its own choice
    ($LIBGUESTFS_CACHEDIR, else $TMPDIR, else /var/tmp) when writable, else ~/.cache, else
    a private directory (the appliance is then rebuilt at every run)."""
    asked = os.environ.get("LIBGUESTFS_CACHEDIR")
    if asked and not os.path.exists(asked):
        with contextlib.suppress(OSError):
            os.makedirs(asked, 0o700)
    for candidate in (
        os.environ.get("LIBGUESTFS_CACHEDIR"),
        os.environ.get("TMPDIR"),
        "/var/tmp",
        os.path.expanduser("~/.cache"),
    ):
        if writable_dir(candidate):
            return candidate
    return private


def appliance_built(cachedir: str) -> bool:
    return (Path(cachedir) / (".guestfs-%d" % os.getuid()) / "appliance.d" / "root").exists()


def kvm_usable() -> bool:
    return os.access("/dev/kvm", os.R_OK | os.W_OK)


class Guest:
    """The disks (oldest userdevice first: /dev/sda, /dev/sdb, …) in one appliance."""

    def __init__(self, images: list[Path], say: Callable[[str], None], nbd: bool = False):
        self.images = images  # qcow2 files, or (``nbd``) unix sockets serving the disks
        self.nbd = nbd
        self.say = say
        self.g = None
        self.keyed: dict[str, str] = {}  # opened LUKS volumes: /dev/mapper/… -> device

    @contextlib.contextmanager
    def opened(self) -> Iterator[Guest]:
        with private_dir("xencbt-guestfs-") as private:
            self.cachedir = cache_dir(private)
            self.tmpdir = os.environ.get("TMPDIR") or "/tmp"
            if not writable_dir(self.tmpdir):
                self.tmpdir = private
            try:
                self._launch()
                yield self
            finally:
                self.close()

    def close(self) -> None:
        if self.g is not None:
            with contextlib.suppress(RuntimeError):
                self.g.shutdown()
            self.g.close()
            self.g = None

    def _handle(self, force_tcg: bool):
        guestfs = import_guestfs()
        g = guestfs.GuestFS(python_return_dict=True, close_on_exit=False)
        # The libvirt backend would need a libvirt daemon; direct runs qemu as this user.
        g.set_backend(os.environ.get("LIBGUESTFS_BACKEND") or "direct")
        g.set_cachedir(self.cachedir)
        g.set_tmpdir(self.tmpdir)
        if force_tcg:
            settings = g.get_backend_settings()
            g.set_backend_settings([*settings, "force_tcg"])
        for path in self.images:
            if self.nbd:  # image.exported: an encrypted chain, served by qemu-nbd
                server = ["unix:%s" % path]
                g.add_drive_opts("", readonly=True, format="raw", protocol="nbd", server=server)
            else:
                g.add_drive_opts(str(path), readonly=True, format="qcow2")
        return g

    def _launch(self) -> None:
        verdict = Path(self.cachedir) / ("%s-%d" % (KVM_VERDICT, os.getuid()))
        tcg = "force_tcg" in os.environ.get("LIBGUESTFS_BACKEND_SETTINGS", "")
        if not tcg and kvm_usable() and verdict.exists():
            self.say(
                "xencbt: note: KVM did not work here before (%s): the appliance runs under "
                "software emulation (TCG)" % verdict
            )
            tcg = True
        kvm = not tcg and kvm_usable()
        if not appliance_built(self.cachedir):
            self.say(
                "xencbt: building the libguestfs appliance in %s (first start for this user: "
                "up to a minute), then starting it" % self.cachedir
            )
        self.say(
            "xencbt: starting the libguestfs appliance %s"
            % ("(a few seconds with KVM)" if kvm else "under software emulation (TCG, 10-30 s)")
        )
        started = time.monotonic()
        with ticking(started):
            if not kvm:
                self._start(force_tcg=tcg)
            elif not self._start_watched():
                self.say(
                    "\rxencbt: note: /dev/kvm is present but the appliance did not start on it "
                    "within %d s: falling back to software emulation (TCG, slower); "
                    "remembered in %s (remove it to try KVM again)" % (KVM_TIMEOUT, verdict)
                )
                with contextlib.suppress(OSError):
                    verdict.touch()
                self._start(force_tcg=True)
        self.say("xencbt: appliance up in %.1f s" % (time.monotonic() - started))

    def _start(self, force_tcg: bool) -> None:
        self.g = self._handle(force_tcg)
        try:
            self.g.launch()
        except RuntimeError as e:
            self.close()
            raise ApplianceError(
                "libguestfs could not start its appliance: %s (libguestfs-test-tool "
                "explains why; the appliance needs a kernel: apt-get install "
                "linux-image-amd64)" % str(e).strip().splitlines()[0]
            ) from None

    def _start_watched(self) -> bool:
        """Start under KVM; False if qemu hung or failed (then nothing is left running)."""
        self.g = self._handle(force_tcg=False)
        timer = threading.Timer(KVM_TIMEOUT, kill_qemu_children)
        timer.start()
        try:
            self.g.launch()
            return True
        except RuntimeError as e:
            log.info("appliance under KVM failed: %s", str(e).strip())
            self.close()
            return False
        finally:
            timer.cancel()

    # --- what is on the disks ---------------------------------------------------------

    def filesystems(self) -> dict[str, str]:
        """device -> type, as libguestfs names them (/dev/sda1, /dev/vg0/root)."""
        return dict(self.g.list_filesystems())

    def encrypted(self) -> list[str]:
        """LUKS volumes not opened yet (list_filesystems leaves them out)."""
        g = self.g
        opened = set(self.keyed.values())
        found = []
        for device in [*g.list_partitions(), *g.list_devices(), *g.lvs()]:
            with contextlib.suppress(RuntimeError):
                if g.vfs_type(device) == "crypto_LUKS" and device not in opened:
                    found.append(device)
        return sorted(found)

    def open_encrypted(self, key: str) -> None:
        """Open every LUKS volume read-only with ``key`` (handed to the appliance over its
        private channel, never on a command line), then activate LVM inside them."""
        self.g.set_trace(False)  # LIBGUESTFS_TRACE=1 would print the key with the call
        for n, device in enumerate(self.encrypted()):
            try:
                self.g.cryptsetup_open(device, key, "xencbt%d" % n, readonly=True)
                self.keyed["/dev/mapper/xencbt%d" % n] = device
            except RuntimeError:
                raise GuestError(
                    "the key in --guest-key-file does not open the encrypted volume %s" % device
                ) from None
        self.g.vgscan()
        self.g.vg_activate_all(True)

    def readable(self) -> dict[str, str]:
        return {d: t for d, t in self.filesystems().items() if t not in NO_FILE_SYSTEM}

    def operating_systems(self) -> list[dict]:
        found = []
        for root in self.g.inspect_os():
            mounts = self.g.inspect_get_mountpoints(root)
            found.append(
                {
                    "root": root,
                    "product": self.g.inspect_get_product_name(root),
                    "mountpoints": dict(sorted(mounts.items(), key=lambda kv: len(kv[0]))),
                }
            )
        return found

    def mount_fs(self, device: str) -> None:
        self.g.umount_all()
        try:
            self.g.mount_ro(device, "/")
        except RuntimeError as e:
            raise GuestError("cannot mount %s: %s" % (device, last_line(e))) from None

    def mount_os(self, os_info: dict) -> None:
        """Mount the OS's file systems at their mount points (shortest first)."""
        self.g.umount_all()
        for mountpoint, device in os_info["mountpoints"].items():
            try:
                self.g.mount_ro(device, mountpoint)
            except RuntimeError as e:
                log.warning("cannot mount %s at %s: %s", device, mountpoint, last_line(e))


@contextlib.contextmanager
def ticking(started: float) -> Iterator[None]:
    """On a terminal, the seconds spent so far, every second, until the appliance is up."""
    if not sys.stderr.isatty():
        yield
        return
    done = threading.Event()

    def tick() -> None:
        while not done.wait(1.0):
            sys.stderr.write("\r  %d s " % (time.monotonic() - started))
            sys.stderr.flush()

    thread = threading.Thread(target=tick, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        sys.stderr.write("\r")


def last_line(error: Exception) -> str:
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def kill_qemu_children() -> None:
    """Kill the qemu this process started (a KVM appliance that hangs): launch() then
    returns an error instead of waiting for ever."""
    pid = os.getpid()
    for task in Path("/proc/%d/task" % pid).iterdir():
        with contextlib.suppress(OSError):
            for child in (task / "children").read_text().split():
                comm = Path("/proc/%s/comm" % child).read_text().strip()
                # Not qemu-nbd: it serves an encrypted chain to the appliance's next try
                # (image.exported).
                if comm.startswith("qemu") and comm != "qemu-nbd":
                    log.info("killing qemu %s: no appliance after %s s", child, KVM_TIMEOUT)
                    os.kill(int(child), signal.SIGKILL)
