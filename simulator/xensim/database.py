"""The pool database: records by class and opaque reference, persisted atomically.

Records hold the API's field names; keys starting with ``_`` are simulator-internal and
never leave the server. Reverse links (VM.VBDs, VDI.snapshots, SR.VDIs, …) are not
stored: they are computed from forward links when a record is read, so they cannot drift.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import threading
import uuid as uuidlib
from pathlib import Path

from .errors import ServerError, handle_invalid, uuid_invalid

log = logging.getLogger(__name__)

NULL_REF = "OpaqueRef:NULL"
CLASSES = ("pool", "host", "network", "PIF", "SR", "PBD", "VM", "VBD", "VDI", "task", "VIF", "VTPM")
CLASSES += ("VUSB", "VGPU", "PCI", "VM_guest_metrics")

# (class, field) -> (class holding the forward link, name of that link field)
REVERSE = {
    ("host", "PIFs"): ("PIF", "host"),
    ("host", "PBDs"): ("PBD", "host"),
    ("network", "PIFs"): ("PIF", "network"),
    ("SR", "VDIs"): ("VDI", "SR"),
    ("SR", "PBDs"): ("PBD", "SR"),
    ("VM", "VBDs"): ("VBD", "VM"),
    ("VM", "snapshots"): ("VM", "snapshot_of"),
    ("VDI", "VBDs"): ("VBD", "VDI"),
    ("VM", "VIFs"): ("VIF", "VM"),
    ("VM", "VTPMs"): ("VTPM", "VM"),
    ("network", "VIFs"): ("VIF", "network"),
    ("VDI", "snapshots"): ("VDI", "snapshot_of"),
    ("VM", "VUSBs"): ("VUSB", "VM"),
    ("VM", "VGPUs"): ("VGPU", "VM"),
    ("host", "resident_VMs"): ("VM", "resident_on"),
    ("host", "PCIs"): ("PCI", "host"),
    ("VM", "children"): ("VM", "parent"),
}


def new_ref() -> str:
    return f"OpaqueRef:{uuidlib.uuid4()}"


def write_atomically(path: Path, text: str, mode: int = 0o600) -> None:
    """temp file, fsync, rename, fsync the directory: never a half-written file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def canonical_class(name: str) -> str | None:
    """xapi matches class names case-insensitively (``task`` and ``Task`` both work)."""
    for cls in CLASSES:
        if cls.lower() == name.lower():
            return cls
    return None


class Database:
    def __init__(self, path: Path, objects: dict[str, dict[str, dict]] | None = None) -> None:
        self.path = Path(path)
        self.objects: dict[str, dict[str, dict]] = {cls: {} for cls in CLASSES}
        if objects:
            for cls, table in objects.items():
                self.objects[cls].update(table)
        # One lock for the whole database; waiters (VDI_IN_USE grace period) use the
        # condition, which releases the lock while they wait.
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)

    @classmethod
    def load(cls, path: Path) -> Database:
        data = json.loads(Path(path).read_text())
        return cls(path, data["objects"])

    def save(self) -> None:
        with self.lock:
            text = json.dumps({"version": 1, "objects": self.objects}, indent=1, sort_keys=True)
            write_atomically(self.path, text)
            self.changed.notify_all()

    # -- access -------------------------------------------------------------------------
    def add(self, cls: str, fields: dict, ref: str | None = None) -> str:
        ref = ref or new_ref()
        fields.setdefault("uuid", str(uuidlib.uuid4()))
        self.objects[cls][ref] = fields
        return ref

    def get(self, cls: str, ref: str) -> dict:
        try:
            return self.objects[cls][ref]
        except KeyError:
            raise handle_invalid(cls, ref) from None

    def exists(self, cls: str, ref: str) -> bool:
        return ref in self.objects[cls]

    def remove(self, cls: str, ref: str) -> None:
        self.get(cls, ref)
        del self.objects[cls][ref]

    def refs(self, cls: str) -> list[str]:
        return list(self.objects[cls])

    def find(self, cls: str, **match: object) -> list[str]:
        return [
            ref
            for ref, rec in self.objects[cls].items()
            if all(rec.get(k) == v for k, v in match.items())
        ]

    def by_uuid(self, cls: str, uuid: str) -> str:
        found = self.find(cls, uuid=uuid)
        if not found:
            raise uuid_invalid(cls, uuid)
        return found[0]

    def field(self, cls: str, ref: str, name: str) -> object:
        rec = self.get(cls, ref)
        if (cls, name) in REVERSE:
            other, link = REVERSE[(cls, name)]
            return self.find(other, **{link: ref})
        if name.startswith("_") or name not in rec:
            raise ServerError("MESSAGE_METHOD_UNKNOWN", f"{cls}.get_{name}")
        return copy.deepcopy(rec[name])

    def record(self, cls: str, ref: str) -> dict:
        rec = self.get(cls, ref)
        out = {k: copy.deepcopy(v) for k, v in rec.items() if not k.startswith("_")}
        for (owner, name), (other, link) in REVERSE.items():
            if owner == cls:
                out[name] = self.find(other, **{link: ref})
        return out
