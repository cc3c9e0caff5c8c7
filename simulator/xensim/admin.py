"""The xensim control API (``/xensim/…`` on the master): faults, sessions, crashes, counters.

Not part of XenServer: it is how tests and the ``xensim fault``/``counters`` commands
inject failures (NBD, API and import faults, API reply latency, a host crash that switches
CBT off), change the pool as its administrator or hardware would (licence, host memory,
passed-through devices, root password, master, SR size and CBT support, sessions
invalidated), and read what the NBD servers did (counters, logins, secrets issued).
"""

from __future__ import annotations

import logging
from typing import Any

from . import records, vm_placement
from .faults import Counters, Faults
from .xapi import Xapi

log = logging.getLogger(__name__)


class Admin:
    def __init__(self, xapi: Xapi, faults: Faults, counters: dict[str, Counters]) -> None:
        self.xapi = xapi
        self.faults = faults
        self.counters = counters  # host name -> Counters
        self._routes = {
            ("GET", "faults"): lambda a: self.faults.to_dict(),
            ("POST", "faults"): self._set_faults,
            ("POST", "faults/clear"): self._clear,
            ("POST", "faults/refuse"): self._refuse,
            ("POST", "sessions/invalidate"): self._invalidate,
            ("POST", "cbt-off"): self._cbt_off,
            ("POST", "licence"): self._licence,
            ("POST", "host-memory"): self._host_memory,
            ("POST", "passthrough"): self._passthrough,
            ("POST", "sr-cbt"): self._sr_cbt,
            ("GET", "counters"): lambda a: self._counters(),
            ("POST", "counters/reset"): self._reset,
            ("GET", "logins"): lambda a: self._logins(),
            # Reliability knobs (issue #5; xensim/hostile.py)
            ("GET", "faults/api"): lambda a: self.xapi.api_faults.to_dict(),
            ("POST", "faults/api"): self._api_faults,
            ("POST", "password"): self._password,
            ("POST", "master"): self._master,
            ("GET", "secrets"): lambda a: self.xapi.credentials.secrets(),
            # Crash tests (latency.py): reply latency per API method.
            ("GET", "api-latency"): lambda a: self.xapi.latency.to_dict(),
            ("POST", "api-latency"): lambda a: self.xapi.latency.set(a),
            # Imports failing late (issue #12): a write fault, an SR that fills up.
            ("POST", "faults/import"): self._import_fault,
            ("POST", "sr-size"): self._sr_size,
        }

    def handle(self, verb: str, path: str, args: dict) -> Any:
        """Dispatch one control request; KeyError when there is no such control."""
        action = self._routes[(verb, path)]
        log.info("control %s %s %s", verb, path, sorted(args))
        return action(args)

    def _set_faults(self, args: dict) -> dict:
        self.faults.update(**args)
        return self.faults.to_dict()

    def _clear(self, args: dict) -> dict:
        self.faults.clear()
        return self.faults.to_dict()

    def _refuse(self, args: dict) -> dict:
        self.faults.refuse_for(float(args["seconds"]))
        return self.faults.to_dict()

    def _invalidate(self, args: dict) -> dict:
        return {"invalidated": self.xapi.sessions.invalidate(args.get("session"))}

    def _cbt_off(self, args: dict) -> dict:
        """A host crash: the host switches CBT off on the VDI and the chain is broken."""
        db = self.xapi.db
        name = str(args["vdi"])
        with db.lock:
            ref = name if db.exists("VDI", name) else db.by_uuid("VDI", name)
            self.xapi.storage.cbt.switch_off(ref)
            db.save()
        return {"vdi": db.get("VDI", ref)["uuid"], "cbt_enabled": False}

    def _licence(self, args: dict) -> dict:
        """Licence flags of pool.restrictions (xen-api xapi-types features.ml: each
        feature's ``restrict_<name>``, "true" when unlicensed; a missing flag means
        restricted for most features, xensim's pools start with them all present):
        ``cbt`` (restrict_cbt), ``vtpm`` (restrict_vtpm, xapi_vtpm.ml), ``vif_locking``
        (restrict_vif_locking, xapi_vif_helpers.ml): true = licensed.  Only the flags
        given change."""
        db = self.xapi.db
        flags = {"cbt": "restrict_cbt", "vtpm": "restrict_vtpm"}
        flags["vif_locking"] = "restrict_vif_locking"
        unknown = set(args) - set(flags)
        if unknown:
            raise ValueError(f"unknown licence flags {sorted(unknown)}")
        with db.lock:
            pool = db.get("pool", db.refs("pool")[0])
            restrictions = pool.setdefault("restrictions", {})
            for name, key in flags.items():
                if name in args:
                    restrictions[key] = "false" if args[name] else "true"
            db.save()
            return dict(restrictions)

    def _host_memory(self, args: dict) -> dict:
        """A host's memory (Host_metrics.memory_total, vm_placement.py ``host_free_memory``): make
        VM.start fail HOST_NOT_ENOUGH_FREE_MEMORY as on a full host."""
        db = self.xapi.db
        with db.lock:
            found = db.find("host", name_label=str(args["host"]))
            if not found:
                raise ValueError(f"no host named {args['host']!r}")
            db.get("host", found[0])["_memory_total"] = int(args["memory_total"])
            db.save()
            return {"host": args["host"], "free": vm_placement.host_free_memory(db, found[0])}

    def _passthrough(self, args: dict) -> dict:
        """Give a VM a passed-through device, as a host with the hardware would: a VUSB
        (a USB stick), a VGPU or a PCI device (``kind``).  xensim has no USB groups,
        GPU groups or host PCI inventory to create them through the API."""
        db = self.xapi.db
        kind = str(args["kind"])
        if kind not in ("VUSB", "VGPU", "PCI"):
            raise ValueError(f"kind must be VUSB, VGPU or PCI, not {kind!r}")
        with db.lock:
            vm = db.by_uuid("VM", str(args["vm"]))
            if kind == "PCI":
                host = db.get("pool", db.refs("pool")[0])["master"]
                rec = records.new("PCI", host=host, pci_id="0000:3b:00.0")
                rec.update(class_name="Network controller", vendor_name="Intel Corporation")
                ref = db.add("PCI", rec)
                db.get("VM", vm)["attached_PCIs"] = [*db.get("VM", vm)["attached_PCIs"], ref]
            else:
                ref = db.add(kind, records.new(kind, VM=vm))
            db.save()
            return {"kind": kind, "uuid": db.get(kind, ref)["uuid"]}

    def _sr_cbt(self, args: dict) -> dict:
        """An SR whose driver lacks the VDI_CONFIG_CBT feature (xapi_vdi.ml
        check_sm_feature_error)."""
        db = self.xapi.db
        name = str(args["sr"])
        with db.lock:
            ref = name if db.exists("SR", name) else db.by_uuid("SR", name)
            db.get("SR", ref)["_cbt"] = bool(args["supported"])
            db.save()
        return {"sr": db.get("SR", ref)["uuid"], "cbt": bool(args["supported"])}

    def _counters(self) -> dict:
        return {name: c.to_dict() for name, c in self.counters.items()}

    def _logins(self) -> dict:
        """Successful session.login_with_password calls since start, by originator."""
        by = dict(self.xapi.sessions.logins)
        return {"total": sum(by.values()), "by_originator": by}

    def _reset(self, args: dict) -> dict:
        for counters in self.counters.values():
            counters.reset()
        return self._counters()

    # -- reliability knobs (issue #5) ---------------------------------------------------
    def _api_faults(self, args: dict) -> dict:
        self.xapi.api_faults.set_bitmap(args.get("bitmap"))
        return self.xapi.api_faults.to_dict()

    def _password(self, args: dict) -> dict:
        self.xapi.credentials.change(args["password"])
        return {"changed": True}

    def _master(self, args: dict) -> dict:
        db = self.xapi.db
        with db.lock:
            found = db.find("host", name_label=str(args["host"]))
        if not found:
            raise ValueError(f"no host named {args['host']!r}")
        return {"master": args["host"], "address": self.xapi.move_master(found[0])}

    # -- imports failing late (issue #12; storage.py import_write) ----------------------
    def _import_fault(self, args: dict) -> dict:
        after = args.get("fail_after_bytes")
        if after is not None and (not isinstance(after, int) or isinstance(after, bool)):
            raise ValueError(f"fail_after_bytes must be an integer or None, not {after!r}")
        self.xapi.storage.fail_imports_after = after
        return {"fail_after_bytes": after}

    def _sr_size(self, args: dict) -> dict:
        db = self.xapi.db
        name = str(args["sr"])
        with db.lock:
            ref = name if db.exists("SR", name) else db.by_uuid("SR", name)
            result = self.xapi.storage.set_sr_size(ref, int(args["physical_size"]))
            db.save()
        return result
