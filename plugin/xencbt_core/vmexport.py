"""vm=: every disk of a VM snapshot as an export of one nbdkit.

Export names are the VBD's userdevice ("0", "1", …) and, as an alias, the snapshot
VDI's uuid; the default export is the lowest userdevice.  CD drives and empty VBDs
are not disks to back up (xen-api ``ocaml/xapi/xapi_vm_snapshot.ml`` keeps them in a
snapshot, with no VDI to read).

One XAPI session and one keep-alive serve the VM (the Backend's); each disk has its
own XapiSource, whose get_nbd_info records are fetched again whenever that session
logged in again (``Session.generation``): one refresh path.  Each disk's pool is made
on the first open of its export and connects on its first read; all pools share one
Budget of ``connections=``, since the host counts every connection against its 16.

since= may name an older VM snapshot or older disk snapshots (cbt_metadata VDIs
too); each base is matched to a disk by ``snapshot_of``, the VDI both are snapshots
of.  A disk with no base (added since) is exported whole, and says so.
"""

from __future__ import annotations

import errno
import logging
import threading
from dataclasses import dataclass

from .backend import Backend, open_session
from .budget import Budget
from .cbt import Bitmap
from .errors import ConfigError, XapiError, XencbtError
from .export import Export
from .params import Params
from .pool import Pool
from .source import XapiSource
from .xapi import NULL_REF

log = logging.getLogger(__name__)


class NoSuchExport(XencbtError):
    """The client asked for an export name the VM snapshot does not have."""

    errno = errno.ENOENT


@dataclass
class Disk:
    userdevice: str
    name: str
    source: XapiSource
    snapshot_of: str
    base: str = ""  # the since= snapshot it is diffed against, if any
    bitmap: Bitmap | None = None

    @property
    def uuid(self) -> str:
        return self.source.vdi.uuid

    @property
    def size(self) -> int:
        return self.source.vdi.size


