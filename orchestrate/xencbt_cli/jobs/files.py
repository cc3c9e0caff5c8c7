"""File-level restore: list and extract files of a backup point, read-only, without root.

TARGET is a VM (every disk of it at one point, so an LVM volume group spanning disks
works) or one VDI, named as ``xencbt list`` shows them (uuid, unique prefix or name).
The point's qcow2 images are opened read-only in a libguestfs appliance (guest.py).

A PATH is either ``FS:/dir`` — a file system as ``files ls`` names it (``/dev/sda1``,
``/dev/vg0/root``) and a path inside it — or ``/dir``, a path under the root of the
operating system libguestfs finds on the disks (its fstab's mount points mounted).

Extraction never writes outside ``--to``: names come from the guest one component at a
time and must be plain names, guest symlinks are recreated as symlinks and never
followed, an existing symlink or file in the way is refused (``--force`` replaces files
and links by renaming over them, never writing through them), and everything is first
written into a private staging directory inside ``--to``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import logging
import os
import posixpath
import shutil
import stat
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CliError, RepositoryError, UsageError
from ..repo import image, repokey
from ..repo.manifest import Manifest
from ..repo.repository import Chain, Repository
from .guestfs import Guest, GuestError

log = logging.getLogger(__name__)

BATCH = 500
KEEP_MODE = 0o1777
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


# --- which images ---------------------------------------------------------------------


def _chains_of(repo: Repository, target: str) -> list[tuple[Chain, list[Manifest]]]:
    """Chains TARGET names: a VM (uuid, prefix or name) or one VDI (uuid, prefix or name)."""
    found = [(c, c.points()) for c in repo.chains()]
    found = [(c, ms) for c, ms in found if ms]
    vms = {c.vm_uuid for c, ms in found if c.vm_uuid.startswith(target) or ms[-1].vm_name == target}
    vdis = [
        (c, ms) for c, ms in found if c.vdi_uuid.startswith(target) or ms[-1].vdi_name == target
    ]
    if len(vms) == 1 and not vdis:
        return [(c, ms) for c, ms in found if c.vm_uuid in vms]
    if len(vdis) == 1 and not vms:
        return vdis
    what = "more than one VM or VDI" if vms or vdis else "no VM or VDI"
    raise RepositoryError(
        "%s matching %s in %s (xencbt list shows them)" % (what, target, repo.root)
    )


def point_disks(repo: Repository, target: str, at: str | None) -> Selection:
    """The one place that says which disk images make up TARGET at point ``at`` (newest
    by default).  A backup run of a VM gives every disk's point the same id, so a VM
    point is the set of its chains' points with that id."""
    chains = _chains_of(repo, target)
    ids = sorted({m.point for _, ms in chains for m in ms})
    point = at or ids[-1]
    if point not in ids:  # a unique prefix of an id names it, as for restore and serve
        matches = [p for p in ids if p.startswith(point)]
        if len(matches) > 1:
            raise RepositoryError(
                "point %s of %s is ambiguous: %d points start with it (%s, …): give more of it"
                % (point, target, len(matches), ", ".join(matches[:2]))
            )
        if not matches:
            raise RepositoryError(
                "no point %s for %s (xencbt list shows them; newest: %s)" % (point, target, ids[-1])
            )
        point = matches[0]
    disks = []
    for chain, ms in chains:
        m = next((m for m in ms if m.point == point), None)
        if m is None:
            log.warning("VDI %s has no point %s: its disk is left out", chain.vdi_uuid, point)
        else:
            disks.append((chain, m))
    disks.sort(key=lambda d: int(d[1].userdevice) if d[1].userdevice.isdigit() else 99)
    return Selection(target, point, disks, ids)


