"""The plugin's parameters: parsed, checked together, explained.

Kept apart from the nbdkit adapter so the rules are testable without nbdkit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields

from .cbt import BLOCK_SIZE
from .errors import ConfigError
from .pool import MAX_CONNECTIONS
from .secret import Secret, read_file, read_password, register
from .trust import MODES
from .upstream import MAX_REQUEST

MAX_READAHEAD = MAX_REQUEST  # one request to the host per window
# A uuid as xapi writes one (lower case); the plugin also takes one typed in upper case.
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")

HELP = {
    "xapi": "URL of the pool API (https://HOST); a pool member redirects to its master",
    "user": "XAPI user name (default root)",
    "password": "SECRET, '-' to ask, or +FILE to read it from FILE (recommended)",
    "session": "+FILE holding a logged-in session ref to reuse (never logged out)",
    "xapi-cafile": "CA or certificate file to verify the API's HTTPS certificate",
    "thumbprint": "pin the API certificate by its SHA-256 fingerprint instead",
    "xapi-insecure": "true to skip verifying the API certificate (not recommended)",
    "vdi": "UUID of the VDI snapshot to export (this or vm= with xapi=)",
    "vm": "UUID of a VM snapshot: every disk is an export, named by its userdevice "
    "(0, 1, ...) and by its VDI uuid; the default export is the lowest userdevice",
    "since": "UUID of an older snapshot (or cbt_metadata VDI): export only changes since it; "
    "with vm=: an older VM snapshot, or older disk snapshots as UUID,UUID,...",
    "unchanged": "hole (default): unchanged blocks reported as holes, reads return real "
    "data; zero: reported as zero, reads return zeros without touching the host",
    "verify": "cert (default): server cert must equal get_nbd_info's; pubkey: same public "
    "key; ca: chain to cafile= and match get_nbd_info's subject",
    "cafile": "CA bundle for verify=ca",
    "connections": "upstream NBD connections, 1..%d (default 4)" % MAX_CONNECTIONS,
    "tls": "require (default) or off: off accepts an nbd-info= record without a certificate "
    "(with xapi=, an insecure_nbd network is read from XAPI and served plain, with a warning)",
    "nbd-info": "+FILE with a get_nbd_info record (JSON object or list): no XAPI needed",
    "changed": "+FILE with a base64 bitmap as list_changed_blocks returns (with nbd-info=)",
    "timeout": "seconds to wait for the NBD server on each operation (default 60)",
    "retry-timeout": "seconds to keep reconnecting after a dropped connection (default 60)",
    "readahead": "bytes (a power of 2, 64 KiB..%d MiB) read from the host at once around a "
    "smaller read inside a changed run, for clients that read 64 KiB at a time "
    "(qemu-img convert -c); default 0: off" % (MAX_READAHEAD >> 20),
}


@dataclass
class Params:
    xapi: str = ""
    user: str = "root"
    password: Secret | None = field(default=None, repr=False)
    session: Secret | None = field(default=None, repr=False)
    xapi_cafile: str = ""
    thumbprint: str = ""
    xapi_insecure: bool = False
    vdi: str = ""
    vm: str = ""
    since: str = ""
    unchanged: str = "hole"
    verify: str = "cert"
    cafile: str = ""
    connections: int = 4
    tls: str = "require"
    nbd_info: str = ""
    changed: str = ""
    timeout: float = 60.0
    retry_timeout: float = 60.0
    readahead: int = 0

    def set(self, key: str, value: str) -> None:
        """One key=value from the command line."""
        name = key.replace("-", "_")
        if key not in HELP:
            raise ConfigError("unknown parameter %r; known: %s" % (key, ", ".join(sorted(HELP))))
        setter = getattr(self, "_set_" + name, None)
        if setter:
            setter(key, value)
            return
        kind = {f.name: f.type for f in fields(self)}[name]
        setattr(self, name, _convert(key, value, kind))

    def _set_password(self, key: str, value: str) -> None:
        self.password = read_password(value)

    def _set_session(self, key: str, value: str) -> None:
        if not value.startswith("+"):
            raise ConfigError("session= takes +FILE (a session ref on the command line leaks)")
        self.session = Secret(register(read_file(value[1:], "session")))

    def _set_nbd_info(self, key: str, value: str) -> None:
        self.nbd_info = _plus_file(key, value)

    def _set_changed(self, key: str, value: str) -> None:
        self.changed = _plus_file(key, value)

    def check(self) -> None:
        """Rules that involve several parameters; call once all are set."""
        self._check_source()
        self._check_choice("unchanged", ("hole", "zero"))
        self._check_choice("verify", MODES)
        self._check_choice("tls", ("require", "off"))
        if (self.verify == "ca") != bool(self.cafile):
            raise ConfigError("verify=ca and cafile= go together")
        if self.readahead and not (
            BLOCK_SIZE <= self.readahead <= MAX_READAHEAD
            and self.readahead & (self.readahead - 1) == 0
        ):
            raise ConfigError(
                "readahead=%d: give a power of 2 from 65536 to %d, or 0"
                % (self.readahead, MAX_READAHEAD)
            )
        if not 1 <= self.connections <= MAX_CONNECTIONS:
            raise ConfigError(
                "connections=%d: a XenServer host serves at most %d NBD connections"
                % (self.connections, MAX_CONNECTIONS)
            )

    def _check_source(self) -> None:
        if self.nbd_info:
            extra = [k for k in ("xapi", "vdi", "vm", "since", "session") if getattr(self, k)]
            if extra or self.password:
                raise ConfigError(
                    "nbd-info= replaces XAPI: drop %s" % ", ".join(extra or ["password"])
                )
            return
        if self.changed:
            raise ConfigError("changed= goes with nbd-info=; with xapi= use since=")
        if not self.xapi or bool(self.vdi) == bool(self.vm):
            raise ConfigError(
                "give xapi=URL and one of vdi=UUID or vm=UUID (or nbd-info=+FILE); see "
                "`nbdkit xencbt --dump-plugin` for every parameter"
            )
        for key in ("vdi", "vm"):
            value = getattr(self, key)
            if value and not UUID.match(value.lower()):
                raise ConfigError("%s=%s is not a UUID (like 0d1a...-...-...)" % (key, value))
        for value in self.bases():
            if not UUID.match(value.lower()):
                raise ConfigError("since=%s is not a UUID (like 0d1a...-...-...)" % value)
        if self.vdi and len(self.bases()) > 1:
            raise ConfigError("since= takes one snapshot with vdi=; a list only with vm=")
        if (self.vdi or self.vm).lower() in [b.lower() for b in self.bases()]:
            key = "vdi" if self.vdi else "vm"
            raise ConfigError("since= must be an older snapshot than %s=, not the same one" % key)
        if not (self.password or self.session):
            raise ConfigError("xapi= needs password=+FILE (or password=-) or session=+FILE")

    def bases(self) -> list[str]:
        """since= as a list: with vm= it may name several snapshots."""
        return [b.strip() for b in self.since.split(",")] if self.since else []

    def _check_choice(self, key: str, choices: tuple[str, ...]) -> None:
        if getattr(self, key) not in choices:
            raise ConfigError("%s= must be one of %s" % (key, ", ".join(choices)))


def _plus_file(key: str, value: str) -> str:
    if not value.startswith("+"):
        raise ConfigError("%s= takes +FILE" % key)
    return value[1:]


def _convert(key: str, value: str, kind: str):
    try:
        if kind == "bool":
            return _bool(value)
        if kind == "int":
            return int(value)
        if kind == "float":
            number = float(value)
            if number <= 0:
                raise ValueError
            return number
    except ValueError:
        raise ConfigError("%s=%s is not a valid %s" % (key, value, kind)) from None
    return value


def _bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(value)
