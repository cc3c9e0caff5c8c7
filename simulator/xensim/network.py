"""Network purposes and what each host's NBD server does about them.

A purpose change is visible in the API at once but reaches the NBD servers only after
the propagation delay (XenServer documents "at least 10 s"), so clients must retry.
"""

from __future__ import annotations

import threading
import time

from .database import Database
from .errors import XapiError

NBD_PURPOSES = ("nbd", "insecure_nbd")
_MODE = {"nbd": "tls", "insecure_nbd": "notls"}


def add_purpose(db: Database, ref: str, value: str) -> None:
    """No mixing of nbd and insecure_nbd anywhere in the pool (xapi_network.ml)."""
    if value not in ("nbd", "insecure_nbd"):
        raise XapiError("INVALID_VALUE", "purpose", value)
    rec = db.get("network", ref)
    other = "insecure_nbd" if value == "nbd" else "nbd"
    for net in db.refs("network"):
        if other in db.get("network", net)["purpose"]:
            raise XapiError("NETWORK_INCOMPATIBLE_PURPOSES", value, other)
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