@contextlib.contextmanager
def read_locks(sel: Selection, say: Callable[[str], None]) -> Iterator[None]:
    """Each chain's lock, shared, for as long as its images are open: a prune (which merges
    and removes points) waits.  A repository that cannot be written has nobody to wait
    for: without a lock file to open, none is taken."""
    fds = []
    try:
        for chain, _ in sel.disks:
            try:
                fd = os.open(chain.path / ".lock", os.O_RDONLY)
            except OSError as e:
                log.info("%s: no lock taken (%s): the repository is read-only here", chain, e)
                continue
            fds.append(fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
                say("xencbt: waiting for the backup or prune of VDI %s to finish" % chain.vdi_uuid)
                fcntl.flock(fd, fcntl.LOCK_SH)
        yield
    finally:
        for fd in fds:
            os.close(fd)


# --- paths in the guest ---------------------------------------------------------------


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


class Session:
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


# --- ls -----------------------------------------------------------------------------


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


def entry(session: Session, parent: str, name: str, st: dict) -> dict:
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
        row["target"] = session.guest.g.readlink(path)
    return row


def listing(session: Session, gp: GuestPath, st: dict | None = None) -> list[dict]:
    """The entries of a directory, or the file ``gp`` is; ``st`` given: a directory
    already found."""
    if st is None:
        gp, st = session.find(gp)
    g = session.guest.g
    if not stat.S_ISDIR(st["st_mode"]):
        parent, name = posixpath.split(gp.path)
        return [entry(session, parent, name, st)]
    names = sorted(g.ls(gp.path))
    stats = []
    for i in range(0, len(names), BATCH):  # one message of the appliance's protocol each
        stats += g.lstatnslist(gp.path, names[i : i + BATCH])
    return [entry(session, gp.path, n, s) for n, s in zip(names, stats, strict=True)]


def overview(session: Session) -> dict:
    return {
        "target": session.sel.target,
        "point": session.sel.point,
        "disks": [
            {
                "drive": "/dev/sd%s" % chr(ord("a") + i),
                "vdi": c.vdi_uuid,
                "userdevice": m.userdevice,
            }
            for i, (c, m) in enumerate(session.sel.disks)
        ],
        "filesystems": [{"device": d, "type": t} for d, t in session.fs.items()],
        "encrypted": session.locked,
        "os": session.os,
    }


def print_overview(info: dict) -> None:
    print("%s at point %s" % (info["target"], info["point"]))
    for d in info["disks"]:
        print("  disk %s = VDI %s (userdevice %s)" % (d["drive"], d["vdi"], d["userdevice"]))
    print("file systems (PATH = FS:/dir):")
    for f in info["filesystems"]:
        print("  %-24s %s" % (f["device"], f["type"]))
    for dev in info["encrypted"]:
        print("  %-24s encrypted (LUKS): --guest-key-file FILE opens it" % dev)
    for found in info["os"]:
        print("operating system: %s (PATH = /dir under its root):" % found["product"])
        for mp, dev in found["mountpoints"].items():
            print("  %-24s %s" % (mp, dev))


def print_listing(rows: list[dict], long: bool) -> None:
    for r in rows:
        if not long:
            print(r["name"] + ("/" if r["type"] == "directory" else ""))
            continue
        when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(r["mtime"]))
        link = " -> %s" % r["target"] if "target" in r else ""
        print("%-10s %s %12d  %s  %s%s" % (r["type"], r["mode"], r["size"], when, r["name"], link))


# --- get ----------------------------------------------------------------------------


@dataclass
class Item:
    """One thing to extract: its guest path and its path relative to the destination."""

    gp: GuestPath
    rel: str
    row: dict


def safe_name(name: str) -> str:
    if name in ("", ".", "..") or "/" in name or "\0" in name:
        raise GuestError("the guest has a file named %r: refusing to extract it" % name)
    return name


def walk(session: Session, gp: GuestPath) -> list[Item]:
    """Everything under ``gp`` (itself first, parents before children); never follows
    symlinks.  The root of a file system or OS (``/``) extracts as its contents."""
    gp, st = session.find(gp)
    parent, name = posixpath.split(gp.path)
    top = Item(gp, safe_name(name) if name else "", entry(session, parent or "/", name, st))
    items, todo = [top], [top]
    while todo:
        item = todo.pop()
        if item.row["type"] != "directory":
            continue
        for row in listing(session, item.gp, DIRECTORY):
            rel = posixpath.join(item.rel, safe_name(row["name"]))
            child = Item(GuestPath(item.gp.fs, row["path"]), rel, row)
            items.append(child)
            todo.append(child)
    return items


