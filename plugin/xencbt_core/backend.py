"""Everything the nbdkit plugin does, minus nbdkit: built from Params, started, closed.

Life cycle (matching nbdkit's): ``Backend(params)`` after config_complete; ``start()``
in get_ready — logs in, looks up the VDI, reads the bitmap and opens the first NBD
connection, so every setup error stops nbdkit before it serves anything;
``after_fork()`` starts the keep-alive thread (threads do not survive fork);
``close()`` in cleanup logs out.
"""

from __future__ import annotations

import logging
import threading

from . import __version__
from .cbt import Bitmap
from .errors import ConfigError, XencbtError
from .export import Export
from .params import Params
from .pool import Pool
from .secret import read_file
from .source import FileSource, XapiSource
from .trust import Expectation
from .upstream import Target
from .xapi import ApiTrust, Session

log = logging.getLogger(__name__)

ORIGINATOR = "xencbt-plugin"  # the plugin's sessions, apart from the CLI's in xapi's list
KEEPALIVE_INTERVAL = 300.0  # seconds; XAPI expires sessions idle for 24 h


class Backend:
    def __init__(self, params: Params):
        params.check()
        self.params = params
        self.session: Session | None = None
        self.source: FileSource | XapiSource | None = None
        self.export: Export | None = None
        self.pool: Pool | None = None
        self._stop = threading.Event()
        self._keepalive: threading.Thread | None = None

    def start(self) -> Export:
        p = self.params
        bitmap = None
        if p.nbd_info:
            self.source = FileSource(p.nbd_info)
        else:
            self.session = open_session(p)
            self.source = XapiSource(self.session, p.vdi)
            if p.since:
                bitmap = self.source.changed_since(p.since)
        self._warn_if_plain(self.source.targets())
        self.pool = Pool(self.source, self.expectation, p.connections, p.timeout, p.retry_timeout)
        size = self.pool.start()
        if isinstance(self.source, XapiSource):
            size = self._check_size(size, self.source.vdi.size)
        elif p.changed:
            bitmap = _read_bitmap(p.changed, size)
        self.export = Export(self.pool, size, bitmap, p.unchanged, p.readahead)
        self._log_summary(bitmap, size)
        return self.export

    def _warn_if_plain(self, targets: list[Target]) -> None:
        plain = [str(t) for t in targets if t.plain]
        if plain:
            log.warning(
                "the pool serves this disk over NBD WITHOUT TLS (network purpose "
                "insecure_nbd, read from XAPI): disk data crosses the network unencrypted "
                "to %s; `xencbt nbd enable` without --insecure switches to TLS",
                ", ".join(plain),
            )

    # The export names of vdi=: one export, whatever name the client asks for (as
    # before vm= existed, so every recipe with nbd+unix:///?socket= stays true).
    def list_exports(self) -> list[tuple[str, str]]:
        return [("", "")]

    def default_export(self) -> str:
        return ""

    def open(self, name: str) -> Export:
        assert self.export is not None
        return self.export

    def expectation(self, target: Target) -> Expectation | None:
        """How to verify ``target``; None means plain NBD: on an insecure_nbd network (as
        XAPI says), or with tls=off for an nbd-info= record without a certificate.  A
        target on an nbd network always gets TLS, whatever its server offers."""
        p = self.params
        if target.plain:
            return None
        if p.verify == "ca":
            return Expectation("ca", target.cert, target.subject, p.cafile)
        if target.cert:
            return Expectation(p.verify, target.cert, target.subject)
        if p.tls == "off":
            log.warning("connecting to %s WITHOUT TLS (tls=off, insecure_nbd network)", target)
            return None
        raise ConfigError(
            "the NBD info for %s has no certificate: the host serves NBD without TLS "
            "(network purpose insecure_nbd). Refusing an unencrypted, unverified connection; "
            "switch the network to purpose nbd, or pass tls=off to accept it" % target
        )

    def _check_size(self, served: int, virtual: int) -> int:
        if served < virtual:
            raise XencbtError(
                "the NBD server exports %d bytes but the VDI's virtual size is %d"
                % (served, virtual)
            )
        return virtual

    def _log_summary(self, bitmap: Bitmap | None, size: int) -> None:
        if bitmap is None:
            log.debug("serving %d bytes, all data", size)
        else:
            log.debug(
                "serving %d bytes, %d changed (%d blocks of 64 KiB), unchanged as %s",
                size,
                bitmap.changed_bytes(),
                bitmap.changed_blocks(),
                self.params.unchanged,
            )

    def after_fork(self) -> None:
        if self.session is not None:
            self._keepalive = threading.Thread(target=self._keep_alive, daemon=True)
            self._keepalive.start()

    def _keep_alive(self) -> None:
        while not self._stop.wait(KEEPALIVE_INTERVAL):
            try:
                self.session.pool_refs()
            except XencbtError as e:
                log.warning("keeping the XAPI session alive failed: %s", e)

    def close(self) -> None:
        self._stop.set()
        if self.pool is not None:
            self.pool.close()
        if self.session is not None:
            self.session.logout()


def open_session(p: Params) -> Session:
    return Session(
        p.xapi,
        ApiTrust(p.xapi_cafile, p.thumbprint, p.xapi_insecure),
        user=p.user,
        password=p.password,
        session_ref=p.session,
        timeout=p.timeout,
        originator=ORIGINATOR,
    )


def _read_bitmap(path: str, size: int) -> Bitmap:
    return Bitmap.from_base64(read_file(path, "changed-blocks"), size)


def dump() -> dict[str, str]:
    """--dump-plugin lines (key=value)."""
    import ssl
    import sys

    import cryptography

    from .params import HELP
    from .pool import MAX_CONNECTIONS

    lines = {
        "xencbt_version": __version__,
        "xencbt_python": sys.version.split()[0],
        "xencbt_openssl": ssl.OPENSSL_VERSION,
        "xencbt_cryptography": cryptography.__version__,
        "xencbt_verify_modes": "cert,pubkey,ca",
        "xencbt_export_kinds": "vdi,vm",
        "xencbt_unchanged_modes": "hole,zero",
        "xencbt_max_connections": str(MAX_CONNECTIONS),
        "xencbt_block_size": "65536",
        "thread_model": "parallel",
        "can_extents": "1",
        "can_multi_conn": "1",
        "read_only": "1",
    }
    for key, text in HELP.items():
        lines["xencbt_param_" + key.replace("-", "_")] = text
    return lines
