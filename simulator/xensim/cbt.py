"""Changed block tracking chains, modelled on sm's cbtlog handling (REFERENCE §1).

Each CBT-enabled VDI owns a log (``cbtlog``). A snapshot takes the live VDI's log and
links it into a chain: ``_cbt_prev``/``_cbt_next`` hold VDI refs, oldest to newest, the
live VDI last. ``list_changed_blocks(a, b)`` ORs every log after ``a`` up to ``b``.
Callers hold the database lock.
"""

from __future__ import annotations

import logging
from pathlib import Path

from . import bitmap, cbtlog, disks
from .database import Database
from .errors import ServerError, sr_backend_failure

log = logging.getLogger(__name__)


class Tracker:
    def __init__(self, db: Database, state_dir: Path) -> None:
        self.db = db
        self.state_dir = Path(state_dir)

    def _uuid(self, ref: str) -> str:
        return self.db.get("VDI", ref)["uuid"]

    def require_sr_support(self, ref: str) -> None:
        """CBT operations need the SR's VDI_CONFIG_CBT feature (xapi_vdi.ml
        check_sm_feature_error): SR_OPERATION_NOT_SUPPORTED [sr] without it."""
        sr = self.db.get("VDI", ref)["SR"]
        if not self.db.get("SR", sr).get("_cbt", True):
            raise ServerError("SR_OPERATION_NOT_SUPPORTED", sr)

    def enable(self, ref: str) -> None:
        """In xapi's order: the SR's feature, then xapi_vdi.ml check_operation_error
        (type, snapshot, on_boot), then Pool_features.assert_enabled (licence), then
        sm's VDI.configure_blocktracking (raw VDIs: SR_BACKEND_FAILURE_66)."""
        self.require_sr_support(ref)
        rec = self.db.get("VDI", ref)
        if rec["type"] == "cbt_metadata":
            raise ServerError("VDI_INCOMPATIBLE_TYPE", ref, "cbt_metadata")
        if rec["is_a_snapshot"]:
            raise ServerError("OPERATION_NOT_ALLOWED", "VDI is a snapshot")
        if rec.get("on_boot") == "reset":
            raise ServerError("VDI_ON_BOOT_MODE_INCOMPATIBLE_WITH_OPERATION")
        if self._restricted():
            raise ServerError("LICENCE_RESTRICTION", "CBT")
        if rec["sm_config"].get("type") == "raw":
            raise sr_backend_failure(66, "Raw VDI or snapshot not permitted")
        if rec["cbt_enabled"]:
            return
        with disks.locked(self.state_dir, rec["uuid"]):
            cbtlog.create(self.state_dir, rec["uuid"], rec["virtual_size"])
        rec.update(cbt_enabled=True, _cbt_prev=None, _cbt_next=None)

    def _restricted(self) -> bool:
        """xapi-types features.ml: CBT is ("restrict_cbt", Negative)."""
        pool = self.db.get("pool", self.db.refs("pool")[0])
        return pool.get("restrictions", {}).get("restrict_cbt") == "true"

    def disable(self, ref: str) -> None:
        self.require_sr_support(ref)
        rec = self.db.get("VDI", ref)
        if rec["is_a_snapshot"]:
            raise ServerError("OPERATION_NOT_ALLOWED", "VDI is a snapshot")
        if rec["cbt_enabled"]:
            self.switch_off(ref)

    def switch_off(self, ref: str) -> None:
        """CBT off and the chain cut, as after disable_cbt or a host crash."""
        rec = self.db.get("VDI", ref)
        with disks.locked(self.state_dir, rec["uuid"]):
            cbtlog.remove(self.state_dir, rec["uuid"])
        prev = rec.get("_cbt_prev")
        if prev and self.db.exists("VDI", prev):
            self.db.get("VDI", prev)["_cbt_next"] = None
        rec.update(cbt_enabled=False, _cbt_prev=None, _cbt_next=None)

    def snapshot(self, live_ref: str, snap_ref: str) -> None:
        """Hand the live log to the new snapshot; the caller holds the live VDI's lock."""
        live, snap = self.db.get("VDI", live_ref), self.db.get("VDI", snap_ref)
        if not live["cbt_enabled"]:
            return
        cbtlog.rename(self.state_dir, live["uuid"], snap["uuid"])
        cbtlog.create(self.state_dir, live["uuid"], live["virtual_size"])
        prev = live.get("_cbt_prev")
        if prev and self.db.exists("VDI", prev):
            self.db.get("VDI", prev)["_cbt_next"] = snap_ref
        snap.update(cbt_enabled=True, _cbt_prev=prev, _cbt_next=live_ref)
        live["_cbt_prev"] = snap_ref

    def resize(self, ref: str, size: int) -> None:
        """The caller holds the VDI's lock."""
        rec = self.db.get("VDI", ref)
        if rec["cbt_enabled"]:
            cbtlog.resize(self.state_dir, rec["uuid"], size)

    def forget(self, ref: str) -> None:
        """A VDI is being destroyed: fold its log into the next one so diffs across it
        stay right (sm coalesces the bitmap into the child), then unlink it."""
        rec = self.db.get("VDI", ref)
        prev, nxt = rec.get("_cbt_prev"), rec.get("_cbt_next")
        if prev and not self.db.exists("VDI", prev):
            prev = None
        if nxt and self.db.exists("VDI", nxt) and cbtlog.exists(self.state_dir, rec["uuid"]):
            self._fold(rec["uuid"], self._uuid(nxt))
            self.db.get("VDI", nxt)["_cbt_prev"] = prev
            if prev:
                self.db.get("VDI", prev)["_cbt_next"] = nxt
        elif prev:
            self.db.get("VDI", prev)["_cbt_next"] = None
        cbtlog.remove(self.state_dir, rec["uuid"])

    def _fold(self, uuid: str, into: str) -> None:
        with disks.locked(self.state_dir, into):
            try:
                _, bits = cbtlog.read(self.state_dir, uuid)
                size, later = cbtlog.read(self.state_dir, into)
            except cbtlog.LogCorrupt:
                log.warning("CBT log of %s unreadable: not folded into %s", uuid, into)
                return
            cbtlog.write(
                self.state_dir, into, size, bitmap.resized(bitmap.merged(bits, later), size)
            )

    def changed_blocks(self, from_ref: str, to_ref: str) -> str:
        if from_ref == to_ref:
            raise sr_backend_failure(460, "Source and target VDI are same")
        start = self.db.get("VDI", from_ref)
        self.db.get("VDI", to_ref)
        if not (self._tracked(from_ref) and self._tracked(to_ref)):
            raise sr_backend_failure(460, "Source and target VDI are unrelated")
        merged: bytearray | None = None
        size = 0
        current = start
        while True:
            nxt = current.get("_cbt_next")
            if not nxt or not self.db.exists("VDI", nxt) or not self._tracked(nxt):
                raise sr_backend_failure(460, "Source and target VDI are unrelated")
            current = self.db.get("VDI", nxt)
            merged, size = self._merge(merged, size, current["uuid"])
            if nxt == to_ref:
                return bitmap.encode(merged)

    def _tracked(self, ref: str) -> bool:
        return cbtlog.exists(self.state_dir, self._uuid(ref))

    def _merge(self, merged: bytearray | None, size: int, uuid: str) -> tuple[bytearray, int]:
        """One step of sm's merge, with its consistency rules (459 when broken)."""
        with disks.locked(self.state_dir, uuid):
            try:
                log_size, bits = cbtlog.read(self.state_dir, uuid)
            except cbtlog.LogCorrupt as e:
                raise sr_backend_failure(459, str(e)) from None
        bits = bytes(bits[: bitmap.byte_length(log_size)])
        if merged is None:
            return bytearray(bits), log_size
        if log_size < size or len(bits) < len(merged):
            raise sr_backend_failure(459, "Inconsistent bitmaps")
        return bitmap.merged(merged, bits), log_size
