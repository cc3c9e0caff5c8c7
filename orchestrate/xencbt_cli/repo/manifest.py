"""A disk point's manifest (``<point>.json``): what was backed up, how to check it, and
how the point relates to the others of its chain; and point ids (sortable UTC times)."""

from __future__ import annotations

import datetime
import json
from dataclasses import asdict, dataclass, field, fields

from ..proc import testhook
from .layout import FORMAT


def nearest(point: str, others: list[str]) -> list[str]:
    """``others`` ordered by how close in time they are to ``point`` (ids sort by time),
    the older first of two as close."""
    ids = sorted({*others, point})
    at = ids.index(point)
    return sorted(others, key=lambda p: (abs(ids.index(p) - at), p > point))


def new_point_id(now: datetime.datetime | None = None) -> str:
    """A sortable UTC timestamp, e.g. 20250102T030405.678901Z."""
    now = (now or testhook.now()).astimezone(datetime.timezone.utc)
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
    digest: str | None = None  # digest.py: over the chunk digests in <point>.sums
    digest_kind: str | None = None
    chunk_size: int | None = None
    hashed_bytes: int = 0  # what the backup read from its image to compute the digest
    sha256: str | None = None  # format 1: of the whole flattened disk
    reason: str | None = None  # why a full was taken
    base_point: str | None = None
    changed_bytes: int = 0
    bytes_on_disk: int = 0
    compression: str = "none"  # of the image's clusters (repoconfig.py)
    ratio: float | None = None  # changed_bytes / bytes_on_disk, when both are known
    started: str = ""
    finished: str = ""
    seconds: float = 0.0
    copy_seconds: float = 0.0
    history: list[str] = field(default_factory=list)  # e.g. what prune merged into it
    # The CBT canary of an incremental, or of the full a failed one caused
    # (jobs/canary.py); None: a full, or a point older than the canary.
    canary: dict | None = None
    format: int = FORMAT

    def compression_ratio(self) -> float | None:
        """How many times smaller the point is on disk than the data it holds changed."""
        changed, on_disk = self.changed_bytes, self.bytes_on_disk
        return round(changed / on_disk, 2) if changed and on_disk else None

    @property
    def image(self) -> str:
        return self.point + ".qcow2"

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        data = json.loads(text)
        known = {f.name for f in fields(cls)}
        m = cls(**{k: v for k, v in data.items() if k in known})
        m.check()
        return m

    def check(self) -> None:
        """ValueError unless the manifest says how to check its content: a chunked digest
        (format 2) or a whole-disk sha256 (format 1)."""
        if self.digest is not None:
            chunk = self.chunk_size
            if not isinstance(self.digest, str) or not isinstance(chunk, int) or chunk <= 0:
                raise ValueError("its digest has no valid chunk_size")
        elif not isinstance(self.sha256, str):
            raise ValueError("it records neither a digest nor a sha256 of the disk")
