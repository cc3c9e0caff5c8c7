"""File-level restore: list and extract files of a backup point, read-only, without root.

TARGET is a VM (every disk of it at one point, so an LVM volume group spanning disks
works) or one VDI, named as ``xencbt list`` shows them (uuid, unique prefix or name).
The point's qcow2 images are opened read-only in a libguestfs appliance (guestfs.py).

A PATH is either ``FS:/dir`` — a file system as ``files ls`` names it (``/dev/sda1``,
``/dev/vg0/root``) and a path inside it — or ``/dir``, a path under the root of the
operating system libguestfs finds on the disks (its fstab's mount points mounted).

Paths and listings: guest_view.py; extraction (get): extract.py.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import posixpath
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import CliError, RepositoryError, UsageError
from ..repo import image, repokey
from ..repo.manifest import Manifest
from ..repo.repository import Chain, Repository
from .extract import collect, to_dir, to_tar
from .guest_view import GuestView, Selection, check_path, listing, overview, parse_path
from .guestfs import Guest

log = logging.getLogger(__name__)


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


# --- ls -----------------------------------------------------------------------------


# --- get ----------------------------------------------------------------------------


# --- the command --------------------------------------------------------------------


def read_key(path: str | None) -> str | None:
    if path is None:
        return None
    with open(path, encoding="utf-8") as f:
        return f.read().rstrip("\n")


@dataclass
class FilesRequest:
    """What ``xencbt files`` was asked (commands/files_cmd.py builds it)."""

    action: str  # ls | get
    target: str
    paths: list[str]
    at: str | None = None
    to: str | None = None
    tar: str | None = None
    force: bool = False
    guest_key_file: str | None = None


def precheck(args: FilesRequest) -> None:
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


def run(args: FilesRequest, repo: Repository, say: Callable[[str], None]) -> dict | list:
    precheck(args)
    sel = point_disks(repo, args.target, args.at)
    key = read_key(args.guest_key_file)
    say("xencbt: %s at point %s: %d disk(s), read-only" % (sel.target, sel.point, len(sel.disks)))
    with (
        read_locks(sel, say),
        drives(sel) as (paths, nbd),
        Guest(paths, say, nbd).opened() as guest,
    ):
        view = GuestView(guest, sel, say, key)
        if args.action == "ls":
            if not args.paths:
                return overview(view)
            return listing(view, parse_path(args.paths[0], view.fs, view.locked))
        items = collect(view, args.paths)
        if args.tar:
            return to_tar(view, items, args.tar, args.force)
        return to_dir(view, items, Path(args.to), args.force)


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
