"""Where the export comes from: XAPI (a VDI snapshot) or files given by another tool.

Both are ``TargetSource``s for the pool: ``targets()`` are the get_nbd_info records,
``refresh()`` fetches them again after the server refused an export name.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
from dataclasses import dataclass

from .cbt import Bitmap
from .errors import ChainBroken, ConfigError, UpstreamError, XapiError
from .upstream import Target, by_preference, host_address
from .xapi import Session

log = logging.getLogger(__name__)

EMPTY_NBD_INFO = (
    "VDI.get_nbd_info returned no address for VDI %s: no host can serve it over NBD. "
    "Check that (1) a network of the pool has the purpose nbd or insecure_nbd "
    "(`xencbt nbd status`; `xe network-param-add param-name=purpose param-key=nbd "
    "uuid=NETWORK`), (2) the host has a PIF with an IP address on that network, and "
    "(3) the VDI's SR is attached to a host connected to that network"
)


class FileSource:
    """nbd-info=+FILE: one record (or a list) as JSON; re-read on refresh."""

    def __init__(self, path: str):
        self.path = path
        self._targets = self._load()

    def _load(self) -> list[Target]:
        try:
            with open(self.path, encoding="utf-8") as f:
                data = json.load(f)
        except OSError as e:
            raise ConfigError(
                "cannot read nbd-info file %s: %s" % (self.path, e.strerror)
            ) from None
        except ValueError as e:
            raise ConfigError("nbd-info file %s is not JSON: %s" % (self.path, e)) from None
        records = data if isinstance(data, list) else [data]
        if not records or not all(isinstance(r, dict) for r in records):
            raise ConfigError("nbd-info file %s holds no get_nbd_info record" % self.path)
        return by_preference([Target.from_record(r) for r in records])

    def targets(self) -> list[Target]:
        return self._targets

    def refresh(self) -> list[Target]:
        self._targets = self._load()
        return self._targets


@dataclass(frozen=True)
class VdiInfo:
    ref: str
    uuid: str
    size: int
    is_snapshot: bool


class XapiSource:
    """A VDI reached through a XAPI session."""

    def __init__(self, session: Session, vdi_uuid: str):
        self.session = session
        self.vdi = self._lookup(vdi_uuid)
        self._lock = threading.Lock()
        self._targets: list[Target] = []
        self._generation = -1

    def _lookup(self, uuid: str, role: str = "vdi") -> VdiInfo:
        try:
            ref = self.session.vdi_by_uuid(uuid)
            record = self.session.vdi_record(ref)
        except XapiError as e:
            if e.code in ("UUID_INVALID", "HANDLE_INVALID"):
                raise ConfigError("%s=%s: no such VDI in this pool" % (role, uuid)) from None
            raise
        if role == "vdi" and record.get("type") == "cbt_metadata":
            raise ConfigError(
                "vdi=%s is a cbt_metadata VDI (VDI_INCOMPATIBLE_TYPE): its data was "
                "destroyed and only its change log is left, so it cannot be read. It can "
                "only be the since= of a newer snapshot" % uuid
            )
        info = VdiInfo(ref, uuid, int(record["virtual_size"]), bool(record.get("is_a_snapshot")))
        if role == "vdi" and not info.is_snapshot:
            log.warning(
                "vdi=%s is not a snapshot: a disk in use changes while it is read, so the "
                "copy may be inconsistent",
                uuid,
            )
        return info

    def changed_since(self, since_uuid: str) -> Bitmap:
        base = self._lookup(since_uuid, role="since")
        try:
            # Retried while a closed connection's VBD is still plugged (inuse.py).
            encoded = self.session.vdi_changed_blocks(base.ref, self.vdi.ref)
        except XapiError as e:
            if e.code.startswith("SR_BACKEND_FAILURE_4") or e.code in (
                "VDI_NO_CBT_METADATA",
                "VDI_CBT_ENABLED",
            ):
                raise ChainBroken(
                    "VDI.list_changed_blocks(since=%s, vdi=%s) failed with %s: the two "
                    "snapshots are not on one CBT chain (CBT was disabled or reset, or the "
                    "order is wrong); a full copy is needed" % (since_uuid, self.vdi.uuid, e)
                ) from None
            raise
        return Bitmap.from_base64(encoded, self.vdi.size)

    def targets(self) -> list[Target]:
        with self._lock:
            if self._generation != self.session.generation or not self._targets:
                self._fetch()
            return self._targets

    def refresh(self) -> list[Target]:
        with self._lock:
            self._fetch()
            return self._targets

    def _fetch(self) -> None:
        try:
            records = self.session.vdi_nbd_info(self.vdi.ref)
        except XapiError as e:
            if e.code == "VDI_INCOMPATIBLE_TYPE":
                raise ConfigError(
                    "VDI %s cannot be exported over NBD (VDI_INCOMPATIBLE_TYPE): check its "
                    "type is not cbt_metadata" % self.vdi.uuid
                ) from None
            raise
        if not records:
            raise UpstreamError(EMPTY_NBD_INFO % self.vdi.uuid)
        plain = self._plain_addresses()
        targets = [Target.from_record(r) for r in records]
        self._targets = by_preference(
            [dataclasses.replace(t, plain=t.address in plain) for t in targets]
        )
        self._generation = self.session.generation

    def _plain_addresses(self) -> set[str]:
        """Addresses of PIFs on networks whose purpose is insecure_nbd.  get_nbd_info
        returns a certificate even there (xapi_vdi.ml), so only the network's purpose,
        read over this verified API session, says the host serves NBD without TLS."""
        networks = self.session.network_records()
        insecure = {ref for ref, n in networks.items() if "insecure_nbd" in n.get("purpose", [])}
        if not insecure:
            return set()
        plain = set()
        for pif in self.session.pif_records().values():
            if pif.get("network") in insecure:
                addresses = [pif.get("IP") or "", *(pif.get("IPv6") or [])]
                plain |= {host_address(a) for a in addresses if a}
        return plain
