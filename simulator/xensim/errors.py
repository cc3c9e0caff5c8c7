"""Typed XAPI failures: what the wire carries as ``ErrorDescription``."""

from __future__ import annotations

# SR backend failures come from sm's XE_SR_ERRORCODES table; xapi wraps them as
# [SR_BACKEND_FAILURE_<n>, "", "<description> [opterr=<detail>]", ""].
SM_ERRORS = {
    38: "The requested method is not supported/implemented",
    66: "Invalid VDI type",
    79: "VDI Invalid size",
    459: "Changed block tracking log is in an inconsistent state",
    460: "Failed to calculate changed blocks for given VDIs.",
}


class ServerError(Exception):
    """A structured API failure, xapi's ``Api_errors.Server_error``: ``code`` plus string
    parameters."""

    def __init__(self, code: str, *params: object) -> None:
        self.code = code
        self.params = [str(p) for p in params]
        super().__init__(code, *self.params)

    @property
    def description(self) -> list[str]:
        return [self.code, *self.params]


def sr_backend_failure(number: int, opterr: str) -> ServerError:
    message = f"{SM_ERRORS[number]} [opterr={opterr}]"
    return ServerError(f"SR_BACKEND_FAILURE_{number}", "", message, "")


def handle_invalid(cls: str, ref: str) -> ServerError:
    return ServerError("HANDLE_INVALID", cls, ref)


def uuid_invalid(cls: str, uuid: str) -> ServerError:
    return ServerError("UUID_INVALID", cls, uuid)


def session_invalid(ref: str) -> ServerError:
    return ServerError("SESSION_INVALID", ref)
