"""``xensim serve``: the whole simulated pool in one process.

Starts one HTTPS API endpoint and one NBD server per host, prints the ready line (one
JSON object) on stdout, and runs until SIGTERM/SIGINT.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import secrets
import signal
import ssl
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import certs, inventory
from .admin import Admin
from .database import Database, write_atomically
from .dom0 import DEFAULT_CLEANUP, Dom0
from .exports import Resolver
from .faults import Counters, Faults
from .guest_boot import DEFAULT_BOOT_SECONDS
from .nbdserver import NBDServer
from .web import WebServer
from .xapi import Xapi, XapiOptions

log = logging.getLogger(__name__)

BIND_ATTEMPTS = 20


@dataclass
class ServeOptions:
    state_dir: Path
    listen: str = "127.0.0.1"
    hosts: int = 1
    vms: int = 1
    disk_sizes: tuple[int, ...] = (64 << 20, (20 << 20) + 512)
    nbd_purpose: str = "nbd"
    propagation: float = 0.0
    session_timeout: float = 86400.0
    in_use_wait: float = 4.0
    vbd_cleanup: float = DEFAULT_CLEANUP  # seconds to unplug+destroy an NBD VBD (dom0.py)
    auth_fail_delay: float = 5.0
    srs: str = "shared"  # or "local": an SR per host, VMs spread over the hosts
    oem_vm: int = 0  # 1: add "oem-vm" (inventory.py _oem_vm)
    boot_seconds: float = DEFAULT_BOOT_SECONDS  # a started guest's agent reports (guest_boot.py)


def host_addresses(listen: str, count: int) -> list[str]:
    """On 127.0.0.1 each host gets its own loopback address (all of 127/8 is loopback on
    Linux), so all hosts share one port, as real hosts do; elsewhere they share ``listen``."""
    if listen != "127.0.0.1":
        return [listen] * count
    base = ipaddress.ip_address("127.0.0.1")
    return [str(base + i) for i in range(count)]


def password(state_dir: Path) -> str:
    path = state_dir / "password"
    if not path.exists():
        write_atomically(path, secrets.token_urlsafe(18) + "\n")
    return path.read_text().strip()


def open_database(opts: ServeOptions) -> Database:
    """Load DIR/state.json, or build the initial pool when the state dir is new (the
    options below only matter then: afterwards the persisted state wins)."""
    path = opts.state_dir / "state.json"
    if path.exists():
        return Database.load(path)
    db = Database(path)
    specs = []
    for i, address in enumerate(host_addresses(opts.listen, opts.hosts)):
        cert, _ = host_cert(opts.state_dir, i, address)
        specs.append(
            inventory.HostSpec(f"host{i}", address, cert.read_text(), f"host{i}.xensim.test")
        )
    inventory.build(
        db,
        opts.state_dir,
        specs,
        opts.vms,
        list(opts.disk_sizes),
        opts.nbd_purpose,
        opts.srs,
        oem_vm=bool(opts.oem_vm),
    )
    db.save()
    return db


def host_cert(state_dir: Path, index: int, address: str) -> tuple[Path, Path]:
    names = [f"host{index}.xensim.test", "localhost"]
    return certs.make_cert(state_dir / "certs", f"host{index}", names, [address])


def bind_all(make: Callable[[int, int], Any], count: int, same_port: bool) -> list:
    """Start ``make(index, port)`` for each host, all on one free port when ``same_port``;
    retry with another port when one address has it taken."""
    for _ in range(BIND_ATTEMPTS):
        servers = [make(0, 0)]
        port = _port(servers[0])
        try:
            for index in range(1, count):
                servers.append(make(index, port if same_port else 0))
            return servers
        except OSError:
            for server in servers:
                server.stop()
    raise OSError("no port free on every host address")


def _port(server: Any) -> int:
    return server.port if isinstance(server, NBDServer) else server.server_address[1]


class Simulator:
    def __init__(self, opts: ServeOptions) -> None:
        self.opts = opts
        self.state_dir = opts.state_dir
        self.password = password(self.state_dir)
        self.db = open_database(opts)
        self.xapi = Xapi(
            self.db,
            XapiOptions(
                self.state_dir,
                self.password,
                session_timeout=opts.session_timeout,
                in_use_wait=opts.in_use_wait,
                auth_fail_delay=opts.auth_fail_delay,
                propagation=opts.propagation,
                boot_seconds=opts.boot_seconds,
            ),
        )
        self.faults = Faults()
        # host0 (the master) first, then host1, … (state.json does not keep the order)
        self.hosts = sorted(self.db.refs("host"), key=self._host_index)
        self.names = {ref: self.db.get("host", ref)["name_label"] for ref in self.hosts}
        self.counters = {self.names[ref]: Counters() for ref in self.hosts}
        self.web: list[WebServer] = []
        self.nbd: list[NBDServer] = []

    def _host_index(self, ref: str) -> int:
        return int(self.db.get("host", ref)["name_label"].removeprefix("host"))

    def _files(self, ref: str) -> tuple[Path, Path]:
        index = self.hosts.index(ref)
        return host_cert(self.state_dir, index, self.db.get("host", ref)["address"])

    def start(self) -> None:
        addresses = [self.db.get("host", ref)["address"] for ref in self.hosts]
        same_port = len(set(addresses)) == len(addresses)
        count = len(self.hosts)
        self.nbd = bind_all(lambda i, p: self._start_nbd(self.hosts[i], p), count, same_port)
        self.xapi.options.nbd_port = self.nbd[0].port
        admin = Admin(self.xapi, self.faults, self.counters)
        self.web = bind_all(lambda i, p: self._start_web(self.hosts[i], p, admin), count, same_port)
        peers = {ref: web.server_address[1] for ref, web in zip(self.hosts, self.web)}
        for web in self.web:
            web.peers = peers  # for the port in a 302 Location (web.py _redirected)

    def _start_nbd(self, ref: str, port: int) -> NBDServer:
        cert, key = self._files(ref)
        server = NBDServer(
            self.db.get("host", ref)["address"],
            port,
            mode=lambda: self.xapi.propagation.mode(ref),
            certfile=str(cert),
            keyfile=str(key),
            resolve=Resolver(self.xapi, Dom0(self.db, ref, self.opts.vbd_cleanup)),
            faults=self.faults,
            counters=self.counters[self.names[ref]],
        )
        server.start()
        return server

    def _start_web(self, ref: str, port: int, admin: Admin) -> WebServer:
        cert, key = self._files(ref)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        # TLS 1.2 only, like the host's stunnel (xen-api ocaml/xapi/xapi_stunnel_server.ml:
        # sslVersion = Tls_policy.Openssl.default_version, "TLSv1.2").
        context.minimum_version = context.maximum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(cert, key)
        address = (self.db.get("host", ref)["address"], port)
        master = ref == self.hosts[0]
        server = WebServer(address, context, self.xapi, ref, admin if master else None)
        server.start()
        return server

    def info(self) -> dict:
        master = self.web[0]
        url = f"https://{master.server_address[0]}:{master.server_address[1]}"
        hosts = []
        for ref, web, nbd in zip(self.hosts, self.web, self.nbd):
            rec = self.db.get("host", ref)
            hosts.append(
                {
                    "uuid": rec["uuid"],
                    "name": rec["name_label"],
                    "address": rec["address"],
                    "nbd_port": nbd.port,
                    "xapi": f"https://{web.server_address[0]}:{web.server_address[1]}",
                    "cert_file": str(self._files(ref)[0]),
                }
            )
        return {
            "xapi": url,
            "user": "root",
            "password_file": str(self.state_dir / "password"),
            "ca_file": hosts[0]["cert_file"],
            "control": f"{url}/xensim",
            "state_dir": str(self.state_dir),
            "pid": os.getpid(),
            "hosts": hosts,
        }

    def stop(self) -> None:
        for server in self.web:
            server.stop()
        for nbd in self.nbd:
            nbd.stop()
        with self.db.lock:
            self.db.save()


def run(opts: ServeOptions) -> int:
    opts.state_dir.mkdir(parents=True, exist_ok=True)
    # SIGTERM/SIGINT are blocked before any thread starts (threads inherit the mask) and
    # taken by sigwait in the main thread: a process-directed signal the kernel handed to
    # a server thread would never wake a main thread asleep in Event.wait.
    stops = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stops)
    sim = Simulator(opts)
    sim.start()
    try:
        info = sim.info()
        write_atomically(opts.state_dir / "serve.json", json.dumps(info, indent=1) + "\n")
        sys.stdout.write(json.dumps(info) + "\n")
        sys.stdout.flush()
        log.info("xensim ready: %s", info["xapi"])
        log.info("stopping on signal %d", signal.sigwait(stops))
    finally:
        sim.stop()
        (opts.state_dir / "serve.json").unlink(missing_ok=True)
    return 0
