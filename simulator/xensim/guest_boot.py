"""A simulated guest boot: the guest agent's first report, VM_guest_metrics.

On xapi, VM.start first clears the VM's stale guest metrics (xapi_vm.ml ``start`` calls
xapi_vm_helpers.ml ``delete_guest_metrics``: VM.guest_metrics := NULL, the record
destroyed).  Once the domain runs, the guest agent (xe-guest-utilities, the Windows PV
tools) writes its keys into xenstore; xapi_xenops.ml ``update_vm``
(``create_guest_metrics_if_needed``) then calls xapi_guest_agent.ml
``create_and_set_guest_metrics``, which creates a VM_guest_metrics record from those keys
(``PV_drivers_version`` from attr/PVAddons/*, ``os_version`` from data/os_*; a
``micro`` of "-1" added when the agent gave none) and sets VM.guest_metrics.
VM.destroy destroys the record (xapi_vm_helpers.ml ``destroy``).  A halted VM keeps its
last one (nothing deletes it at shutdown; the next start does).

xensim has no guest: a VM "boots" when its boot disk carries a boot sector (the MBR
signature 0x55AA at byte 510, or a GPT header "EFI PART" at byte 512), and its agent
reports ``boot_seconds`` after VM.start (``xensim serve --boot-seconds``); a disk without
one never boots, so no agent ever reports, as a guest whose disk was wiped.  The boot
disk: the bootable disk VBDs (what a PV bootloader is given, helpers.ml
``indirect_options``), else every disk VBD (an HVM firmware tries the disks in device
order), the lowest userdevice first.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from . import disks, records
from .database import NULL_REF, Database
from .storage import device_numbers

log = logging.getLogger(__name__)

DEFAULT_BOOT_SECONDS = 0.5
# What xe-guest-utilities writes (attr/PVAddons/*, data/os_*), as
# xapi_guest_agent.ml maps it into the two maps.
PV_DRIVERS_VERSION = {"major": "8", "minor": "4", "micro": "0", "build": "1"}
OS_VERSION = {"name": "xensim simulated guest", "distro": "xensim", "major": "1", "minor": "0"}


def bootable(head: bytes) -> bool:
    """An MBR (0x55AA at 510) or a GPT header ("EFI PART" at 512) in the first 1 KiB."""
    return head[510:512] == b"\x55\xaa" or head[512:520] == b"EFI PART"


class GuestAgents:
    """Schedules each started VM's agent report; one per VM start."""

    def __init__(self, db: Database, state_dir: Path, boot_seconds: float) -> None:
        self.db = db
        self.state_dir = Path(state_dir)
        self.boot_seconds = boot_seconds
        self._boots: dict[str, int] = {}  # VM ref -> generation of its current boot

    def started(self, vm: str, running: bool) -> None:
        """Called under the database lock by VM.start; a paused domain runs no agent."""
        delete_guest_metrics(self.db, vm)
        generation = self._boots.get(vm, 0) + 1
        self._boots[vm] = generation
        if not running:
            return
        if not self._boot_disk_boots(vm):
            log.info("VM %s: its boot disk has no boot sector: it never boots", vm)
            return
        timer = threading.Timer(self.boot_seconds, self._report, (vm, generation))
        timer.daemon = True
        timer.start()

    def stopped(self, vm: str) -> None:
        """A shutdown or destroy: a boot still under way never reports."""
        self._boots[vm] = self._boots.get(vm, 0) + 1

    def _report(self, vm: str, generation: int) -> None:
        with self.db.lock:
            if self._boots.get(vm) != generation or not self.db.exists("VM", vm):
                return
            if self.db.get("VM", vm)["power_state"] != "Running":
                return
            rec = records.new(
                "VM_guest_metrics",
                PV_drivers_version=dict(PV_DRIVERS_VERSION),
                os_version=dict(OS_VERSION),
                PV_drivers_up_to_date=True,
                PV_drivers_detected=True,
                networks={},
                other={},
                last_updated=records.now_stamp(),
                live=True,
            )
            self.db.get("VM", vm)["guest_metrics"] = self.db.add("VM_guest_metrics", rec)
            self.db.save()

    def _boot_disk_boots(self, vm: str) -> bool:
        vbds = [self.db.get("VBD", v) for v in self.db.find("VBD", VM=vm)]
        vbds = [v for v in vbds if v["type"] == "Disk" and not v.get("empty")]
        chosen = [v for v in vbds if v.get("bootable")] or vbds
        chosen.sort(key=lambda v: min(device_numbers(v["userdevice"]) or {1 << 30}))
        if not chosen or chosen[0]["VDI"] == NULL_REF:
            return False
        uuid = self.db.get("VDI", chosen[0]["VDI"])["uuid"]
        try:
            with open(disks.data_path(self.state_dir, uuid), "rb") as f:
                return bootable(f.read(1024))
        except FileNotFoundError:
            return False


def delete_guest_metrics(db: Database, vm: str) -> None:
    """xapi_vm_helpers.ml ``delete_guest_metrics``: VM.guest_metrics := NULL, the record
    destroyed (if it exists)."""
    rec = db.get("VM", vm)
    gm = rec.get("guest_metrics", NULL_REF)
    rec["guest_metrics"] = NULL_REF
    if gm != NULL_REF and db.exists("VM_guest_metrics", gm):
        db.remove("VM_guest_metrics", gm)
