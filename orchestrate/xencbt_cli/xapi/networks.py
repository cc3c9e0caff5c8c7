"""NBD on the pool's networks (seed 001): status, enable, disable.

``nbd`` (TLS) and ``insecure_nbd`` cannot be mixed in a pool; a change takes a while to
reach the hosts' NBD servers, so enabling waits (bounded) until a host greets us.
"""

from __future__ import annotations

import logging
import socket
import time

from xencbt_core.errors import XapiError
from xencbt_core.params import UUID
from xencbt_core.upstream import CONNECT_TIMEOUT, host_address

from ..errors import CliError, UsageError
from .facade import NULL_REF

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

    def enable(
        self, network: str | None, insecure: bool, timeout: float = PROPAGATION_TIMEOUT
    ) -> None:
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
        self.wait_ready(timeout)

    def disable(self, network: str | None) -> None:
        ref = self.find(network)
        for mode in self.call("network.get_purpose", ref):
            if mode in MODES:
                self.call("network.remove_purpose", ref, mode)
                self.say("disabled %s" % mode)

    def endpoints(self) -> dict[str, list[tuple[str, int]]]:
        """The NBD addresses of each host (keyed by its certificate, one per host), from
        get_nbd_info of some user disk: IPv4 and IPv6, IPv6 in CIDR form."""
        for ref, rec in self.call("VDI.get_all_records").items():
            if rec["type"] == "user" and not rec["is_a_snapshot"] and rec["SR"] != NULL_REF:
                hosts: dict[str, list[tuple[str, int]]] = {}
                for info in self.call("VDI.get_nbd_info", ref):
                    key = info.get("cert") or info.get("subject") or info["address"]
                    hosts.setdefault(key, []).append((info["address"], int(info["port"])))
                return hosts
        return {}

    def wait_ready(self, timeout: float = PROPAGATION_TIMEOUT) -> None:
        """Until every host greets us on one of its addresses (propagation takes ~10 s on
        a real pool).  xapi-nbd listens on IPv4 only while get_nbd_info also lists the
        PIFs' IPv6 addresses (xapi_vdi.ml), so one answering address per host is enough."""
        deadline = time.monotonic() + timeout
        pending = {key: by_preference(addresses) for key, addresses in self.endpoints().items()}
        while pending:
            pending = {k: a for k, a in pending.items() if not host_greets(a)}
            if not pending:
                break
            if time.monotonic() > deadline:
                silent = sorted(format_address(*e) for a in pending.values() for e in a)
                raise CliError(
                    "NBD is enabled but %d host(s) did not answer within %d s on any of "
                    "%s: check the hosts' PIFs on that network" % (len(pending), timeout, silent)
                )
            time.sleep(0.5)
        self.say("NBD is served")


def warn_if_insecure(session, say) -> bool:
    """Say, on every run that reads disks over NBD, when the pool serves NBD without TLS.

    get_nbd_info returns a certificate even on insecure_nbd networks (xapi_vdi.ml), so the
    purpose read here, over the verified API, is what tells; the plugin then connects
    without TLS to exactly those networks' addresses, and with TLS everywhere else."""
    names = [
        rec["name_label"]
        for rec in session.call("network.get_all_records").values()
        if "insecure_nbd" in rec["purpose"]
    ]
    for name in sorted(names):
        say(
            "xencbt: warning: network %r has purpose insecure_nbd: disk data crosses the "
            "network UNENCRYPTED; `xencbt nbd disable` then `xencbt nbd enable` (without "
            "--insecure) switches it to TLS" % name
        )
    return bool(names)


def by_preference(addresses: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """IPv4 first: the one family xapi-nbd listens on."""
    return sorted(addresses, key=lambda e: ":" in e[0])


def format_address(address: str, port: int) -> str:
    host = host_address(address)
    return "[%s]:%d" % (host, port) if ":" in host else "%s:%d" % (host, port)


def host_greets(addresses: list[tuple[str, int]]) -> bool:
    """Try a host's addresses in order until one connects: it either greets (NBD is
    served) or not yet (propagation); the addresses after it need not be tried."""
    for address, port in addresses:
        answer = probe(address, port)
        if answer is not None:
            return answer
    return False


def probe(address: str, port: int) -> bool | None:
    """True: an NBD server greets us there; False: something accepted the connection
    but sent no greeting; None: nothing there.  A dead address costs at most a short
    connect timeout (a link-local IPv6 address without a zone fails at once)."""
    try:
        sock = socket.create_connection((host_address(address), port), CONNECT_TIMEOUT)
    except OSError:
        return None
    with sock:
        try:
            return sock.recv(8) == b"NBDMAGIC"
        except OSError:
            return False
