"""Helpers (no tests): real guest disks built with libguestfs itself, and the model of what
the guest has on them, for the file-level restore tests (test_cli_files.py).

demo-vm's two disks, as a Linux guest would have them:

  disk 0 (/dev/sda, GPT)  1: ext4, the OS root (/etc/fstab, /etc/os-release, /bin)
                          2: vfat, mounted at /boot/efi
                          3: LUKS (pbkdf2, few iterations: opening is cheap under TCG),
                             ext4 inside
                          4: LVM physical volume of vg0
  disk 1 (/dev/sdb, GPT)  1: LVM physical volume of vg0
  vg0/data: xfs (mkfs.xfs wants > 300 MiB) spanning both disks, mounted at /data

The images are raw files, written into the simulator's VDIs through ``xensim
guest-disk``; later changes go through the same route by libguestfs opening the guest
disks' NBD sockets directly (``add_drive(protocol="nbd")``), so CBT sees guest writes.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import guestfs

MIB = 1 << 20
DISK_SIZES = (240 * MIB, 176 * MIB)
ROOT, EFI, SECRET, DATA = "/dev/sda1", "/dev/sda2", "/dev/sda3", "/dev/vg0/data"
MOUNTS = {ROOT: "/", EFI: "/boot/efi", DATA: "/data"}  # the guest's fstab
SECTORS = 2048  # 1 MiB in 512-byte sectors
KEY = "correct horse battery staple"
LUKS_MAP = "secret"

FSTAB = b"""/dev/sda1 / ext4 defaults 0 1
/dev/sda2 /boot/efi vfat defaults 0 2
/dev/vg0/data /data xfs defaults 0 2
"""
OS_RELEASE = b"""PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"
NAME="Debian GNU/Linux"
ID=debian
VERSION_ID="12"
"""


@dataclass
class File:
    data: bytes | None  # None: a directory
    mode: int
    mtime: int
    target: str | None = None  # a symlink's


def environment() -> None:
    # The machines this runs on have /dev/kvm that hangs a guest (REFERENCE.md §8): the
    # builder goes straight to TCG; the product finds that out by itself.
    os.environ.setdefault("LIBGUESTFS_BACKEND", "direct")
    os.environ.setdefault("LIBGUESTFS_BACKEND_SETTINGS", "force_tcg")


def handle() -> guestfs.GuestFS:
    environment()
    return guestfs.GuestFS(python_return_dict=True, close_on_exit=False)


class GuestModel:
    """What each file system of the guest holds: fs -> {path: File}, paths inside the fs."""

    def __init__(self) -> None:
        self.fs: dict[str, dict[str, File]] = {ROOT: {}, EFI: {}, DATA: {}, LUKS_MAP: {}}

    def copy(self) -> GuestModel:
        new = GuestModel()
        new.fs = {fs: dict(files) for fs, files in self.fs.items()}
        return new

    def os_view(self) -> dict[str, File]:
        """The files as the OS sees them: every fs at its mount point."""
        view = {}
        for fs, mountpoint in MOUNTS.items():
            for path, f in self.fs[fs].items():
                view[mountpoint.rstrip("/") + path] = f
        return view


def write(g: guestfs.GuestFS, model: GuestModel, fs: str, path: str, f: File) -> None:
    """Write ``f`` at ``path`` of the file system mounted at / and record it."""
    if f.target is not None:
        g.ln_s(f.target, path)
    elif f.data is None:
        g.mkdir_p(path)
        g.chmod(f.mode, path)
    else:
        with tempfile.NamedTemporaryFile() as local:  # write() is limited to 2 MiB
            local.write(f.data)
            local.flush()
            g.upload(local.name, path)
        g.chmod(f.mode, path)
    if fs != EFI and f.target is None:  # vfat keeps no modes; its times are 2 s coarse
        g.utimens(path, f.mtime, 0, f.mtime, 0)
    model.fs[fs][path] = f


def settle(g: guestfs.GuestFS, model: GuestModel, fs: str) -> None:
    """Give directories their model times again, deepest first: writing into a directory
    changed its mtime."""
    if fs == EFI:
        return
    dirs = [(p, f) for p, f in model.fs[fs].items() if f.data is None and f.target is None]
    for path, f in sorted(dirs, key=lambda d: -d[0].count("/")):
        g.utimens(path, f.mtime, 0, f.mtime, 0)


def remove(g: guestfs.GuestFS, model: GuestModel, fs: str, path: str) -> None:
    g.rm(path)
    del model.fs[fs][path]


def initial_files() -> dict[str, dict[str, File]]:
    t = 1_700_000_000
    rnd = os.urandom
    return {
        ROOT: {
            "/etc": File(None, 0o755, t),
            "/etc/fstab": File(FSTAB, 0o644, t + 1),
            "/etc/os-release": File(OS_RELEASE, 0o644, t + 2),
            "/etc/hostname": File(b"demo-vm\n", 0o644, t + 3),
            "/etc/shadow": File(b"root:*:19000:0:99999:7:::\n", 0o640, t + 4),
            "/bin": File(None, 0o755, t),
            "/bin/tool": File(rnd(300_000), 0o755, t + 5),
            "/home": File(None, 0o755, t),
            "/home/alice": File(None, 0o700, t + 6),
            "/home/alice/notes.txt": File(b"buy milk\n" * 1000, 0o600, t + 7),
            "/home/alice/to-delete.bin": File(rnd(2 * 1024 * 1024 + 17), 0o644, t + 8),
            "/home/alice/name with spaces": File(b"spaces\n", 0o644, t + 9),
            "/home/alice/escape": File(None, 0o777, t, target="../../../../../../../tmp/escaped"),
            "/home/alice/passwd-link": File(None, 0o777, t, target="/etc/passwd"),
            "/boot": File(None, 0o755, t),
            "/boot/efi": File(None, 0o755, t),
            "/data": File(None, 0o755, t),
        },
        EFI: {
            "/EFI": File(None, 0o755, t),
            "/EFI/boot.cfg": File(b"timeout=5\n", 0o755, t),
        },
        DATA: {
            "/projects": File(None, 0o2775, t + 10),
            "/projects/report.bin": File(rnd(5 * 1024 * 1024 + 3), 0o664, t + 11),
            "/projects/old.txt": File(b"old plans\n", 0o644, t + 12),
        },
        LUKS_MAP: {"/secret.txt": File(b"the secret\n", 0o600, t + 13)},
    }


def luks_header(work: Path, size: int) -> Path:
    """A LUKS1 volume image (2 MiB header) with cheap key derivation: formatting inside a
    TCG appliance would calibrate pbkdf for seconds, and every open would pay that again."""
    image, key = work / "luks.img", work / "luks.key"
    key.write_text(KEY)
    key.chmod(0o600)
    with open(image, "wb") as f:
        f.truncate(size)
    argv = ["cryptsetup", "luksFormat", "--batch-mode", "--type", "luks1"]
    argv += [
        "--pbkdf-force-iterations",
        "1000",
        "--hash",
        "sha256",
        "--key-file",
        str(key),
        str(image),
    ]
    subprocess.run(argv, check=True, capture_output=True)
    return image


def build(work: Path) -> tuple[list[Path], GuestModel]:
    """Raw images of demo-vm's two disks, and the model of their files."""
    images = [work / "disk0.img", work / "disk1.img"]
    luks = luks_header(work, 16 * MIB)
    g = handle()
    for image, size in zip(images, DISK_SIZES, strict=True):
        g.disk_create(str(image), "raw", size)
        g.add_drive_opts(str(image), format="raw")
    g.launch()
    g.part_init("/dev/sda", "gpt")
    start = SECTORS
    for mib in (32, 16, 16):
        g.part_add("/dev/sda", "p", start, start + mib * SECTORS - 1)
        start += mib * SECTORS
    g.part_add("/dev/sda", "p", start, -34)
    g.part_disk("/dev/sdb", "gpt")
    g.mkfs("ext4", ROOT)
    g.mkfs("vfat", EFI)
    g.upload(str(luks), SECRET)
    g.cryptsetup_open(SECRET, KEY, LUKS_MAP)
    g.mkfs("ext4", "/dev/mapper/" + LUKS_MAP)
    g.pvcreate("/dev/sda4")
    g.pvcreate("/dev/sdb1")
    g.vgcreate("vg0", ["/dev/sda4", "/dev/sdb1"])
    g.lvcreate_free("data", "vg0", 100)
    g.mkfs("xfs", DATA)
    model = GuestModel()
    for fs, files in initial_files().items():
        g.mount(fs if fs != LUKS_MAP else "/dev/mapper/" + LUKS_MAP, "/")
        for path, f in files.items():
            write(g, model, fs, path, f)
        settle(g, model, fs)
        g.umount_all()
    g.cryptsetup_close("/dev/mapper/" + LUKS_MAP)
    g.shutdown()
    g.close()
    return images, model


