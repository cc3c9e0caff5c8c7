"""The VBD xapi-nbd plugs in the control domain for every NBD connection.

xen-api ``ocaml/nbd/src/main.ml`` ``with_attached_vdi`` and ``cleanup.ml`` ``VBD.with_vbd``:
before the size reply the server creates a read-only VBD from the host's control domain to
the VDI (``userdevice:"autodetect"``) and plugs it; when the client goes, the finaliser
unplugs and destroys it, and only then is the socket closed and the connection slot freed
(``main.ml`` ``dec_conn`` runs after ``handle_connection``).  Unplugging goes through
xenopsd, which runs a VM's operations one at a time (dom0's queue), so on a host the VBDs
of a burst of closed connections disappear one after another, about a second each.  While
they exist, ``VDI.data_destroy`` waits and fails ``VDI_IN_USE``, and ``VDI.destroy`` and
``list_changed_blocks`` are refused (storage.py).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from . import records
from .database import Database

log = logging.getLogger(__name__)

DEFAULT_CLEANUP = 0.25  # seconds per VBD; real hosts take ~1-2 s (see simulator/README.md)


class Dom0:
    """Plugs and unplugs one host's NBD VBDs in the database."""

    def __init__(self, db: Database, host_ref: str, cleanup: float) -> None:
        self.db = db
        self.host = host_ref
        self.cleanup = cleanup
        self._queue = threading.Lock()  # xenopsd: one operation at a time on dom0

    def _control_domain(self) -> str | None:
        for ref in self.db.find("VM", is_control_domain=True, resident_on=self.host):
            return ref
        return None

    def plug(self, vdi_ref: str) -> str | None:
        """VBD.create + VBD.plug (mode RO) for a new connection; None when xapi would fail
        it (no control domain, or the VDI became cbt_metadata: VBD.create refuses that)."""
        with self.db.lock:
            dom0 = self._control_domain()
            if dom0 is None or not self.db.exists("VDI", vdi_ref):
                return None
            if self.db.get("VDI", vdi_ref)["type"] == "cbt_metadata":
                return None
            rec = records.vbd(dom0, vdi_ref, self._free_userdevice(dom0), mode="RO")
            rec.update(bootable=False, currently_attached=True)
            ref = self.db.add("VBD", rec)
            self.db.save()
        log.info("NBD: plugged VBD %s for VDI %s in dom0", rec["uuid"], vdi_ref)
        return ref

    def _free_userdevice(self, dom0: str) -> str:
        used = {self.db.get("VBD", r)["userdevice"] for r in self.db.find("VBD", VM=dom0)}
        n = 0
        while str(n) in used:
            n += 1
        return str(n)

    def unplug(self, vbd_ref: str, wait: Callable[[float], bool]) -> None:
        """VBD.unplug then VBD.destroy, queued behind the host's other unplugs.

        ``wait(seconds)`` sleeps and returns True when the server is stopping: then the
        VBD goes at once, as xapi-nbd's signal handler cleans up before exiting."""
        with self._queue:
            wait(self.cleanup)
            with self.db.lock:
                if self.db.exists("VBD", vbd_ref):
                    self.db.get("VBD", vbd_ref)["currently_attached"] = False
                    self.db.remove("VBD", vbd_ref)
                    self.db.save()
        log.info("NBD: unplugged and destroyed VBD %s", vbd_ref)
