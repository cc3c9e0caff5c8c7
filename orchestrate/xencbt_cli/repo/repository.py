"""The backup repository: REPO/<vm-uuid>/<vdi-uuid>/<point>.qcow2 + .sums + .json.

A point exists when its manifest exists.  Images are written as ``<point>.qcow2.partial``
and renamed, then its chunk digests (``<point>.sums``, digest.py) and last its manifest
are written atomically (temp file, fsync, rename, fsync of the directory), so a crash
never leaves a half-visible point and a visible manifest always has its sums; whatever a
crash leaves behind (``*.partial``, ``*.tmp``, images and sums without a manifest that
no other image is backed by) is removed by the next writer of that chain (backup, prune,
repair), under the chain's lock (``.lock``, fcntl; readers such as verify take it shared).

A manifest that cannot be read (damaged by hand or by the disk) hides only its own
point: the other points stay usable, ``damaged()`` names it, and its image is kept.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from xencbt_core.params import UUID

from ..errors import CliError, LockBusy, RepositoryError
from ..proc import qemu_img
from . import journal, layout, repokey
from .layout import (
    LEFTOVER,
    LOCK,
    POINT,
    PRIVATE_DIR,
    PRIVATE_FILE,
    SETTINGS,
    exposed,
    make_dirs,
    write_atomically,
)
from .manifest import Manifest, nearest

log = logging.getLogger(__name__)


class Chain:
    """The points of one VDI, oldest first."""

    def __init__(self, path: Path):
        self.path = path
        self.vm_uuid = path.parent.name
        self.vdi_uuid = path.name

    def __repr__(self) -> str:
        return "Chain(%s/%s)" % (self.vm_uuid, self.vdi_uuid)

    def manifest_path(self, point: str) -> Path:
        return self.path / (point + ".json")

    def image_path(self, point: str) -> Path:
        return self.path / (point + ".qcow2")

    def partial_path(self, point: str) -> Path:
        return self.path / (point + ".qcow2.partial")

    def sums_path(self, point: str) -> Path:
        return self.path / (point + ".sums")

    def manifest_files(self) -> list[Path]:
        if not self.path.is_dir():
            return []
        return [p for p in sorted(self.path.glob("*.json")) if POINT.match(p.stem)]

    def load(self) -> tuple[list[Manifest], dict[str, str]]:
        found, damaged = [], {}
        for p in self.manifest_files():
            try:
                found.append(Manifest.from_json(p.read_text(encoding="utf-8")))
            except (ValueError, TypeError, UnicodeDecodeError) as e:
                damaged[p.stem] = "%s: %s" % (type(e).__name__, e)
        return found, damaged

    def points(self) -> list[Manifest]:
        """The points whose manifest reads, oldest first."""
        return self.load()[0]

    def damaged(self) -> dict[str, str]:
        """point -> why its manifest cannot be read."""
        return self.load()[1]

    def latest(self) -> Manifest | None:
        points = self.points()
        return points[-1] if points else None

    def get(self, point: str | None) -> Manifest:
        """The point ``point`` names (its id or a unique prefix of it), else the newest."""
        points, damaged = self.load()
        if point is not None:
            point = self.resolve(point, [m.point for m in points], damaged)
        if point in damaged:
            usable = nearest(point, [m.point for m in points])
            raise RepositoryError(
                "the manifest of point %s of VDI %s is unreadable (%s): xencbt cannot "
                "restore that point; xencbt verify lists the damage; %s"
                % (
                    point,
                    self.vdi_uuid,
                    damaged[point],
                    "the nearest usable point is %s (--at %s)" % (usable[0], usable[0])
                    if usable
                    else "no other point of this VDI is usable",
                )
            )
        if not points:
            raise RepositoryError("%s has no backup points" % self)
        if point is None:
            return points[-1]
        return next(m for m in points if m.point == point)

    def resolve(self, prefix: str, readable: list[str], damaged: dict[str, str]) -> str:
        """The one point id ``prefix`` starts (a whole id always names itself)."""
        ids = sorted({*readable, *damaged})
        if prefix in ids:
            return prefix
        matches = [p for p in ids if prefix and p.startswith(prefix)]
        if len(matches) == 1:
            return matches[0]
        if matches:
            raise RepositoryError(
                "point %s of VDI %s is ambiguous: %d points start with it (%s, …): give more "
                "of it" % (prefix, self.vdi_uuid, len(matches), ", ".join(matches[:2]))
            )
        raise RepositoryError(
            "no point %s for VDI %s (xencbt list shows them)" % (prefix, self.vdi_uuid)
        )

    def commit(self, manifest: Manifest, sums: bytes | None = None) -> None:
        """Make a point exist: its image (already renamed) first, then its sums, then its
        manifest."""
        if sums is not None:
            path = self.sums_path(manifest.point)
            write_atomically(path, repokey.sealed(path, sums))  # they reveal content
        write_atomically(self.manifest_path(manifest.point), manifest.to_json())

    def reserve(self, point: str) -> Path:
        """An empty private ``<point>.qcow2.partial`` for a copy to write into: the tool
        keeps its mode, whatever umask it runs with (nbdkit sets its own, 022)."""
        partial = self.partial_path(point)
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_FILE)
        os.fchmod(fd, PRIVATE_FILE)
        os.close(fd)
        return partial

    def publish_image(self, point: str) -> Path:
        """Rename ``<point>.qcow2.partial`` to ``<point>.qcow2`` durably (and private)."""
        partial, final = self.partial_path(point), self.image_path(point)
        os.chmod(partial, PRIVATE_FILE)
        layout.fsync(partial)
        os.replace(partial, final)
        layout.fsync_dir(self.path)
        return final

    def remove(self, point: str) -> None:
        """Forget a point: manifest first (it stops existing), then its image and sums."""
        with contextlib.suppress(FileNotFoundError):
            self.manifest_path(point).unlink()
        layout.fsync_dir(self.path)
        for path in (self.image_path(point), self.sums_path(point)):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    @contextlib.contextmanager
    def lock(self, wait: bool = False, shared: bool = False) -> Iterator[None]:
        """Exclusive for writers; ``shared`` for readers (verify, serve), which then never
        see a writer's work in progress, and which need no write access at all."""
        fd = self._open_lock(shared)
        if fd is None:
            yield
            return
        try:
            mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
                if not wait:
                    raise self._busy(shared) from None
                # A wait can be long (a whole backup): say for whom.
                log.warning(
                    "VDI %s is in use by %s: waiting for it",
                    self.vdi_uuid,
                    ", ".join(holders(self.path / LOCK)) or "another xencbt",
                )
                fcntl.flock(fd, mode)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _open_lock(self, shared: bool) -> int | None:
        """The lock file's descriptor; for a reader, read-only, and None when it cannot be
        had: a read-only file system (nobody can change the chain, so no lock is needed),
        or a user who may read the repository but not create or open its lock."""
        path = self.path / LOCK
        if not shared:
            make_dirs(self.path)
            return os.open(path, os.O_RDWR | os.O_CREAT, PRIVATE_FILE)
        try:
            return os.open(path, os.O_RDONLY | os.O_CREAT, PRIVATE_FILE)
        except OSError as e:
            if e.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
                raise
            # Only whole points (a manifest written last) are visible without it.
            log.info("%s: reading without the chain's lock (%s)", self, e.strerror)
            return None

    def _busy(self, shared: bool) -> LockBusy:
        holder = ", ".join(holders(self.path / LOCK))
        if shared:
            return LockBusy(
                "VDI %s is being backed up or pruned by another xencbt process (%s): try "
                "again when it is done" % (self.vdi_uuid, holder or "a backup or prune")
            )
        return LockBusy(
            "VDI %s is locked by another xencbt process (%s): try later, or pass --wait"
            % (self.vdi_uuid, holder or "a backup, prune, verify or serve")
        )

    def backing_names(self) -> set[str] | None:
        """Names of the images some image of this chain is backed by; None when an image
        cannot be read (then nothing may be judged unused)."""
        names = set()
        for p in self.path.glob("*.qcow2"):
            try:
                backing = qemu_img.backing(p)
            except CliError as e:
                log.warning("%s: cannot read %s: %s", self, p.name, e)
                return None
            if backing:
                names.add(os.path.basename(backing))
        return names

    def orphans(self) -> tuple[list[str], list[str]]:
        """Images without a manifest: (unused ones, ones another image is backed by).

        The first are what an interrupted run leaves; the second mean a manifest was lost
        while newer points still need the image, which must then be kept."""
        named = {p.stem for p in self.manifest_files()}
        orphans = [p.name for p in sorted(self.path.glob("*.qcow2")) if p.stem not in named]
        if not orphans:
            return [], []
        used = self.backing_names()
        if used is None:
            return [], orphans
        return [o for o in orphans if o not in used], [o for o in orphans if o in used]

    def stray_sums(self) -> list[str]:
        """Sums without a manifest: a backup killed before its manifest, or a removal
        (prune) killed after it."""
        named = {p.stem for p in self.manifest_files()}
        return [p.name for p in sorted(self.path.glob("*.sums")) if p.stem not in named]

    def leftovers(self) -> list[str]:
        """What an interrupted run left and ``clean`` removes (read-only)."""
        if not self.path.is_dir():
            return []
        temp = [p.name for p in sorted(self.path.iterdir()) if p.name.endswith(LEFTOVER)]
        return sorted(temp + self.orphans()[0] + self.stray_sums())

    def clean(self) -> list[str]:
        """Remove what an interrupted run left.  Call with the lock held."""
        journal.recover(self)  # a prune interrupted half-way is rolled forward first
        removed = self.leftovers()
        for name in removed:
            (self.path / name).unlink()
        if removed:
            layout.fsync_dir(self.path)
            log.info("%s: removed leftovers of an interrupted run: %s", self, ", ".join(removed))
        return removed