def socket_of(uri: str) -> str:
    """The unix socket of an ``nbd+unix:///?socket=PATH`` URI."""
    return urllib.parse.parse_qs(urllib.parse.urlparse(uri).query)["socket"][0]


def change(uris: list[str], model: GuestModel) -> GuestModel:
    """Change, add and delete files on the live guest disks (NBD URIs, in disk order)."""
    new = model.copy()
    g = handle()
    for uri in uris:
        g.add_drive_opts("", format="raw", protocol="nbd", server=["unix:" + socket_of(uri)])
    g.launch()
    g.vg_activate_all(True)
    t = 1_750_000_000
    g.mount(ROOT, "/")
    write(g, new, ROOT, "/etc/hostname", File(b"renamed-vm\n", 0o644, t))
    remove(g, new, ROOT, "/home/alice/to-delete.bin")
    write(g, new, ROOT, "/home/alice/new.txt", File(b"added later\n", 0o640, t + 1))
    settle(g, new, ROOT)
    g.umount_all()
    g.mount(DATA, "/")
    write(g, new, DATA, "/projects/report.bin", File(os.urandom(3 * 1024 * 1024), 0o600, t + 2))
    remove(g, new, DATA, "/projects/old.txt")
    settle(g, new, DATA)
    g.umount_all()
    g.shutdown()
    g.close()
    return new