def collect(session: Session, texts: list[str]) -> list[Item]:
    items = []
    for text in texts:
        items += walk(session, parse_path(text, session.fs, session.locked))
    rels = [i.rel for i in items if i.rel]
    if len(rels) != len(set(rels)):
        raise UsageError("two PATHs extract to the same name: give them one at a time")
    return items


def fetch(session: Session, item: Item, local: str) -> None:
    session.mount(item.gp)
    session.guest.g.download(item.gp.path, local)


def check_dest(root: Path, items: list[Item], force: bool) -> list[str]:
    """Refuse before writing anything: a symlink or file where a directory goes, or an
    existing file without --force.  Returns what --force replaces."""
    replaced = []
    for item in items:
        if not item.rel:
            continue
        path = root / item.rel
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        if stat.S_ISLNK(st.st_mode) and item.row["type"] == "directory":
            raise CliError("%s is a symlink: refusing to extract through it" % path)
        if stat.S_ISDIR(st.st_mode):
            if item.row["type"] != "directory":
                raise CliError("%s is a directory here: remove it first" % path)
            continue
        if item.row["type"] == "directory":
            raise CliError("%s exists and is not a directory: remove it first" % path)
        if not force:
            raise CliError("%s exists: pass --force to replace it (nothing was written)" % path)
        replaced.append(str(path))
    return replaced


def to_dir(session: Session, items: list[Item], dest: Path, force: bool) -> dict:
    dest.mkdir(parents=True, exist_ok=True)
    root = Path(os.path.realpath(dest))
    replaced = check_dest(root, items, force)
    staging = tempfile.mkdtemp(prefix=".xencbt-get-", dir=root)
    done, skipped, dirs = 0, [], []
    try:
        for n, item in enumerate(items):
            row, final = item.row, root / item.rel if item.rel else root
            if row["type"] == "directory":
                if not os.path.isdir(final) or os.path.islink(final):
                    os.mkdir(final, 0o700)
                dirs.append((final, row))
                continue
            tmp = os.path.join(staging, str(n))
            if row["type"] == "file":
                fetch(session, item, tmp)
                os.chmod(tmp, int(row["mode"], 8) & KEEP_MODE)
            elif row["type"] == "symlink":
                os.symlink(row["target"], tmp)
            else:
                skipped.append(str(item.gp))
                continue
            os.utime(tmp, ns=(row["atime_ns"], row["mtime_ns"]), follow_symlinks=False)
            os.rename(tmp, final)  # replaces a file or a link, never writes through it
            done += 1
        for final, row in reversed(dirs[1:] if dirs and dirs[0][0] == root else dirs):
            # after their contents, which change mtime; --to itself keeps its own
            os.chmod(final, int(row["mode"], 8) & KEEP_MODE)
            os.utime(final, ns=(row["atime_ns"], row["mtime_ns"]))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {
        "to": str(root),
        "files": done,
        "directories": len(dirs),
        "replaced": replaced,
        "skipped": skipped,
    }


def tar_info(item: Item) -> tarfile.TarInfo:
    row = item.row
    info = tarfile.TarInfo(item.rel or ".")
    info.mode = int(row["mode"], 8) & KEEP_MODE
    info.mtime = row["mtime"]
    info.type = {"directory": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE}.get(
        row["type"], tarfile.REGTYPE
    )
    if row["type"] == "symlink":
        info.linkname = row["target"]
    if row["type"] == "file":
        info.size = row["size"]
    return info


def write_tar(session: Session, items: list[Item], out) -> dict:
    done, skipped = 0, []
    with (
        tempfile.TemporaryDirectory(prefix="xencbt-tar-") as private,
        tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar,
    ):
        for item in items:
            kind_ = item.row["type"]
            if kind_ not in ("file", "directory", "symlink"):
                skipped.append(str(item.gp))
                continue
            info = tar_info(item)
            if kind_ != "file":
                tar.addfile(info)
                continue
            local = os.path.join(private, "f")
            fetch(session, item, local)
            info.size = os.path.getsize(local)
            with open(local, "rb") as f:
                tar.addfile(info, f)
            os.unlink(local)
            done += 1
    return {"files": done, "skipped": skipped}


