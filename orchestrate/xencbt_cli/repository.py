"""The backup repository: REPO/<vm-uuid>/<vdi-uuid>/<point>.qcow2 + <point>.json.

A point exists when its manifest exists.  Images are written as ``<point>.qcow2.partial``
and renamed before the manifest is written (temp file, fsync, rename, fsync of the
directory), so a crash never leaves a half-visible point; whatever a crash leaves
behind (``*.partial``, ``*.tmp``, images without a manifest) is removed by the next
writer of that chain, under the chain's lock (``.lock``, fcntl).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from . import image
from .errors import LockBusy, RepositoryError

log = logging.getLogger(__name__)

FORMAT = 1
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
POINT = re.compile(r"^\d{8}T\d{6}\.\d{6}Z$")


def new_point_id(now: datetime.datetime | None = None) -> str:
    """A sortable UTC timestamp, e.g. 20250102T030405.678901Z."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    return now.strftime("%Y%m%dT%H%M%S.%fZ")


@dataclass
class Manifest:
    point: str
    vm_uuid: str
    vm_name: str
    vdi_uuid: str
    vdi_name: str
    userdevice: str
    snapshot_uuid: str
    type: str  # full | incremental
    virtual_size: int
    sha256: str
    reason: str | None = None  # why a full was taken
    base_point: str | None = None
    changed_bytes: int = 0
    bytes_on_disk: int = 0
    started: str = ""
    finished: str = ""
    seconds: float = 0.0
    copy_seconds: float = 0.0
    history: list[str] = field(default_factory=list)  # e.g. what prune merged into it
    format: int = FORMAT

    @property
    def image(self) -> str:
        return self.point + ".qcow2"

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        data = json.loads(text)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def write_atomically(path: Path, text: str) -> None:
    """tmp file, fsync, rename, fsync the directory."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    image.fsync_dir(path.parent)


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

    def points(self) -> list[Manifest]:
        if not self.path.is_dir():
            return []
        found = []
        for p in sorted(self.path.glob("*.json")):
            if not POINT.match(p.stem):
                continue
            try:
                found.append(Manifest.from_json(p.read_text(encoding="utf-8")))
            except (ValueError, TypeError) as e:
                raise RepositoryError("manifest %s is unreadable: %s" % (p, e)) from None
        return found

    def latest(self) -> Manifest | None:
        points = self.points()
        return points[-1] if points else None

    def get(self, point: str | None) -> Manifest:
        points = self.points()
        if not points:
            raise RepositoryError("%s has no backup points" % self)
        if point is None:
            return points[-1]
        for m in points:
            if m.point == point:
                return m
        raise RepositoryError(
            "no point %s for VDI %s (xencbt list shows them)" % (point, self.vdi_uuid)
        )

    def commit(self, manifest: Manifest) -> None:
        """Make a point exist: its image (already renamed) first, then its manifest."""
        write_atomically(self.manifest_path(manifest.point), manifest.to_json())

    def publish_image(self, point: str) -> Path:
        """Rename ``<point>.qcow2.partial`` to ``<point>.qcow2`` durably."""
        partial, final = self.partial_path(point), self.image_path(point)
        image.fsync(partial)
        os.replace(partial, final)
        image.fsync_dir(self.path)
        return final

    def remove(self, point: str) -> None:
        """Forget a point: manifest first (it stops existing), then its image."""
        with contextlib.suppress(FileNotFoundError):
            self.manifest_path(point).unlink()
        image.fsync_dir(self.path)
        with contextlib.suppress(FileNotFoundError):
            self.image_path(point).unlink()

    @contextlib.contextmanager
    def lock(self, wait: bool = False) -> Iterator[None]:
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
                raise LockBusy(
                    "VDI %s is locked by another xencbt process (a backup or prune of the "
                    "same VM is running): try later, or pass --wait" % self.vdi_uuid
                ) from None
            yield
        finally:
            os.close(fd)  # releases the lock

    def clean(self) -> list[str]:
        """Remove what an interrupted run left.  Call with the lock held."""
        from . import prune  # a prune interrupted half-way is rolled forward first

        prune.recover(self)
        named = {m.point for m in self.points()}
        removed = []
        for p in sorted(self.path.iterdir()):
            stem = p.name.split(".qcow2")[0]
            leftover = p.name.endswith((".partial", ".tmp")) or (
                p.suffix == ".qcow2" and stem not in named
            )
            if leftover:
                p.unlink()
                removed.append(p.name)
        if removed:
            log.info("%s: removed leftovers of an interrupted run: %s", self, ", ".join(removed))
        return removed


class Repository:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def require(self) -> None:
        if not self.root.is_dir():
            raise RepositoryError("repository %s does not exist" % self.root)

    def chain(self, vm_uuid: str, vdi_uuid: str) -> Chain:
        return Chain(self.root / vm_uuid / vdi_uuid)

    def chains(self) -> list[Chain]:
        self.require()
        found = []
        for vm_dir in sorted(self.root.iterdir()):
            if vm_dir.is_dir() and UUID.match(vm_dir.name):
                found += [Chain(d) for d in sorted(vm_dir.iterdir()) if UUID.match(d.name)]
        return found

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
