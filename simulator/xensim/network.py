"""Networks: network.create, the purposes, and what each host's NBD server does about them.

A purpose change is visible in the API at once but reaches the NBD servers only after
the propagation delay (XenServer documents "at least 10 s"), so clients must retry.
"""

from __future__ import annotations

import threading
import time

from . import records
from .database import Database
from .errors import ServerError
from .storage import as_int

NBD_PURPOSES = ("nbd", "insecure_nbd")
_MODE = {"nbd": "tls", "insecure_nbd": "notls"}


def create(db: Database, fields: dict) -> str:
    """xapi_network.ml ``create``: MTU <= 0 is 1500; an empty bridge gets the next
    free "xapi<N>" (``choose_bridge_name``); a given one longer than 15 characters
    or starting with xen, xapi, vif, tap or eth is INVALID_VALUE [bridge, name], one
    in use BRIDGE_NAME_EXISTS [name].  A network without PIFs is internal."""
    bridges = [db.get("network", n)["bridge"] for n in db.refs("network")]
    bridge = str(fields.get("bridge", ""))
    if bridge == "":
        n = 0
        while f"xapi{n}" in bridges:
            n += 1
        bridge = f"xapi{n}"
    else:
        blacklisted = any(bridge.startswith(p) for p in ("xen", "xapi", "vif", "tap", "eth"))
        if len(bridge) > 15 or blacklisted:
            raise ServerError("INVALID_VALUE", "bridge", bridge)
        if bridge in bridges:
            raise ServerError("BRIDGE_NAME_EXISTS", bridge)
    mtu = as_int(fields.get("MTU", 1500), "MTU")
    rec = records.new(
        "network",
        name_label=str(fields.get("name_label", "")),
        name_description=str(fields.get("name_description", "")),
        MTU=1500 if mtu <= 0 else mtu,
        other_config=dict(fields.get("other_config") or {}),
        bridge=bridge,
        managed=bool(fields.get("managed", True)),
        tags=list(fields.get("tags") or []),
        purpose=[],
        default_locking_mode="unlocked",
    )
    return db.add("network", rec)


def destroy(db: Database, ref: str) -> None:
    """xapi_network.ml ``destroy``: refused while a VIF on it is currently attached (or
    reserved): NETWORK_CONTAINS_VIF [vifs]; while it has PIFs: NETWORK_CONTAINS_PIF
    [pifs]; for the host-internal management network: CANNOT_DESTROY_SYSTEM_NETWORK.
    Its remaining VIFs are destroyed with it ("rather than wait for the GC thread")."""
    db.get("network", ref)
    vifs = db.find("VIF", network=ref)
    attached = [v for v in vifs if db.get("VIF", v).get("currently_attached")]
    attached += [v for v in vifs if db.get("VIF", v).get("reserved") and v not in attached]
    if attached:
        raise ServerError("NETWORK_CONTAINS_VIF", *attached)
    pifs = db.find("PIF", network=ref)
    if pifs:
        raise ServerError("NETWORK_CONTAINS_PIF", *pifs)
    other = db.get("network", ref).get("other_config", {})
    if other.get("is_host_internal_management_network") == "true":  # bool_of_string
        raise ServerError("CANNOT_DESTROY_SYSTEM_NETWORK", ref)
    for vif in vifs:
        db.remove("VIF", vif)
    db.remove("network", ref)


def add_purpose(db: Database, ref: str, value: str) -> None:
    """No mixing of nbd and insecure_nbd anywhere in the pool (xapi_network.ml)."""
    if value not in ("nbd", "insecure_nbd"):
        raise ServerError("INVALID_VALUE", "purpose", value)
    rec = db.get("network", ref)
    other = "insecure_nbd" if value == "nbd" else "nbd"
    for net in db.refs("network"):
        if other in db.get("network", net)["purpose"]:
            raise ServerError("NETWORK_INCOMPATIBLE_PURPOSES", value, other)
    if value not in rec["purpose"]:
        rec["purpose"].append(value)


def remove_purpose(db: Database, ref: str, value: str) -> None:
    rec = db.get("network", ref)
    if value in rec["purpose"]:
        rec["purpose"].remove(value)


def host_modes(db: Database) -> dict[str, str | None]:
    """host ref -> "tls" | "notls" | None, from the purposes of the networks on which the
    host has a currently attached PIF with an IPv4 address (xapi-nbd listens on IPv4
    only: xen-api ocaml/nbd/src/main.ml binds a PF_INET socket)."""
    modes: dict[str, str | None] = {}
    for host in db.refs("host"):
        mode = None
        for pif in db.find("PIF", host=host):
            rec = db.get("PIF", pif)
            if not rec["IP"] or not rec.get("currently_attached", True):
                continue
            if not db.exists("network", rec["network"]):
                continue
            for purpose in db.get("network", rec["network"])["purpose"]:
                mode = mode or _MODE.get(purpose)
        modes[host] = mode
    return modes


class Propagation:
    """What the NBD servers currently apply, lagging the database by ``delay`` seconds."""

    def __init__(self, initial: dict[str, str | None], delay: float) -> None:
        self.delay = delay
        self._effective = dict(initial)
        self._pending: tuple[float, dict[str, str | None]] | None = None
        self._lock = threading.Lock()

    def changed(self, modes: dict[str, str | None]) -> None:
        with self._lock:
            self._promote()
            self._pending = (time.monotonic() + self.delay, dict(modes))
            self._promote()

    def mode(self, host: str) -> str | None:
        with self._lock:
            self._promote()
            return self._effective.get(host)

    def _promote(self) -> None:
        if self._pending and time.monotonic() >= self._pending[0]:
            self._effective = self._pending[1]
            self._pending = None