def to_tar(session: Session, items: list[Item], target: str, force: bool) -> dict:
    if target == "-":
        if sys.stdout.isatty():
            raise UsageError("--tar -: stdout is a terminal; redirect it to a file or a pipe")
        result = write_tar(session, items, sys.stdout.buffer)
        sys.stdout.buffer.flush()
        return {"tar": "-", **result}
    path = Path(target)
    partial = path.with_name(path.name + ".partial")
    try:
        with open(partial, "xb") as out:
            result = write_tar(session, items, out)
        if path.exists() and not force:  # checked before too; a race must not clobber it
            raise CliError("%s exists: pass --force to replace it" % path)
        os.replace(partial, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
    return {"tar": str(path), **result}


# --- the command --------------------------------------------------------------------


def read_key(path: str | None) -> str | None:
    if path is None:
        return None
    with open(path, encoding="utf-8") as f:
        return f.read().rstrip("\n")


def precheck(args) -> None:
    """Refusals that need no appliance (cheap, and nothing boots for nothing)."""
    for text in args.paths:
        fs, sep, rest = text.partition(":")
        check_path(text, (rest or "/") if sep and fs.startswith("/dev/") else text)
    if args.action == "get":
        if not args.paths:
            raise UsageError("files get: name at least one PATH")
        if args.tar and args.tar != "-" and os.path.lexists(args.tar) and not args.force:
            raise CliError("%s exists: pass --force to replace it (nothing was written)" % args.tar)
        if args.to and os.path.lexists(args.to) and not os.path.isdir(args.to):
            raise CliError("--to %s exists and is not a directory" % args.to)
        for text in args.paths if args.to else ():
            name = posixpath.basename(text.rstrip("/"))
            local = os.path.join(args.to, name)
            if name and os.path.lexists(local) and not os.path.isdir(local) and not args.force:
                raise CliError(
                    "%s exists: pass --force to replace it (nothing was written)" % local
                )
    elif len(args.paths) > 1:
        raise UsageError("files ls: one PATH at most")


def run(args, repo: Repository, say: Callable[[str], None]) -> dict | list:
    precheck(args)
    sel = point_disks(repo, args.target, args.at)
    key = read_key(args.guest_key_file)
    say("xencbt: %s at point %s: %d disk(s), read-only" % (sel.target, sel.point, len(sel.disks)))
    with (
        read_locks(sel, say),
        drives(sel) as (paths, nbd),
        Guest(paths, say, nbd).opened() as guest,
    ):
        session = Session(guest, sel, say, key)
        if args.action == "ls":
            if not args.paths:
                return overview(session)
            return listing(session, parse_path(args.paths[0], session.fs, session.locked))
        items = collect(session, args.paths)
        if args.tar:
            return to_tar(session, items, args.tar, args.force)
        return to_dir(session, items, Path(args.to), args.force)


@contextlib.contextmanager
def drives(sel) -> Iterator[tuple[list, bool]]:
    """What libguestfs opens: the images themselves, or, in an encrypted repository, each
    chain served by qemu-nbd (image.exported), as libguestfs's add_drive takes no key
    for a LUKS qcow2 and opens backing files by their header names."""
    if repokey.of(sel.images()[0]) is None:
        yield sel.images(), False
        return
    with image.exported(sel.images()) as sockets:
        yield sockets, True


def print_result(result: dict | list, long: bool) -> None:
    if isinstance(result, dict):
        print_overview(result)
    else:
        print_listing(result, long)


def summary(result: dict) -> str:
    where = "to %s" % result["to"] if "to" in result else "into tar %s" % result["tar"]
    text = "%d files %s" % (result["files"], where)
    if result.get("skipped"):
        text += "; skipped (not files, links or directories): %s" % ", ".join(result["skipped"])
    return text
