"""A VM point: the disks' points of one backup run plus the VM's configuration.

    REPO/<vm-uuid>/points/<point>.config.json   the records (secret: vTPM, NVRAM), 0600
    REPO/<vm-uuid>/points/<point>.json          the VM manifest, written LAST, atomically

The configuration is xapi's records as JSON (VM, VBDs with CD drives and the ISO they
hold, VDIs, VIFs with their networks, vTPM contents with where they came from:
``contents_from``, devices the point cannot carry: ``not_captured``), read from the pool
right after the snapshot the disks are copied from (xapi/vmconfig.py).

Records rather than ``/export_metadata``'s XVA: with
records restore-vm maps networks itself (``--network FROM=TO``), chooses MACs and SRs, and
works across pools and versions; ``import_metadata`` matches networks by name or creates
them, and an XVA would hold the vTPM in a format we would have to parse to check it
anyway.  Xen Orchestra stores records for the same reasons.

A VM point exists only once its manifest is there; it names each disk's point and the
configuration file with its sha256, so verify can tell a damaged configuration.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import RepositoryError
from . import repokey
from .layout import POINT, VM_POINTS, make_dirs, write_atomically
from .repository import Repository

log = logging.getLogger(__name__)

FORMAT = 1
# Where a vTPM's contents in the point came from (the point's ``contents_from``).
FROM_SNAPSHOT = "snapshot"
FROM_LIVE_VM = "live VM right after the snapshot"
FROM_NOWHERE = "none"


@dataclass
class VmManifest:
    point: str
    vm_uuid: str
    vm_name: str
    disks: list[dict] = field(default_factory=list)  # {userdevice, vdi_uuid, point}
    config: str = ""
    config_sha256: str = ""
    format: int = FORMAT

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> VmManifest:
        data = json.loads(text)
        m = cls(**data)
        if not (POINT.match(m.point) and m.config and isinstance(m.disks, list)):
            raise ValueError("not a VM manifest")
        return m


class VmPoints:
    """The VM points of one VM in the repository."""

    def __init__(self, repo: Repository, vm_uuid: str):
        self.path = repo.root / vm_uuid / VM_POINTS
        self.vm_uuid = vm_uuid

    def manifest_path(self, point: str) -> Path:
        return self.path / (point + ".json")

    def config_path(self, point: str) -> Path:
        return self.path / (point + ".config.json")

    def write_config(self, point: str, config: dict) -> str:
        """The configuration file (0600: it holds the vTPM and NVRAM); its sha256."""
        make_dirs(self.path)
        text = json.dumps(config, indent=1, sort_keys=True) + "\n"
        path = self.config_path(point)
        write_atomically(path, repokey.sealed(path, text.encode()))  # vTPM, NVRAM
        return hashlib.sha256(text.encode()).hexdigest()

    def commit(self, manifest: VmManifest) -> None:
        write_atomically(self.manifest_path(manifest.point), manifest.to_json())

    def manifests(self) -> list[VmManifest]:
        found = []
        if not self.path.is_dir():
            return found
        for p in sorted(self.path.glob("*.json")):
            if not POINT.match(p.stem):
                continue
            try:
                found.append(VmManifest.from_json(p.read_text(encoding="utf-8")))
            except (ValueError, TypeError) as e:
                log.warning("VM %s: VM point %s is unreadable: %s", self.vm_uuid, p.stem, e)
        return found

    def get(self, at: str | None) -> VmManifest:
        points = self.manifests()
        if not points:
            raise RepositoryError("VM %s has no VM points (back it up first)" % self.vm_uuid)
        if at is None:
            return points[-1]
        matches = [m for m in points if m.point == at] or [
            m for m in points if m.point.startswith(at)
        ]
        if len(matches) != 1:
            raise RepositoryError(
                "%s VM point %s of VM %s (xencbt list shows them)"
                % ("no" if not matches else "more than one", at, self.vm_uuid)
            )
        return matches[0]

    def load_config(self, m: VmManifest) -> dict:
        """The configuration, checked against the manifest's sha256 (never printed)."""
        path = self.path / m.config
        try:
            data = repokey.opened(path, path.read_bytes())
        except FileNotFoundError:
            raise RepositoryError(
                "the configuration of VM point %s of VM %s is missing (%s)"
                % (m.point, self.vm_uuid, m.config)
            ) from None
        except RepositoryError as e:  # sealed: damaged, moved, or no key
            raise RepositoryError(
                "the configuration of VM point %s of VM %s: %s" % (m.point, self.vm_uuid, e)
            ) from None
        if hashlib.sha256(data).hexdigest() != m.config_sha256:
            raise RepositoryError(
                "the configuration of VM point %s of VM %s does not match its checksum: "
                "it is damaged" % (m.point, self.vm_uuid)
            )
        try:
            config = json.loads(data)
            config["vm"], config["vbds"], config["vifs"]  # noqa: B018
        except (ValueError, KeyError, TypeError):
            raise RepositoryError(
                "the configuration of VM point %s of VM %s does not parse" % (m.point, self.vm_uuid)
            ) from None
        return config

    def remove(self, point: str) -> None:
        """Manifest first (the VM point stops existing), then its configuration."""
        for path in (self.manifest_path(point), self.config_path(point)):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def strays(self) -> list[Path]:
        """Configurations no manifest names: a backup killed before its manifest."""
        if not self.path.is_dir():
            return []
        named = {m.config for m in self.manifests()}
        temp = [p for p in self.path.iterdir() if p.name.endswith(".tmp")]
        configs = [p for p in self.path.glob("*.config.json") if p.name not in named]
        return sorted(temp + configs)


def all_vm_points(repo: Repository) -> list[VmPoints]:
    if not repo.root.is_dir():
        return []
    return [VmPoints(repo, d.parent.name) for d in sorted(repo.root.glob("*/" + VM_POINTS))]
