"""A point's disks opened in a libguestfs appliance, as ``xencbt files`` sees them: paths in
the guest (``FS:/path`` or ``/path`` under the OS's root), what is mounted, and listings
(ls).  Read-only: nothing here writes into the guest or outside it."""

from __future__ import annotations

import functools
import logging
import posixpath
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UsageError
from ..repo.manifest import Manifest
from ..repo.repository import Chain
from .guestfs import Guest, GuestError

log = logging.getLogger(__name__)

BATCH = 500


DIRECTORY = {
    "st_mode": stat.S_IFDIR
}  # setuid/setgid bits are not restored: the files land on this machine


class PathNotFound(GuestError):
    """The path does not exist at that point."""


@dataclass
class Selection:
    """What a TARGET at a point means: its disks, userdevice order."""

    target: str
    point: str
    disks: list[tuple[Chain, Manifest]]
    points: list[str] = field(default_factory=list)  # every point of the target, oldest first

    def images(self) -> list[Path]:
        return [chain.image_path(m.point) for chain, m in self.disks]


@dataclass(frozen=True)
class GuestPath:
    """``fs`` None: under the inspected OS's root."""

    fs: str | None
    path: str

    def __str__(self) -> str:
        return "%s:%s" % (self.fs, self.path) if self.fs else self.path


def parse_path(text: str, filesystems: dict[str, str], locked: list[str] = ()) -> GuestPath:
    fs, sep, rest = text.partition(":")
    if sep and fs in filesystems:
        path = rest or "/"
    elif sep and fs in locked:
        raise GuestError(
            "%s: %s is an encrypted volume (LUKS): pass --guest-key-file FILE holding its "
            "passphrase; it then shows as /dev/mapper/xencbtN in files ls" % (text, fs)
        )
    elif sep and fs.startswith("/dev/"):
        raise PathNotFound(
            "%s: no file system %s on these disks (xencbt files ls shows them)" % (text, fs)
        )
    else:
        fs, path = None, text
    check_path(text, path)
    return GuestPath(fs, posixpath.normpath(path).replace("//", "/"))


def check_path(text: str, path: str) -> None:
    if not path.startswith("/") or ".." in path.split("/"):
        raise UsageError("%s: a guest path is absolute and has no '..'" % text)


class GuestView:
    """An opened guest and what is mounted in it now."""

    def __init__(self, guest: Guest, sel: Selection, say: Callable[[str], None], key: str | None):
        self.guest, self.sel, self.say = guest, sel, say
        if key is not None and guest.encrypted():
            guest.open_encrypted(key)
        self.fs = guest.readable()
        self.locked = guest.encrypted()
        self.mounted: object = None
        if not self.fs:
            raise GuestError(self.nothing_found())

    @functools.cached_property
    def os(self) -> list[dict]:
        """Inspection mounts every file system in turn (seconds under TCG): only when a
        path under the OS's root or the overview asks for it."""
        return self.guest.operating_systems()

    def nothing_found(self) -> str:
        where = "%s at point %s" % (self.sel.target, self.sel.point)
        if self.locked:
            return (
                "%s: only encrypted volumes (LUKS: %s): pass --guest-key-file FILE holding "
                "the passphrase" % (where, ", ".join(self.locked))
            )
        return (
            "%s: no file system found on its disks (blank, or a file system libguestfs does "
            "not read)" % where
        )

    def mount(self, gp: GuestPath) -> None:
        want = gp.fs or "os"
        if self.mounted == want:
            return
        if gp.fs:
            self.guest.mount_fs(gp.fs)
        elif not self.os:
            raise UsageError(
                "%s: no operating system found on these disks, so name the file system: "
                "FS:%s (xencbt files ls shows them: %s)" % (gp, gp.path, ", ".join(self.fs))
            )
        else:
            self.guest.mount_os(self.os[0])
        self.mounted = want

    def find(self, gp: GuestPath) -> tuple[GuestPath, dict]:
        """``gp`` with its directories resolved inside the guest, and its lstat.

        The appliance's kernel would resolve an absolute symlink among the directories
        (``/bin -> /usr/bin``) against the appliance's own root; ``realpath`` runs
        chrooted into the guest.  The last component stays as it is (a link is a link)."""
        self.mount(gp)
        g = self.guest.g
        parent, name = posixpath.split(gp.path)
        try:
            if name:
                gp = GuestPath(gp.fs, posixpath.join(g.realpath(parent), name))
            return gp, g.lstatns(gp.path)
        except RuntimeError:
            pass
        hint = ""
        for fs in self.locked:
            hint += "; %s is encrypted (LUKS): --guest-key-file opens it" % fs
        older = [p for p in self.sel.points if p < self.sel.point]
        if older:
            hint += "; older points: %s (--at)" % ", ".join(older[-3:])
        raise PathNotFound(
            "%s does not exist in %s at point %s%s" % (gp, self.sel.target, self.sel.point, hint)
        )


def kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "directory"),
        (stat.S_ISREG, "file"),
        (stat.S_ISLNK, "symlink"),
        (stat.S_ISCHR, "char-device"),
        (stat.S_ISBLK, "block-device"),
        (stat.S_ISFIFO, "fifo"),
        (stat.S_ISSOCK, "socket"),
    ):
        if test(mode):
            return name
    return "other"


def entry(view: GuestView, parent: str, name: str, st: dict) -> dict:
    path = posixpath.join(parent, name)
    row = {
        "name": name,
        "path": path,
        "type": kind(st["st_mode"]),
        "mode": "%04o" % stat.S_IMODE(st["st_mode"]),
        "size": st["st_size"],
        "mtime": st["st_mtime_sec"],
        "mtime_ns": st["st_mtime_sec"] * 10**9 + st["st_mtime_nsec"],
        "atime_ns": st["st_atime_sec"] * 10**9 + st["st_atime_nsec"],
    }
    if row["type"] == "symlink":
        row["target"] = view.guest.g.readlink(path)
    return row


def listing(view: GuestView, gp: GuestPath, st: dict | None = None) -> list[dict]:
    """The entries of a directory, or the file ``gp`` is; ``st`` given: a directory
    already found."""
    if st is None:
        gp, st = view.find(gp)
    g = view.guest.g
    if not stat.S_ISDIR(st["st_mode"]):
        parent, name = posixpath.split(gp.path)
        return [entry(view, parent, name, st)]
    names = sorted(g.ls(gp.path))
    stats = []
    for i in range(0, len(names), BATCH):  # one message of the appliance's protocol each
        stats += g.lstatnslist(gp.path, names[i : i + BATCH])
    if len(stats) != len(names):  # zip(strict=True) is Python 3.10+; EL9 runs 3.9
        raise GuestError(
            "%s: libguestfs listed %d names but %d stats" % (gp.path, len(names), len(stats))
        )
    return [entry(view, gp.path, n, s) for n, s in zip(names, stats)]


def overview(view: GuestView) -> dict:
    return {
        "target": view.sel.target,
        "point": view.sel.point,
        "disks": [
            {
                "drive": "/dev/sd%s" % chr(ord("a") + i),
                "vdi": c.vdi_uuid,
                "userdevice": m.userdevice,
            }
            for i, (c, m) in enumerate(view.sel.disks)
        ],
        "filesystems": [{"device": d, "type": t} for d, t in view.fs.items()],
        "encrypted": view.locked,
        "os": view.os,
    }
