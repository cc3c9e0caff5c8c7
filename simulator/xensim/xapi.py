"""The XenAPI: method table, parameter checks, sessions, and the per-class calls.

``Xapi.call(method, params, host)`` returns the value or raises ``ServerError``; the wire
encodings (XML-RPC, JSON-RPC) live in ``rpc.py``.
"""

from __future__ import annotations

import logging
import time
import xmlrpc.client
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import datamodel, network, records
from .database import CLASSES, NULL_REF, Database, canonical_class
from .errors import ServerError
from .guest_boot import DEFAULT_BOOT_SECONDS, GuestAgents
from .hostile import ApiFaults, Credentials
from .latency import ApiLatency
from .sessions import ApiSession, Sessions
from .storage import Storage
from .tasks import Tasks
from .vm_lifecycle import Vms

log = logging.getLogger(__name__)


@dataclass
class XapiOptions:
    state_dir: Path
    password: str
    nbd_port: int = 10809
    session_timeout: float = 86400.0
    in_use_wait: float = 4.0
    propagation: float = 0.0
    auth_fail_delay: float = 5.0
    boot_seconds: float = DEFAULT_BOOT_SECONDS


@dataclass
class Call:
    """What a handler sees: the caller's session and the host that received the call."""

    session: str
    host: str


Handler = Callable[..., Any]