def holders(path: Path) -> list[str]:
    """Who holds the flock of ``path``, e.g. ['xencbt backup, pid 123'], from /proc/locks
    (the kernel's word: nothing to write, so readers without write access count too)."""
    try:
        st = os.stat(path)
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return []
    me = "%02x:%02x:%d" % (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
    found = []
    for line in lines:
        words = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF"; waiters have a "->".
        if len(words) >= 6 and words[1] == "FLOCK" and words[5] == me:
            found.append(describe_holder(int(words[4])))
    return sorted(set(found))


def describe_holder(pid: int) -> str:
    try:
        argv = Path("/proc/%d/cmdline" % pid).read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return "pid %d" % pid
    commands = ("backup", "prune", "repair", "serve", "verify", "restore", "list", "copy")
    what = next((a for a in argv[1:] if a in commands), None)
    return "xencbt %s, pid %d" % (what, pid) if what else "pid %d" % pid


class Repository:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def require(self) -> None:
        if not self.root.is_dir():
            raise RepositoryError("repository %s does not exist" % self.root)

    def marked(self) -> bool:
        """Whether this is a repository: its settings file, or (made by an xencbt older
        than settings) a point's manifest."""
        return (self.root / SETTINGS).is_file() or any(c.manifest_files() for c in self.chains())

    def require_marked(self) -> None:
        """RepositoryError for a folder that is not a repository: repair touches nothing
        of it (a repair of /tmp would otherwise lock every user out)."""
        self.require()
        if not self.marked():
            raise RepositoryError(
                "%s is not an xencbt repository (no %s, no backup point): nothing was "
                "changed; check --repo (xencbt init --repo DIR makes one)" % (self.root, SETTINGS)
            )

    def chain(self, vm_uuid: str, vdi_uuid: str) -> Chain:
        return Chain(self.root / vm_uuid / vdi_uuid)

    def create(self) -> None:
        make_dirs(self.root)

    def claim(self) -> int | None:
        """``init``'s folder, private (0700): made so; or an existing empty folder (an
        administrator's mkdir) made private, returning the mode it had.  An existing
        world-writable folder that holds anything is refused: it is a shared folder
        (/tmp), not one to lock everyone else out of; another existing folder that holds
        files keeps its mode (``repair`` makes a repository's own files private)."""
        mode = exposed(self.root) if self.root.is_dir() else None
        if mode is not None and any(self.root.iterdir()):
            if not mode & 0o002:
                return None
            raise RepositoryError(
                "%s is writable by every user (mode %04o) and not empty: a shared folder, "
                "no repository (a repository is private, 0700); nothing was changed: give a "
                "new folder (xencbt init makes it), e.g. --repo %s"
                % (self.root, mode, self.root / "xencbt")
            )
        make_dirs(self.root)
        if mode is not None:
            os.chmod(self.root, PRIVATE_DIR)
        return mode

    def chains(self) -> list[Chain]:
        self.require()
        found = []
        for vm_dir in sorted(self.root.iterdir()):
            if vm_dir.is_dir() and UUID.match(vm_dir.name):
                found += [Chain(d) for d in sorted(vm_dir.iterdir()) if UUID.match(d.name)]
        return found

    def chains_by_vm(self, wanted: list[str]) -> dict[str, list[Chain]]:
        """vm uuid -> its chains, for the VMs ``wanted`` names (uuid, prefix or name as its
        points record it; none: every VM)."""
        found: dict[str, list[Chain]] = {}
        for chain in self.chains():
            found.setdefault(chain.vm_uuid, []).append(chain)
        if not wanted:
            return found
        chosen = {}
        for want in wanted:
            matches = [u for u, cs in found.items() if u.startswith(want) or want in vm_names(cs)]
            if len(matches) != 1:
                raise RepositoryError(
                    "%s VM matching %s in %s (xencbt list shows them)"
                    % ("no" if not matches else "more than one", want, self.root)
                )
            chosen[matches[0]] = found[matches[0]]
        return chosen

    def vm_chains(self, vm_uuid: str) -> list[Chain]:
        """The chains of one VM (none when the repository has no such VM)."""
        vm_dir = self.root / vm_uuid
        if not vm_dir.is_dir():
            return []
        return [Chain(d) for d in sorted(vm_dir.iterdir()) if UUID.match(d.name)]

    def find(self, vdi: str) -> Chain:
        """The chain of a VDI uuid (or an unambiguous prefix of it)."""
        matches = [c for c in self.chains() if c.vdi_uuid.startswith(vdi)]
        if len(matches) != 1:
            what = "no" if not matches else "more than one"
            raise RepositoryError(
                "%s VDI matching %s in %s (xencbt list shows them)" % (what, vdi, self.root)
            )
        return matches[0]

    def needed_snapshots(self) -> set[str]:
        """Snapshot uuids the next incremental of some chain will diff against."""
        needed = set()
        for chain in self.chains():
            latest = chain.latest()
            if latest:
                needed.add(latest.snapshot_uuid)
        return needed

    def exposed(self) -> dict[Path, int]:
        """Directories and files of the repository other users may use: path -> mode.
        Only what xencbt makes: the root, its settings, the VMs' trees; not a file of
        someone else's beside them."""
        self.require()
        found = {}
        paths = [self.root]
        for vm_dir in sorted(self.root.iterdir()):
            if vm_dir.is_dir() and UUID.match(vm_dir.name):
                paths += [vm_dir, *sorted(vm_dir.rglob("*"))]
            elif vm_dir.name == SETTINGS and vm_dir.is_file():  # repoconfig.py
                paths.append(vm_dir)
        for path in paths:
            if path.is_symlink():
                continue
            mode = exposed(path)
            if mode is not None:
                found[path] = mode
        return found

    def tighten(self) -> dict[Path, int]:
        """Make every directory 0700 and file 0600; returns what was open: path -> mode."""
        found = self.exposed()
        for path in found:
            os.chmod(path, PRIVATE_DIR if path.is_dir() else PRIVATE_FILE)
        return found


def vm_names(chains: list[Chain]) -> set[str]:
    """The names a VM had in its points (a VM is named by any of them)."""
    return {m.vm_name for chain in chains for m in chain.points()}
