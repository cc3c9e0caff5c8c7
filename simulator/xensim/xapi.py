"""The XenAPI: method table, parameter checks, sessions, and the per-class calls.

``Xapi.call(method, params, host)`` returns the value or raises ``XapiError``; the wire
encodings (XML-RPC, JSON-RPC) live in ``rpc.py``.
"""

from __future__ import annotations

import logging
import xmlrpc.client
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import network, records
from .database import NULL_REF, Database, canonical_class
from .errors import XapiError
from .hostile import ApiFaults, Credentials
from .latency import ApiLatency
from .sessions import Sessions
from .storage import Storage
from .tasks import Tasks
from .vms import Vms

log = logging.getLogger(__name__)

NAMED = ("pool", "host", "network", "SR", "VM", "VDI", "task")


@dataclass
class Options:
    state_dir: Path
    password: str
    nbd_port: int = 10809
    session_timeout: float = 86400.0
    in_use_wait: float = 4.0
    propagation: float = 0.0


@dataclass
class Call:
    """What a handler sees: the caller's session and the host that received the call."""

    session: str
    host: str


Handler = Callable[..., Any]


class Xapi:
    def __init__(self, db: Database, options: Options) -> None:
        self.db = db
        self.options = options
        self.sessions = Sessions(options.session_timeout)
        self.credentials = Credentials(options.password)
        self.api_faults = ApiFaults()
        self.storage = Storage(db, options.state_dir, options.in_use_wait)
        self.tasks = Tasks(db, self)
        self.vms = Vms(db, self.storage, lambda: self.master)
        self.propagation = network.Propagation(network.host_modes(db), options.propagation)
        self.master = db.get("pool", db.refs("pool")[0])["master"]
        self.latency = ApiLatency()
        self._methods: dict[str, tuple[Handler, int, bool]] = {}
        self._register_generic()
        self._register_specific()

    # -- dispatch -----------------------------------------------------------------------
    def call(self, method: str, params: list, host: str) -> Any:
        try:
            return self._call(method, params, host)
        finally:
            self.latency.pause(method)  # after the effect, before the reply (latency.py)

    def _call(self, method: str, params: list, host: str) -> Any:
        if method.startswith("Async."):
            return self.tasks.start(method[len("Async.") :], params, host)
        key = self._key(method)
        if key is None:
            raise XapiError("MESSAGE_METHOD_UNKNOWN", method)
        handler, arity, needs_session = self._methods[key]
        if method.startswith("session.login"):
            if not 2 <= len(params) <= 4:
                raise XapiError("MESSAGE_PARAMETER_COUNT_MISMATCH", method, 4, len(params))
            return handler(host, *params)
        expected = arity + (1 if needs_session else 0)
        if len(params) != expected:
            raise XapiError("MESSAGE_PARAMETER_COUNT_MISMATCH", method, expected, len(params))
        session = self.sessions.check(params[0])
        with self.db.lock:
            result = handler(Call(session.ref, host), *params[1:])
            if not key.split(".", 1)[1].startswith("get"):
                self.db.save()
            return result

    def _key(self, method: str) -> str | None:
        cls, _, name = method.rpartition(".")
        cls = "session" if cls.lower() == "session" else canonical_class(cls) or cls
        key = f"{cls}.{name}"
        return key if key in self._methods else None

    def has_method(self, method: str) -> bool:
        return self._key(method) is not None

    def _add(self, method: str, handler: Handler, arity: int, session: bool = True) -> None:
        self._methods[method] = (handler, arity, session)

    # -- generic per-class calls --------------------------------------------------------
    def _register_generic(self) -> None:
        for cls in (
            "pool",
            "host",
            "network",
            "PIF",
            "SR",
            "PBD",
            "VM",
            "VBD",
            "VDI",
            "task",
            "VIF",
            "VTPM",
        ):
            self._add(f"{cls}.get_all", lambda c, cls=cls: self.db.refs(cls), 0)
            self._add(f"{cls}.get_all_records", lambda c, cls=cls: self._all_records(cls), 0)
            self._add(f"{cls}.get_record", lambda c, r, cls=cls: self._record(cls, r), 1)
            self._add(f"{cls}.get_by_uuid", lambda c, u, cls=cls: self.db.by_uuid(cls, u), 1)
            if cls in NAMED:
                self._add(
                    f"{cls}.get_by_name_label",
                    lambda c, n, cls=cls: self.db.find(cls, name_label=n),
                    1,
                )
            if "other_config" in records.field_names(cls):
                self._map_methods(cls, "other_config")
            for field in records.field_names(cls):
                self._add(
                    f"{cls}.get_{field}",
                    lambda c, r, cls=cls, f=field: self._field(cls, r, f),
                    1,
                )

    def _map_methods(self, cls: str, name: str) -> None:
        """The generated map setters of every (StaticRW/RW) map field (xen-api
        ``ocaml/idl/datamodel_utils.ml``): add_to_ fails ``MAP_DUPLICATE_KEY`` on a key
        already there; remove_from_ of a missing key is a no-op."""

        def add_to(c, ref, key, value):
            current = self.db.get(cls, ref)[name]
            if key in current:
                raise XapiError("MAP_DUPLICATE_KEY", cls, name, ref, key)
            current[key] = value

        def remove_from(c, ref, key):
            self.db.get(cls, ref)[name].pop(key, None)

        self._add(f"{cls}.set_{name}", lambda c, r, v: self._set(cls, r, name, dict(v)), 2)
        self._add(f"{cls}.add_to_{name}", add_to, 3)
        self._add(f"{cls}.remove_from_{name}", remove_from, 2)

    def _record(self, cls: str, ref: str) -> dict:
        if cls == "VDI" and self.db.exists("VDI", ref):
            self.storage.update_usage(ref)  # guests write behind our back
        if cls == "SR" and self.db.exists("SR", ref):
            self.storage.update_sr_usage(ref)
        return _typed(cls, self.db.record(cls, ref))

    def _all_records(self, cls: str) -> dict:
        return {ref: self._record(cls, ref) for ref in self.db.refs(cls)}

    def _field(self, cls: str, ref: str, field: str) -> Any:
        return self._record(cls, ref)[field]

    # -- specific calls -----------------------------------------------------------------
    def _register_specific(self) -> None:
        add = self._add
        add("session.login_with_password", self._login, 4, session=False)
        add("session.logout", lambda c: self.sessions.logout(c.session), 0)
        add("session.get_this_host", lambda c, s: self.sessions.check(s).host, 1)
        add("session.get_uuid", lambda c, s: self.sessions.check(s).uuid, 1)
        add("session.get_this_user", lambda c, s: NULL_REF, 1)
        add("host.get_server_certificate", lambda c, h: self.db.get("host", h)["_certificate"], 1)
        add("network.add_purpose", lambda c, n, v: self._purpose(network.add_purpose, n, v), 2)
        add(
            "network.remove_purpose", lambda c, n, v: self._purpose(network.remove_purpose, n, v), 2
        )
        st = self.storage
        add("VDI.create", lambda c, rec: st.create_vdi(rec), 1)
        add("VDI.destroy", lambda c, r: st.destroy_vdi(r), 1)
        add("VDI.resize", lambda c, r, size: st.resize(r, size), 2)
        add("VDI.snapshot", lambda c, r, params: st.snapshot_vdi(r), 2)
        add("VDI.clone", lambda c, r, params: st.clone(r), 2)
        add("VDI.copy", lambda c, r, sr: self._copy(r, sr), 2)
        add("VDI.set_name_label", lambda c, r, v: self._set("VDI", r, "name_label", v), 2)
        add(
            "VDI.set_name_description",
            lambda c, r, v: self._set("VDI", r, "name_description", v),
            2,
        )
        add("VDI.set_on_boot", lambda c, r, v: st.set_on_boot(r, v), 2)
        add("VDI.enable_cbt", lambda c, r: st.cbt.enable(r), 1)
        add("VDI.disable_cbt", lambda c, r: st.cbt.disable(r), 1)
        add("VDI.data_destroy", lambda c, r: st.data_destroy(r), 1)
        add(
            "VDI.list_changed_blocks",
            lambda c, a, b: self.api_faults.corrupt(st.changed_blocks(a, b)),
            2,
        )
        add("VDI.get_nbd_info", self._nbd_info, 1)
        add("VBD.create", lambda c, rec: st.create_vbd(rec), 1)
        add("VBD.destroy", lambda c, r: st.destroy_vbd(r), 1)
        self.vms.register(add)
        add("VM.set_name_label", lambda c, r, v: self._set("VM", r, "name_label", v), 2)
        # datamodel.ml: name_label is RW on networks (xe network-param-set name-label=)
        add("network.set_name_label", lambda c, r, v: self._set("network", r, "name_label", v), 2)
        add("task.create", lambda c, label, desc: self.tasks.create(label, desc, c), 2)
        add("task.destroy", lambda c, r: self.tasks.destroy(r), 1)
        add("task.cancel", lambda c, r: self.tasks.cancel(r), 1)

    def _login(self, host: str, user: Any, password: Any, *rest: Any) -> str:
        if user != "root" or not self.credentials.accepts(password):
            raise XapiError("SESSION_AUTHENTICATION_FAILED", user, "Authentication failure")
        if host != self.master:
            raise XapiError("HOST_IS_SLAVE", self.db.get("host", self.master)["address"])
        originator = str(rest[1]) if len(rest) > 1 else ""
        ref = self.sessions.login(host, str(user), originator).ref
        self.credentials.issued(ref)
        return ref

    def move_master(self, host: str) -> str:
        """pool.designate_new_master: ``host`` (a ref) becomes the master; xapi restarts on
        both hosts, so every session dies and logins on the old master get HOST_IS_SLAVE."""
        with self.db.lock:
            self.db.get("host", host)
            self.db.get("pool", self.db.refs("pool")[0])["master"] = host
            self.master = host
            self.db.save()
        self.sessions.invalidate()
        return self.db.get("host", host)["address"]

    def _set(self, cls: str, ref: str, field: str, value: Any) -> str:
        self.db.get(cls, ref)[field] = value
        return ""

    def _purpose(self, change: Callable[[Database, str, str], None], ref: str, value: str) -> str:
        change(self.db, ref, value)
        self.propagation.changed(network.host_modes(self.db))
        return ""

    def _copy(self, ref: str, sr: str) -> str:
        self.db.get("SR", sr)
        return self.storage.clone(ref)

    def _nbd_info(self, call: Call, ref: str) -> list[dict]:
        """One record per IP, on an NBD-purpose network, of each host that sees the SR."""
        self.storage.refuse_metadata(ref)
        vdi = self.db.get("VDI", ref)
        hosts = [self.db.get("PBD", p)["host"] for p in self.db.find("PBD", SR=vdi["SR"])]
        exportname = f"/{vdi['uuid']}?session_id={call.session}"
        infos = []
        for host in hosts:
            host_rec = self.db.get("host", host)
            for pif in self.db.find("PIF", host=host):
                rec = self.db.get("PIF", pif)
                purposes = self.db.get("network", rec["network"])["purpose"]
                if rec["IP"] and any(p in network.NBD_PURPOSES for p in purposes):
                    infos.append(
                        {
                            "address": rec["IP"],
                            "port": self.options.nbd_port,
                            "cert": host_rec["_certificate"],
                            "subject": host_rec["_subject"],
                            "exportname": exportname,
                        }
                    )
        return infos


def _typed(cls: str, rec: dict) -> dict:
    """Datetime fields travel as xmlrpc DateTime (JSON-RPC turns them into strings)."""
    for name in records.DATETIME_FIELDS & rec.keys():
        rec[name] = xmlrpc.client.DateTime(rec[name])
    return rec