class DiskExport(Export):
    """A disk's export: its first read opens its first connection, through Pool.start's
    one retry loop (as Backend.start does for vdi=), while other reads wait for it.  When
    that fails, every later read fails the same way instead of hammering the host."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._started = False
        self._failed: XencbtError | None = None
        self._start_lock = threading.Lock()

    def pread(self, buf: memoryview, offset: int) -> None:
        if not self._started:
            self._start()
        super().pread(buf, offset)

    def _start(self) -> None:
        with self._start_lock:
            if self._failed is not None:
                raise self._failed
            if not self._started:
                try:
                    self.pool.start()
                except XencbtError as e:
                    self._failed = e
                    raise
                self._started = True


class VmBackend(Backend):
    """The Backend of vm=: the session, keep-alive, trust and close() are inherited."""

    def __init__(self, params: Params):
        super().__init__(params)
        self.vm_name = ""
        self.disks: dict[str, Disk] = {}  # by userdevice, lowest first
        self.budget = Budget(params.connections)
        self._exports: dict[str, Export] = {}
        self._lock = threading.Lock()

    def start(self) -> None:
        p = self.params
        self.session = open_session(p)
        vm_ref = self._lookup_vm(p.vm, "vm")
        self.disks = self._disks(vm_ref)
        if not self.disks:
            raise ConfigError("vm=%s (%s) has no disk to export" % (p.vm, self.vm_name))
        self._diff(self._bases(p.bases()))
        for disk in self.disks.values():
            # An unreachable disk stops nbdkit now, not mid-copy.
            self._warn_if_plain(disk.source.targets())
            self._log_disk(disk)

    def _lookup_vm(self, uuid: str, role: str) -> str:
        try:
            ref = self.session.vm_by_uuid(uuid)
        except XapiError as e:
            if e.code in ("UUID_INVALID", "HANDLE_INVALID"):
                raise ConfigError("%s=%s: no such VM in this pool" % (role, uuid)) from None
            raise
        if role == "vm":
            self.vm_name = self._vm_name(ref)
            if not self.session.vm_is_a_snapshot(ref):
                log.warning(
                    "vm=%s is not a snapshot: disks in use change while they are read, so "
                    "the copy may be inconsistent",
                    uuid,
                )
        return ref

    def _vm_name(self, ref: str) -> str:
        """The VM's name, and the snapshot's: what the disks' descriptions start with."""
        name = self.session.vm_name_label(ref)
        of = self.session.vm_snapshot_of(ref)
        if of == NULL_REF:
            return name
        try:
            return "%s (snapshot %s)" % (self.session.vm_name_label(of), name)
        except XapiError:  # the VM is gone, its snapshot stays
            return name

    def _disks(self, vm_ref: str) -> dict[str, Disk]:
        found = {}
        for vbd in self.session.vm_vbds(vm_ref):
            rec = self.session.vbd_record(vbd)
            if rec["type"] != "Disk" or rec.get("empty") or rec["VDI"] == NULL_REF:
                continue
            vdi = self.session.vdi_record(rec["VDI"])
            if vdi.get("type") == "cbt_metadata":
                raise ConfigError(
                    "vm=%s: disk %s (VDI %s, %s) is a cbt_metadata VDI: its data was "
                    "destroyed (VDI.data_destroy) and only its change log is left, so this "
                    "VM snapshot cannot be read. Take a new snapshot; this one can only be "
                    "the since= of a newer one"
                    % (self.params.vm, rec["userdevice"], vdi["uuid"], vdi["name_label"])
                )
            source = XapiSource(self.session, vdi["uuid"])
            disk = Disk(rec["userdevice"], vdi["name_label"], source, vdi["snapshot_of"])
            found[disk.userdevice] = disk
        return dict(sorted(found.items(), key=lambda kv: _device_order(kv[0])))

    def _bases(self, uuids: list[str]) -> dict[str, str]:
        """since=: {the VDI a base is a snapshot of: base uuid}."""
        bases: dict[str, str] = {}
        for uuid in uuids:
            for base, of in self._base_vdis(uuid):
                if of in bases:
                    raise ConfigError(
                        "since= names two snapshots of the same disk: %s and %s" % (bases[of], base)
                    )
                bases[of] = base
        return bases

    def _base_vdis(self, uuid: str) -> list[tuple[str, str]]:
        """(uuid, snapshot_of) of the VDI ``uuid``, or of each disk of the VM ``uuid``."""
        try:
            ref = self.session.vdi_by_uuid(uuid)
        except XapiError as e:
            if e.code not in ("UUID_INVALID", "HANDLE_INVALID"):
                raise
        else:
            return [(uuid, self.session.vdi_snapshot_of(ref))]
        try:
            vm_ref = self._lookup_vm(uuid, "since")
        except ConfigError:
            raise ConfigError("since=%s: no such VDI or VM snapshot in this pool" % uuid) from None
        found = []
        for vbd in self.session.vm_vbds(vm_ref):
            vdi = self.session.vbd_vdi(vbd)
            if vdi != NULL_REF and self.session.vbd_type(vbd) == "Disk":
                found.append((self.session.vdi_uuid(vdi), self.session.vdi_snapshot_of(vdi)))
        return found

    def _diff(self, bases: dict[str, str]) -> None:
        for disk in self.disks.values():
            disk.base = bases.pop(disk.snapshot_of, "")
            if disk.base:
                disk.bitmap = disk.source.changed_since(disk.base)
        if bases:
            raise ConfigError(
                "since=: %s is not a snapshot of any disk of vm=%s"
                % (", ".join(sorted(bases.values())), self.params.vm)
            )

    def _log_disk(self, disk: Disk) -> None:
        if not self.params.bases():
            log.debug(
                "export %s: VDI %s, %d bytes, all data", disk.userdevice, disk.uuid, disk.size
            )
        elif disk.bitmap is None:
            log.info(
                "export %s: VDI %s has no base among since= (a new disk?): exported whole",
                disk.userdevice,
                disk.uuid,
            )
        else:
            log.debug(
                "export %s: VDI %s, %d bytes, %d changed since %s",
                disk.userdevice,
                disk.uuid,
                disk.size,
                disk.bitmap.changed_bytes(),
                disk.base,
            )

    # -- what the adapter asks ----------------------------------------------------------
    def list_exports(self) -> list[tuple[str, str]]:
        names = []
        for disk in self.disks.values():
            names += [
                (disk.userdevice, self.description(disk)),
                (disk.uuid, self.description(disk)),
            ]
        return names

    def default_export(self) -> str:
        return next(iter(self.disks))

    def description(self, disk: Disk) -> str:
        if disk.bitmap is not None:
            changes = "%d bytes changed since %s" % (disk.bitmap.changed_bytes(), disk.base)
        elif self.params.bases():
            changes = "whole disk: no base in since="
        else:
            changes = "whole disk"
        return "%s disk %s (%s), %d bytes, %s" % (
            self.vm_name,
            disk.userdevice,
            disk.name,
            disk.size,
            changes,
        )

    def open(self, name: str) -> Export:
        disk = self._find(name or self.default_export())
        with self._lock:
            export = self._exports.get(disk.userdevice)
            if export is None:
                export = self._exports[disk.userdevice] = self._export(disk)
            return export

    def _find(self, name: str) -> Disk:
        if name in self.disks:
            return self.disks[name]
        for disk in self.disks.values():
            if disk.uuid.lower() == name.lower():
                return disk
        raise NoSuchExport(
            "no export named %r: vm=%s exports %s (userdevice) and their VDI uuids"
            % (name[:80], self.params.vm, ", ".join(self.disks))
        )

    def _export(self, disk: Disk) -> Export:
        p = self.params
        log.debug("export %s first opened", disk.userdevice)
        pool = Pool(
            disk.source,
            self.expectation,
            p.connections,
            p.timeout,
            p.retry_timeout,
            budget=self.budget,
        )
        export = DiskExport(pool, disk.size, disk.bitmap, p.unchanged, p.readahead)
        export.description = self.description(disk)
        return export

    def close(self) -> None:
        with self._lock:
            exports = list(self._exports.values())
        for export in exports:
            export.pool.close()
        super().close()


def backend_for(params: Params) -> Backend:
    """The Backend for the kind of export asked for: vm= or vdi= (and nbd-info=)."""
    params.check()
    return VmBackend(params) if params.vm else Backend(params)


def _device_order(userdevice: str) -> tuple[int, str]:
    return (int(userdevice), "") if userdevice.isdigit() else (1 << 30, userdevice)
