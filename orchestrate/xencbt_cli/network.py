"""NBD on the pool's networks (seed 001): status, enable, disable.

``nbd`` (TLS) and ``insecure_nbd`` cannot be mixed in a pool; a change takes a while to
reach the hosts' NBD servers, so enabling waits (bounded) until a host greets us.
"""

from __future__ import annotations

import logging
import socket
import time

from xencbt_core.errors import XapiError

from .errors import CliError, UsageError
from .pool import NULL_REF
from .repository import UUID

log = logging.getLogger(__name__)

MODES = ("nbd", "insecure_nbd")
PROPAGATION_TIMEOUT = 60.0


class Networks:
    def __init__(self, session, say):
        self.call = session.call
        self.say = say

    def records(self) -> dict[str, dict]:
        return self.call("network.get_all_records")

    def status(self) -> list[dict]:
        rows = []
        for rec in self.records().values():
            modes = [p for p in rec["purpose"] if p in MODES]
            rows.append(
                {
                    "name": rec["name_label"],
                    "uuid": rec["uuid"],
                    "bridge": rec.get("bridge", ""),
                    "mode": modes[0] if modes else None,
                }
            )
        return sorted(rows, key=lambda r: r["name"])

    def find(self, network: str | None) -> str:
        if not network:
            names = ", ".join(r["name"] for r in self.status())
            raise UsageError("give --network NAME|UUID (networks: %s)" % names)
        matches = [
            ref
            for ref, rec in self.records().items()
            if network in (rec["uuid"], rec["name_label"])
            or (not UUID.match(network) and rec["bridge"] == network)
        ]
        if len(matches) != 1:
            raise CliError(
                "%d networks match %s (xencbt nbd status lists them)" % (len(matches), network)
            )
        return matches[0]

    def enable(self, network: str | None, insecure: bool) -> None:
        ref = self.find(network)
        wanted = "insecure_nbd" if insecure else "nbd"
        other = "nbd" if insecure else "insecure_nbd"
        for rec in self.records().values():
            if other in rec["purpose"]:
                raise CliError(
                    "network %s already carries %s; %s and %s cannot be mixed in a pool: "
                    "run `xencbt nbd disable --network %s` first"
                    % (rec["name_label"], other, other, wanted, rec["uuid"])
                )
        if wanted in self.call("network.get_purpose", ref):
            self.say("NBD (%s) is already enabled on that network" % wanted)
        else:
            try:
                self.call("network.add_purpose", ref, wanted)
            except XapiError as e:
                raise CliError("cannot enable %s: %s" % (wanted, e)) from None
            self.say("enabled %s; waiting for the hosts to serve NBD" % wanted)
        self.wait_ready()

    def disable(self, network: str | None) -> None:
        ref = self.find(network)
        for mode in self.call("network.get_purpose", ref):
            if mode in MODES:
                self.call("network.remove_purpose", ref, mode)
                self.say("disabled %s" % mode)

    def endpoints(self) -> list[tuple[str, int]]:
        for ref, rec in self.call("VDI.get_all_records").items():
            if rec["type"] == "user" and not rec["is_a_snapshot"] and rec["SR"] != NULL_REF:
                return [(i["address"], int(i["port"])) for i in self.call("VDI.get_nbd_info", ref)]
        return []

    def wait_ready(self, timeout: float = PROPAGATION_TIMEOUT) -> None:
        """Until every NBD address greets us (propagation takes ~10 s on a real pool)."""
        deadline = time.monotonic() + timeout
        pending = set(self.endpoints())
        while pending:
            pending = {e for e in pending if not greets(*e)}
            if not pending:
                break
            if time.monotonic() > deadline:
                raise CliError(
                    "NBD is enabled but %s did not answer within %d s: check the "
                    "hosts' PIFs on that network" % (sorted(pending), timeout)
                )
            time.sleep(0.5)
        self.say("NBD is served")


def greets(address: str, port: int) -> bool:
    try:
        with socket.create_connection((address, port), timeout=5) as s:
            return s.recv(8) == b"NBDMAGIC"
    except OSError:
        return False
