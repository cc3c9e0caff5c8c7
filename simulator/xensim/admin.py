"""The xensim control API (``/xensim/…`` on the master): faults, sessions, crashes, counters.

Not part of XenServer: it is how tests and the ``xensim fault``/``counters`` commands
inject failures and read what the NBD servers did.
"""

from __future__ import annotations

import logging
from typing import Any

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
        """An unlicensed pool: Pool_features (xen-api pool_features.ml) restricts CBT."""
        db = self.xapi.db
        with db.lock:
            pool = db.get("pool", db.refs("pool")[0])
            restrictions = pool.setdefault("restrictions", {})
            restrictions["restrict_cbt"] = "false" if args["cbt"] else "true"
            db.save()
            return dict(restrictions)

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
