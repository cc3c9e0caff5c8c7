"""Typed errors.  The type says what the caller can do next."""

from __future__ import annotations

import errno


class XencbtError(Exception):
    """Base of every error xencbt raises on purpose; str() is meant for a human."""

    errno = errno.EIO


class ConfigError(XencbtError):
    """A parameter is missing, malformed or contradicts another one."""

    errno = errno.EINVAL


class XapiError(XencbtError):
    """XAPI answered with a Failure.  ``code`` and ``params`` as in ErrorDescription."""

    def __init__(self, code: str, params: list[str] | tuple[str, ...] = (), hint: str = ""):
        self.code = code
        self.params = list(params)
        self.hint = hint
        text = code if not self.params else "%s %s" % (code, self.params)
        super().__init__(text + (": " + hint if hint else ""))


class SessionInvalid(XapiError):
    """The session expired or was logged out: log in again (and refresh NBD info)."""


class AuthenticationFailed(XapiError):
    """The user name or password was refused: only an operator can fix that."""


class ChainBroken(XencbtError):
    """list_changed_blocks cannot relate the two snapshots: a full backup is needed."""


class TrustError(XencbtError):
    """The peer's certificate is not the one we were told to expect.  Never retried."""

    errno = errno.EACCES


class UpstreamError(XencbtError):
    """Something went wrong talking to the host's NBD server."""


class ConnectionDead(UpstreamError):
    """The connection dropped or could not be made; a fresh one may succeed."""


class Unreachable(ConnectionDead):
    """Nothing accepted a TCP connection at that address (dead, filtered, or not one the
    NBD server listens on, like a host's IPv6 addresses)."""


class PayloadCut(ConnectionDead):
    """The connection died in the middle of a read's data.  What arrived is good (the host
    sends data only as it reads it, after a success header): ``received`` bytes of it."""

    def __init__(self, message: str, received: int):
        super().__init__(message)
        self.received = received


class ExportRefused(UpstreamError):
    """The server closed the connection at the export name (stale session or bad VDI)."""


class ProtocolError(UpstreamError):
    """The server broke the NBD protocol; the connection is unusable."""


class RequestFailed(UpstreamError):
    """The server answered one request with an NBD error.  The host's server serves no
    more on that connection afterwards, so it is dropped; a fresh one may be opened."""

    def __init__(self, message: str, error: int):
        super().__init__(message)
        self.errno = error


class RetriesExhausted(UpstreamError):
    """Reconnecting kept failing; the last cause is chained."""
