"""Which client carries a new upstream connection: ours (upstream.py, Python ssl) or libnbd.

``upstream=python`` always uses ours.  ``upstream=libnbd`` uses libnbd (native.py) for TLS
connections whose certificate GnuTLS can be held to, ours otherwise (plain NBD gains
nothing: Python reads a plain socket in large pieces already).  The certificate pinned for
libnbd is learnt once per address and expectation: for verify=cert it is get_nbd_info's
own; for pubkey and ca, the one a Python-ssl handshake (without the export name) presented
and trust.py accepted.
"""

from __future__ import annotations

import logging
import threading

from . import native
from .errors import ConfigError, TrustError
from .trust import Expectation, pem_to_der
from .upstream import Connection, Target, probe

log = logging.getLogger(__name__)

ENGINES = ("python", "libnbd")


class Dialer:
    def __init__(self, engine: str = "python"):
        if engine not in ENGINES:
            raise ConfigError("upstream=%s: give one of %s" % (engine, ", ".join(ENGINES)))
        if engine == "libnbd" and not native.available():
            raise ConfigError("upstream=libnbd needs python3-libnbd in nbdkit's Python")
        self.engine = engine
        self._pins: dict[tuple, bytes | None] = {}
        self._lock = threading.Lock()

    def open(self, target: Target, expect: Expectation | None, timeout: float):
        """A handshaken connection (upstream.Connection or native.NativeConnection)."""
        if self.engine == "python" or expect is None:
            return Connection.open(target, expect, timeout)
        der = self._pin(target, expect, timeout)
        if der is None:
            return Connection.open(target, expect, timeout)
        try:
            return native.NativeConnection.open(target, der, timeout)
        except TrustError:
            # GnuTLS only says "certificate verification failed": let trust.py look at
            # what the server shows, for the message it gives (fingerprints, the mode).
            # A server that passes here swapped certificates between two handshakes.
            probe(target, expect, timeout)
            raise

    def _pin(self, target: Target, expect: Expectation, timeout: float) -> bytes | None:
        key = (target.address, target.port, expect)
        with self._lock:
            if key in self._pins:
                return self._pins[key]
        if expect.mode == "cert":
            der = pem_to_der(expect.cert_pem)  # what trust.py demands, byte for byte
        else:
            der = probe(target, expect, timeout)
        why = native.reason_not_to_pin(der, target.address)
        if why:
            log.info(
                "%s: reading over Python's ssl, not libnbd: %s, and libnbd 1.14's GnuTLS "
                "checks that (REFERENCE §5)",
                target,
                why,
            )
        with self._lock:
            self._pins[key] = None if why else der
        return self._pins[key]