class Xapi:
    def __init__(self, db: Database, options: XapiOptions) -> None:
        self.db = db
        self.options = options
        self.sessions = Sessions(options.session_timeout)
        self.credentials = Credentials(options.password)
        self.api_faults = ApiFaults()
        self.storage = Storage(db, options.state_dir, options.in_use_wait)
        self.tasks = Tasks(db, self.sessions, self.has_method, self.call)
        agents = GuestAgents(db, options.state_dir, options.boot_seconds)
        self.vms = Vms(db, self.storage, lambda: self.master, agents)
        self.propagation = network.Propagation(network.host_modes(db), options.propagation)
        self.master = db.get("pool", db.refs("pool")[0])["master"]
        self.latency = ApiLatency()
        self._methods: dict[str, tuple[Handler, int, bool, int]] = {}
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
            if self.has_method(method[len("Async.") :]) and params:
                self.check_session(params[0], host)
            return self.tasks.start(method[len("Async.") :], params, host)
        key = self._key(method)
        if key is None:
            raise ServerError("MESSAGE_METHOD_UNKNOWN", method)
        handler, arity, needs_session, optional = self._methods[key]
        cls, name = key.split(".", 1)
        if method.startswith("session.login"):
            if not 2 <= len(params) <= 4:
                raise ServerError("MESSAGE_PARAMETER_COUNT_MISMATCH", method, 4, len(params))
            return handler(host, *datamodel.check_params(cls, name, params))
        # gen_server.ml: the count expected and received exclude the session
        given = len(params) - (1 if needs_session else 0)
        if not arity <= given <= arity + optional:
            raise ServerError("MESSAGE_PARAMETER_COUNT_MISMATCH", method, arity, given)
        session = self.check_session(params[0], host)
        args = datamodel.check_params(cls, name, params[1:])
        with self.db.lock:
            result = handler(Call(session.ref, host), *args)
            if not name.startswith("get"):
                self.db.save()
            return result

    def _key(self, method: str) -> str | None:
        """The handler's key, if xensim has one and xapi's datamodel has the message
        (a message the datamodel does not publish is MESSAGE_METHOD_UNKNOWN on xapi)."""
        cls, _, name = method.rpartition(".")
        cls = "session" if cls.lower() == "session" else canonical_class(cls) or cls
        key = f"{cls}.{name}"
        if key not in self._methods or datamodel.message(cls, name) is None:
            return None
        return key

    def check_session(self, ref: object, host: str) -> ApiSession:
        """xen-api ocaml/xapi/session_check.ml ``check``: a session that is not an
        intra-pool login (none of ours is) used on a pool member's API gets
        HOST_IS_SLAVE with the master's address, on every call that takes a session."""
        session = self.sessions.check(ref)
        if host != self.master:
            raise ServerError("HOST_IS_SLAVE", self.db.get("host", self.master)["address"])
        return session

    def has_method(self, method: str) -> bool:
        return self._key(method) is not None

    def _add(
        self, method: str, handler: Handler, arity: int, session: bool = True, optional: int = 0
    ) -> None:
        """``optional``: trailing parameters the datamodel lets a caller leave out."""
        self._methods[method] = (handler, arity, session, optional)

    # -- generic per-class calls --------------------------------------------------------
    def _register_generic(self) -> None:
        """get_all, get_all_records, get_record, get_by_uuid, get_by_name_label and
        get_<field> of every published field, for each class the database holds."""
        for cls in CLASSES:
            self._add(f"{cls}.get_all", lambda c, cls=cls: self.db.refs(cls), 0)
            self._add(f"{cls}.get_all_records", lambda c, cls=cls: self._all_records(cls), 0)
            self._add(f"{cls}.get_record", lambda c, r, cls=cls: self._record(cls, r), 1)
            self._add(f"{cls}.get_by_uuid", lambda c, u, cls=cls: self.db.by_uuid(cls, u), 1)
            if datamodel.message(cls, "get_by_name_label"):
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
                raise ServerError("MAP_DUPLICATE_KEY", cls, name, ref, key)
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
        # datamodel_vdi.ml copy: base_vdi and into_vdi default to NULL (not modelled)
        add(
            "VDI.copy",
            lambda c, r, sr, base=NULL_REF, into=NULL_REF: self._copy(r, sr),
            2,
            optional=2,
        )
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
        self.vms.register(add)  # VM.snapshot (with ignore_vdis), VM.destroy, VIFs, vTPMs
        add("PIF.plug", lambda c, r: self._plug_pif(r, True), 1)
        add("PIF.unplug", lambda c, r: self._plug_pif(r, False), 1)
        add("PBD.plug", lambda c, r: self._set("PBD", r, "currently_attached", True), 1)
        add("PBD.unplug", lambda c, r: self._unplug_pbd(r), 1)
        add("VM.set_name_label", lambda c, r, v: self._set("VM", r, "name_label", v), 2)
        # datamodel.ml: name_label is RW on networks (xe network-param-set name-label=)
        add("network.set_name_label", lambda c, r, v: self._set("network", r, "name_label", v), 2)
        add("task.create", lambda c, label, desc: self.tasks.create(label, desc, c), 2)
        add("task.destroy", lambda c, r: self.tasks.destroy(r), 1)
        add("task.cancel", lambda c, r: self.tasks.cancel(r), 1)

    def _login(self, host: str, user: Any, password: Any, *rest: Any) -> str:
        """xen-api ocaml/xapi/xapi_session.ml ``login_with_password``: a member answers
        HOST_IS_SLAVE before it looks at the password; a refused password costs
        ``auth_fail_delay`` (xapi: ``thread_delay_and_raise_error``, 5 s against brute
        force).  Too many sessions of one originator: the least recently active go
        (``max_sessions_per_originator``, see sessions.py)."""
        if host != self.master:
            raise ServerError("HOST_IS_SLAVE", self.db.get("host", self.master)["address"])
        if user != "root" or not self.credentials.accepts(password):
            time.sleep(self.options.auth_fail_delay)
            raise ServerError("SESSION_AUTHENTICATION_FAILED", user, "Authentication failure")
        originator = str(rest[1]) if len(rest) > 1 else ""
        ref = self.sessions.login(host, str(user), originator).ref
        self.credentials.issued(ref)
        self.sessions.limit(originator, busy=self._has_pending_task)
        return ref

    def _has_pending_task(self, session: str) -> bool:
        with self.db.lock:
            return any(
                rec.get("_session") == session and rec["status"] == "pending"
                for rec in self.db.objects["task"].values()
            )

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

    def _plug_pif(self, ref: str, attached: bool) -> str:
        """xen-api ocaml/xapi/xapi_pif.ml ``unplug``: the management PIF stays up.  An
        unplugged PIF drops out of get_nbd_info and its host's NBD server stops serving
        on it."""
        rec = self.db.get("PIF", ref)
        if not attached and rec["management"]:
            raise ServerError("PIF_IS_MANAGEMENT_INTERFACE", ref)
        rec["currently_attached"] = attached
        self.propagation.changed(network.host_modes(self.db))
        return ""

    def _unplug_pbd(self, ref: str) -> str:
        """xen-api ocaml/xapi/xapi_pbd.ml ``unplug``: refused with VDI_IN_USE while a VM
        resident on the PBD's host has a VBD of that SR attached
        (``get_active_vdis_by_pbd``).  An unplugged PBD drops its host from get_nbd_info."""
        pbd = self.db.get("PBD", ref)
        active = [
            vbd["VDI"]
            for vm in self.db.find("VM", resident_on=pbd["host"])
            for vbd in (self.db.get("VBD", v) for v in self.db.find("VBD", VM=vm))
            if vbd["currently_attached"]
            and not vbd.get("empty")
            and self.db.exists("VDI", vbd["VDI"])
            and self.db.get("VDI", vbd["VDI"])["SR"] == pbd["SR"]
        ]
        if active:
            raise ServerError("VDI_IN_USE", *active)
        pbd["currently_attached"] = False
        return ""

    def _copy(self, ref: str, sr: str) -> str:
        self.db.get("SR", sr)
        return self.storage.clone(ref)

    def _nbd_info(self, call: Call, ref: str) -> list[dict]:
        """xen-api ocaml/xapi/xapi_vdi.ml ``_get_nbd_info``: for each host with a
        currently_attached PBD of the VDI's SR, every address of its currently_attached
        PIFs on a network whose purpose has nbd or insecure_nbd: PIF.IP, then each
        PIF.IPv6 entry as stored (CIDR form, link-local included), although xapi-nbd
        listens on IPv4 only.  ``cert`` is the host's certificate whatever the purpose:
        even on insecure_nbd, where the server speaks no TLS."""
        self.storage.refuse_metadata(ref)
        vdi = self.db.get("VDI", ref)
        pbds = self.db.find("PBD", SR=vdi["SR"], currently_attached=True)
        exportname = f"/{vdi['uuid']}?session_id={call.session}"
        infos = []
        for host in [self.db.get("PBD", p)["host"] for p in pbds]:
            host_rec = self.db.get("host", host)
            for address in self._nbd_addresses(host):
                infos.append(
                    {
                        "address": address,
                        "port": self.options.nbd_port,
                        "cert": host_rec["_certificate"],
                        "subject": host_rec["_subject"],
                        "exportname": exportname,
                    }
                )
        return infos

    def _nbd_addresses(self, host: str) -> list[str]:
        addresses = []
        for pif in self.db.find("PIF", host=host, currently_attached=True):
            rec = self.db.get("PIF", pif)
            purposes = self.db.get("network", rec["network"])["purpose"]
            if any(p in network.NBD_PURPOSES for p in purposes):
                ipv4 = [rec["IP"]] if rec["IP"] else []
                addresses += ipv4 + [a for a in rec.get("IPv6", []) if a]
        return addresses


def _typed(cls: str, rec: dict) -> dict:
    """Datetime fields travel as xmlrpc DateTime (JSON-RPC turns them into strings)."""
    for name in datamodel.datetime_fields(cls) & rec.keys():
        rec[name] = xmlrpc.client.DateTime(rec[name])
    return rec
