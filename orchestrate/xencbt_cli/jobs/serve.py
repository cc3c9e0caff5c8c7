"""Serve one disk read-only over NBD for file-level restore: a backup point, or a live snapshot.

A backup point is served by ``qemu-nbd --read-only`` on its qcow2 chain; a live VDI by
nbdkit with the plugin on a snapshot taken for the purpose (destroyed afterwards); a live
VM the same way with ``vm=``: every disk of its snapshot is an export of one nbdkit,
named by its userdevice (``nbd+unix:///1?socket=…``), the lowest being the default.

We open the listening socket ourselves and hand it to the server by socket activation
(``LISTEN_FDS``, understood by qemu-nbd and nbdkit): clients may connect as soon as the
address is printed (connections wait in the backlog), ``tcp:HOST:0`` gets a free port we
can name, and a unix socket is created private (0600) before anyone can race us.

A non-loopback TCP listen is refused unless TLS is configured: a backup is the whole disk,
and anyone who can reach the port could read it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import shlex
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from xencbt_core import nbdproto
from xencbt_core.errors import XapiError
from xencbt_core.params import UUID

from ..errors import OK, CliError, CommandFailed, UsageError
from ..proc import command
from ..proc.scratch import private_dir
from ..proc.signals import STOP_SIGNALS
from ..repo import image as images
from ..repo.repository import Repository
from ..settings import Settings
from ..xapi.facade import PoolApi, Vm
from ..xapi.networks import warn_if_insecure
from .snapshot_copy import Copier, plugin

log = logging.getLogger(__name__)

LISTEN_FD = 3  # sd_listen_fds(3): passed sockets start at fd 3
STOP_TIMEOUT = 30
READY_TIMEOUT = 120  # the plugin logs in to XAPI before it serves
SNAPSHOT_NAME = "xencbt-serve"
CONNECTIONS = 2  # upstream connections of a snapshot served for mounting (of 16 per host)
CERT_FILES = ("ca-cert.pem", "server-cert.pem", "server-key.pem")


class Stopped(KeyboardInterrupt):
    """SIGTERM, SIGINT or SIGHUP arrived: the normal end of a serve."""


@dataclass(frozen=True)
class Listen:
    """Where to listen: ``unix:PATH`` or ``tcp:HOST:PORT`` (``[v6]:PORT``; port 0 = free)."""

    path: str = ""
    host: str = ""
    port: int = 0

    @classmethod
    def parse(cls, spec: str | None) -> Listen:
        if not spec:
            return cls()  # a unix socket in a private temporary directory
        kind, _, rest = spec.partition(":")
        if kind == "unix" and rest:
            return cls(path=rest)
        if kind == "tcp":
            host, _, port = rest.rpartition(":")
            host = host.strip("[]")
            if host and port.isdigit() and int(port) < 65536:
                return cls(host=host, port=int(port))
        raise UsageError("--listen %s: expected unix:PATH or tcp:HOST:PORT" % spec)

    @property
    def tcp(self) -> bool:
        return bool(self.host)

    def loopback(self) -> bool:
        """True for a unix socket or a TCP address every resolution of which is loopback."""
        if not self.tcp:
            return True
        return all(ipaddress.ip_address(a[4][0]).is_loopback for a in self.resolve())

    def resolve(self) -> list:
        try:
            return socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
        except socket.gaierror as e:
            raise UsageError("--listen: cannot resolve %s: %s" % (self.host, e)) from None


@dataclass(frozen=True)
class Tls:
    """TLS for the served export: a PSK file (psktool's ``user:hexkey`` lines, as nbdkit's
    --tls-psk and qemu's keys.psk) or a directory of ca-cert.pem, server-cert.pem and
    server-key.pem; with certificates, clients must present one signed by that CA."""

    psk: str = ""
    certificates: str = ""

    def __post_init__(self) -> None:
        if self.psk and not os.path.isfile(self.psk):
            raise UsageError("--tls-psk %s: no such file" % self.psk)
        if self.certificates:
            missing = [f for f in CERT_FILES if not os.path.isfile(self.cert(f))]
            if missing:
                raise UsageError(
                    "--tls-certificates %s lacks %s" % (self.certificates, ", ".join(missing))
                )

    def __bool__(self) -> bool:
        return bool(self.psk or self.certificates)

    def cert(self, name: str) -> str:
        return os.path.join(os.path.abspath(self.certificates), name)

    def nbdkit_args(self) -> list[str]:
        if self.psk:
            return ["--tls=require", "--tls-psk=" + os.path.abspath(self.psk)]
        if self.certificates:
            return [
                "--tls=require",
                "--tls-certificates=" + os.path.abspath(self.certificates),
                "--tls-verify-peer",
            ]
        return []

    def qemu_args(self, private_dir: str) -> list[str]:
        """qemu wants a directory holding ``keys.psk``: a link in our private directory."""
        if self.psk:
            os.symlink(os.path.abspath(self.psk), os.path.join(private_dir, "keys.psk"))
            creds = "tls-creds-psk,id=tls0,endpoint=server,dir=%s" % private_dir
        elif self.certificates:
            creds = "tls-creds-x509,id=tls0,endpoint=server,verify-peer=on,dir=%s" % (
                os.path.abspath(self.certificates)
            )
        else:
            return []
        return ["--object", creds, "--tls-creds", "tls0"]


@dataclass
class Endpoint:
    """What a client connects to: the URI and the matching nbd-client command line."""

    listen: Listen
    tls: Tls
    port: int = 0

    def uri(self) -> str:
        scheme = "nbds" if self.tls else "nbd"
        if not self.listen.tcp:
            return "%s+unix:///?socket=%s" % (scheme, self.listen.path)
        host = "[%s]" % self.listen.host if ":" in self.listen.host else self.listen.host
        return "%s://%s:%d/" % (scheme, host, self.port)

    def nbd_client(self) -> str | None:
        """The kernel client's command line, or None: nbd-client does TLS with certificates
        over TCP only."""
        if self.tls.psk or (self.tls and not self.listen.tcp):
            return None
        if self.listen.tcp:
            argv = ["nbd-client", self.listen.host, str(self.port), "/dev/nbd0"]
        else:
            argv = ["nbd-client", "-unix", self.listen.path, "/dev/nbd0"]
        argv.append("-readonly")
        if self.tls.certificates:
            argv += ["-cacertfile", self.tls.cert("ca-cert.pem")]
            argv += ["-certfile", "CLIENT-CERT.pem", "-keyfile", "CLIENT-KEY.pem"]
        return shlex.join(argv)

    def describe(self) -> dict:
        return {"uri": self.uri(), "nbd_client": self.nbd_client(), "tls": bool(self.tls)}


def check_listen(listen: Listen, tls: Tls) -> None:
    if not listen.loopback() and not tls:
        raise UsageError(
            "refusing to serve on %s:%d without TLS: anyone who can reach it could read "
            "the disk; listen on a unix socket or a loopback address, or give --tls-psk "
            "FILE or --tls-certificates DIR" % (listen.host, listen.port)
        )


@contextlib.contextmanager
def listening(listen: Listen, private_dir: str) -> Iterator[tuple[socket.socket, Listen, int]]:
    """Bind and listen; yield the socket, the resolved Listen and the TCP port.  The
    unix socket file is removed on exit."""
    if listen.tcp:
        family, kind, proto, _, addr = listen.resolve()[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        _bind(sock, addr, "%s:%d" % (listen.host, listen.port))
        sock.listen(16)
        host, port = sock.getsockname()[:2]
        if ipaddress.ip_address(host).is_unspecified:  # every address: name the machine
            host = socket.getfqdn()
        with sock:
            yield sock, Listen(host=host, port=port), port
        return
    path = listen.path or os.path.join(private_dir, "nbd.sock")
    if os.path.lexists(path):
        raise CliError("%s exists: remove it or choose another --listen unix:PATH" % path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # created 0600: only our user may connect
    try:
        _bind(sock, path, path)
    finally:
        os.umask(old)
    try:
        sock.listen(16)
        with sock:
            yield sock, Listen(path=os.path.abspath(path)), 0
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _bind(sock: socket.socket, addr, shown: str) -> None:
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise CliError("cannot listen on %s: %s" % (shown, e.strerror or e)) from None


def run_server(argv: list[str], sock: socket.socket, ready: Callable[[], None]) -> None:
    """Run the server on ``sock`` until SIGINT/SIGTERM (return) or its own exit (raise)."""
    log.info("running %s", command.shown(argv))
    proc = command.start(argv, pass_fds=(LISTEN_FD,), preexec_fn=command.activated(sock))
    try:
        wait_ready(sock, proc, argv[0])
        ready()
        code = proc.wait()
        raise CommandFailed(
            "%s stopped by itself (exit %d): see its messages above" % (argv[0], code)
        )
    except KeyboardInterrupt:  # SIGINT or SIGTERM, as Stopped
        log.info("stopping %s", argv[0])
    finally:
        _stop(proc)


def wait_ready(sock: socket.socket, proc: subprocess.Popen, name: str) -> None:
    """Return once the server greets a client (then say goodbye: NBD_OPT_ABORT).

    Announcing only then means the printed URI works, a server that cannot start (an
    unreadable image, a wrong password) is reported instead, and a stop signal never
    reaches a server still starting (qemu-nbd forgets a SIGTERM that arrives then).
    """
    address = sock.getsockname()
    if sock.family != socket.AF_UNIX and ipaddress.ip_address(address[0]).is_unspecified:
        address = ("::1" if sock.family == socket.AF_INET6 else "127.0.0.1", *address[1:])
    deadline = time.monotonic() + READY_TIMEOUT
    with socket.socket(sock.family, socket.SOCK_STREAM) as probe:
        probe.connect(address)  # lands in the backlog at once
        probe.settimeout(0.2)
        greeting = b""
        while len(greeting) < nbdproto.GREETING.size:
            if proc.poll() is not None:
                raise CommandFailed(
                    "%s exited (%d) before serving: see its messages above"
                    % (name, proc.returncode)
                )
            if time.monotonic() > deadline:
                raise CommandFailed("%s did not start serving in %ds" % (name, READY_TIMEOUT))
            with contextlib.suppress(TimeoutError):
                chunk = probe.recv(nbdproto.GREETING.size - len(greeting))
                if not chunk:
                    raise CommandFailed("%s closed its first connection" % name)
                greeting += chunk
        flags = nbdproto.GREETING.unpack(greeting)[2] & nbdproto.CLIENT_FLAGS_MASK
        probe.sendall(struct.pack(">I", flags))
        probe.sendall(nbdproto.OPTION.pack(nbdproto.IHAVEOPT, nbdproto.OPT_ABORT, 0))


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _raise_stopped(signum, frame) -> None:
    _quiet()  # the first signal stops us; more (Ctrl-C twice, systemd) must not cut cleanup
    raise Stopped()


def _quiet() -> None:
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


@contextlib.contextmanager
def stop_signals() -> Iterator[None]:
    """SIGTERM, SIGHUP and SIGINT end a serve (SIGINT too when started ignoring it, as a
    background job of a script does: ``kill -INT`` must still stop it); old handlers come
    back after."""
    old = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    for s in old:
        signal.signal(s, _raise_stopped)
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


class Server:
    """One serve: where it listens, with what TLS, and how it announces itself."""

    def __init__(self, listen: Listen, tls: Tls, announce: Callable[[dict], None]):
        check_listen(listen, tls)
        self.listen, self.tls, self.announce = listen, tls, announce

    def point(self, repo: Repository, vdi: str, at: str | None) -> None:
        chain = repo.find(vdi)
        # Shared: backups and prunes (exclusive) wait or fail meanwhile, so no point of
        # the served chain is merged or removed under the server.
        with chain.lock(shared=True):
            m = chain.get(at)
            image = chain.image_path(m.point)
            what = {"vdi": chain.vdi_uuid, "point": m.point, "type": m.type}
            with private_dir("xencbt-serve-") as private:
                # An encrypted chain: qemu-nbd reads the key file (image.opening).
                options, name = images.opening(image)
                argv = ["qemu-nbd", "--read-only", *options, "--persistent"]
                argv += ["--shared=0", *self.tls.qemu_args(private), name]
                self._serve(argv, private, what)

    def snapshot(self, pool: PoolApi, copier: Copier, vdi: str) -> None:
        """Serve ``vdi`` through the plugin: a snapshot of it, or it if it is a snapshot."""
        ref, rec = _pool_vdi(pool, vdi)
        taken = not rec["is_a_snapshot"]
        if taken:
            ref = pool.snapshot_vdi(ref)
        uuid = pool.vdi_uuid(ref)
        try:
            if taken:  # a name that says whose it is, should a crash leave it behind
                label = "%s %s" % (SNAPSHOT_NAME, rec["name_label"])
                pool.set_vdi_name(ref, label)
            what = {"vdi": rec["uuid"], "snapshot": uuid, "snapshot_taken": taken}
            with private_dir("xencbt-serve-") as private:
                argv = ["nbdkit", "-f", "--exit-with-parent", "--readonly"]
                argv += [*self.tls.nbdkit_args(), *plugin_args(copier, uuid)]
                self._serve(argv, private, what)
        finally:
            if taken:
                pool.destroy_vdi(ref, uuid)

    def vm_snapshot(self, pool: PoolApi, copier: Copier, name: str) -> None:
        """Serve every disk of the VM ``name`` through the plugin (vm=): a snapshot of the
        VM taken for the purpose, or the VM snapshot given."""
        ref, rec = _pool_vm(pool, name)
        taken = not rec["is_a_snapshot"]
        if taken:
            # Not "xencbt-…": a backup destroys those as leftovers of its own runs.
            label = "xencbt serve of %s" % rec["name_label"]
            ref = pool.snapshot(Vm(ref, rec["uuid"], rec["name_label"]), label)
        try:
            exports = [d.userdevice for d in pool.disks(ref)]
            what = {
                "vm": rec["uuid"],
                "snapshot": pool.vm_uuid(ref),
                "snapshot_taken": taken,
                "exports": exports,
            }
            with private_dir("xencbt-serve-") as private:
                argv = ["nbdkit", "-f", "--exit-with-parent", "--readonly"]
                argv += [*self.tls.nbdkit_args(), *plugin_args(copier, what["snapshot"], "vm")]
                self._serve(argv, private, what)
        finally:
            if taken:
                pool.destroy_snapshot(ref, keep=set())

    def _serve(self, argv: list[str], private: str, what: dict) -> None:
        with listening(self.listen, private) as (sock, listen, port):
            endpoint = Endpoint(listen, self.tls, port)
            run_server(argv, sock, lambda: self.announce({**what, **endpoint.describe()}))


def _pool_vdi(pool: PoolApi, vdi: str) -> tuple[str, dict]:
    if not UUID.match(vdi):
        raise UsageError("--snapshot takes a VDI uuid (xe vdi-list), not %r" % vdi)
    ref = pool.vdi_ref(vdi)
    if ref is None:
        raise CliError("no VDI %s in the pool (xe vdi-list shows them)" % vdi)
    rec = pool.vdi_record(ref)
    if rec.get("type") == "cbt_metadata":
        raise CliError("VDI %s holds no data any more (a cbt_metadata snapshot)" % vdi)
    return ref, rec


def _pool_vm(pool: PoolApi, name: str) -> tuple[str, dict]:
    """A VM by name or uuid, or a VM snapshot by uuid."""
    if UUID.match(name):
        try:
            ref = pool.vm_by_uuid(name)
        except XapiError as e:
            if e.code != "UUID_INVALID":
                raise
            raise CliError("no VDI %s (nor a VM with that uuid) in the pool" % name) from None
        return ref, pool.vm_record(ref)
    vm = pool.vm(name)
    return vm.ref, pool.vm_record(vm.ref)


def plugin_args(copier: Copier, snapshot: str, kind: str = "vdi") -> list[str]:
    return [*plugin(), *copier.params(snapshot, None, CONNECTIONS, kind)]


@dataclass
class ServeRequest:
    """What ``xencbt serve`` was asked (commands/serve_cmd.py builds it)."""

    vdi: str  # a VDI uuid or prefix of the repository; with snapshot, a pool VDI or a VM
    at: str | None = None
    snapshot: bool = False
    listen: str | None = None
    tls_psk: str | None = None
    tls_certificates: str | None = None


def serve(
    args: ServeRequest,
    conf: Settings,
    repo: Repository | None,
    announce: Callable[[dict], None],
    say: Callable[[str], None],
) -> int:
    """``xencbt serve``: runs until SIGINT/SIGTERM, then cleans up and returns 0."""
    tls = Tls(args.tls_psk or "", args.tls_certificates or "")
    server = Server(Listen.parse(args.listen), tls, announce)
    with stop_signals():
        if not args.snapshot:
            server.point(repo, args.vdi, args.at)
            return OK
        if args.at:
            raise UsageError("--at names a backup point; --snapshot serves the live VDI")
        with conf.session() as session, conf.plugin_password() as password:
            warn_if_insecure(session, say)
            pool, copier = PoolApi(session), Copier(conf, password, CONNECTIONS, False)
            if _names_a_vdi(pool, args.vdi):
                server.snapshot(pool, copier, args.vdi)
            else:
                server.vm_snapshot(pool, copier, args.vdi)
    return OK


def _names_a_vdi(pool: PoolApi, name: str) -> bool:
    """--snapshot takes a VDI uuid, or a VM by name or uuid."""
    if UUID.match(name):
        return pool.vdi_ref(name) is not None
    if not pool.vms_named(name):
        raise UsageError(
            "--snapshot takes a VDI uuid (xe vdi-list) or a VM name or uuid (xe vm-list), "
            "not %r" % name
        )
    return False
