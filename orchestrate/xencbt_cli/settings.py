"""Where the connection settings come from: options, then environment, then a config file.

The config file is INI with one ``[xencbt]`` section::

    [xencbt]
    xapi = https://pool-master.example.com
    user = root
    password_file = /etc/xencbt/password      ; mode 0600 (inline comments allowed)
    xapi_cafile = /etc/xencbt/pool-master.pem
    # thumbprint = AA:BB:...
    # repo = /srv/backup
    # key_file = /etc/xencbt/repo.key         ; an encrypted repository's key, 0600

``--config FILE``, else the first of /etc/xencbt/xencbt.conf and
~/.config/xencbt/xencbt.conf that exists.  The password itself is never an option.
"""

from __future__ import annotations

import configparser
import contextlib
import logging
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path

from xencbt_core.secret import Secret, read_file, read_password, register
from xencbt_core.xapi import ApiTrust, Session

from .errors import UsageError

log = logging.getLogger(__name__)

SYSTEM_CONFIG = Path("/etc/xencbt/xencbt.conf")
USER_CONFIG = Path("~/.config/xencbt/xencbt.conf")
SECTION = "xencbt"
ENV = {
    "xapi": "XENCBT_XAPI",
    "user": "XENCBT_USER",
    "password_file": "XENCBT_PASSWORD_FILE",
    "session_file": "XENCBT_SESSION_FILE",
    "key_file": "XENCBT_KEY_FILE",
    "cluster": "XENCBT_CLUSTER",
}
KEYS = (
    "xapi",
    "user",
    "password_file",
    "session_file",
    "xapi_cafile",
    "thumbprint",
    "repo",
    "key_file",  # an encrypted repository's key (repo/repokey.py)
    "cluster",  # a Dask scheduler's address: backup --cluster (jobs/cluster.py)
)


@dataclass
class Settings:
    xapi: str = ""
    user: str = "root"
    password_file: str = ""
    session_file: str = ""
    xapi_cafile: str = ""
    thumbprint: str = ""
    repo: str = ""
    key_file: str = ""
    cluster: str = ""
    _password: Secret | None = field(default=None, repr=False, compare=False)

    def portable(self) -> dict:
        """The settings as a worker of a cluster run gets them: names and absolute paths,
        never the password itself (the worker reads the same file)."""
        if self.password_file == "-":
            raise UsageError(
                "--cluster: the workers cannot read a password from this stdin: give "
                "--password-file FILE, on a path every worker sees"
            )
        values = {
            f.name: getattr(self, f.name) for f in fields(self) if f.init and f.name != "_password"
        }
        for name in ("password_file", "session_file", "xapi_cafile", "key_file"):
            if values[name]:
                values[name] = os.path.abspath(values[name])
        return values

    def trust(self) -> ApiTrust:
        return ApiTrust(cafile=self.xapi_cafile, thumbprint=self.thumbprint, options=True)

    def require_pool(self) -> None:
        if not self.xapi:
            raise UsageError("no pool given: use --xapi URL, XENCBT_XAPI or xapi= in the config")
        if not self.password_file and not self.session_file:
            raise UsageError(
                "no password given: use --password-file FILE (mode 0600), "
                "XENCBT_PASSWORD_FILE or password_file= in the config"
            )
        if self.password_file and self.session_file:
            raise UsageError("give a password file or a session file, not both")

    def password(self) -> Secret:
        # Read once: from stdin (``-``) there is no second chance.
        if self._password is None:
            if self.password_file == "-":
                self._password = read_password("-")
                if not self._password.reveal():
                    raise UsageError(
                        "the password read from stdin (--password-file -) is empty: "
                        "pipe the password in, or give --password-file FILE"
                    )
            else:
                warn_if_exposed(self.password_file)
                self._password = read_password("+" + self.password_file)
        return self._password

    def session(self) -> Session:
        """Logged in with the password, or the session of ``session_file`` (reused, never
        logged out; on a pool member it is taken to the master like a login)."""
        self.require_pool()
        if self.session_file:
            ref = Secret(register(read_file(self.session_file, "session")))
            return Session(self.xapi, self.trust(), self.user, session_ref=ref)
        return Session(self.xapi, self.trust(), self.user, password=self.password())

    @contextlib.contextmanager
    def plugin_password(self) -> Iterator[str]:
        """The plugin's credential parameter: ``password=+FILE`` or ``session=+FILE``.
        A password read from stdin goes to the plugin through a memfd of this process
        (/proc/PID/fd/N, which only our own children may open, as repokey hands keys to
        qemu): never a file on disk, so a SIGKILL leaves no copy behind."""
        if self.session_file:
            yield "session=+" + self.session_file
            return
        if self.password_file != "-":
            yield "password=+" + self.password_file
            return
        secret = self.password()
        fd = os.memfd_create("xencbt-password", os.MFD_CLOEXEC)
        try:
            os.write(fd, (secret.reveal() + "\n").encode())
            yield "password=+/proc/%d/fd/%d" % (os.getpid(), fd)
        finally:
            os.close(fd)


def warn_if_exposed(path: str) -> None:
    """As ssh does for keys: a password file others may read gets a warning."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return  # reading it says why
    if mode & 0o077:
        log.warning(
            "the password file %s is open to other users (mode %04o): chmod 600 %s",
            path,
            stat.S_IMODE(mode),
            path,
        )


def config_file(explicit: str | None) -> Path | None:
    if explicit:
        if not Path(explicit).is_file():
            raise UsageError("config file %s does not exist" % explicit)
        return Path(explicit)
    for path in (SYSTEM_CONFIG, USER_CONFIG.expanduser()):
        if path.is_file():
            return path
    return None


def read_config(path: Path | None) -> dict[str, str]:
    if path is None:
        return {}
    # "; comment" after a value is a comment, as the README's example shows it (a ";" with
    # whitespace before it: a value such as a URL may hold a bare ";"); so is "# comment".
    parser = configparser.ConfigParser(inline_comment_prefixes=(";", "#"))
    try:
        parser.read(path, encoding="utf-8")
    except configparser.Error as e:
        raise UsageError("config file %s: %s" % (path, e)) from None
    if not parser.has_section(SECTION):
        return {}
    values = {k.replace("-", "_"): v for k, v in parser.items(SECTION)}
    if "password" in values:
        raise UsageError("config file %s: use password_file=, not password=" % path)
    unknown = set(values) - set(KEYS)
    if unknown:
        raise UsageError("config file %s: unknown keys %s" % (path, ", ".join(sorted(unknown))))
    return values


def resolve(options: dict[str, str | None], config: str | None) -> Settings:
    """Options win over the environment, which wins over the config file."""
    values = read_config(config_file(config))
    for key, var in ENV.items():
        if os.environ.get(var):
            values[key] = os.environ[var]
    for key in KEYS:
        if options.get(key):
            values[key] = str(options[key])
    settings = Settings(**values)
    if settings.xapi_cafile and settings.thumbprint:
        raise UsageError("give --xapi-cafile or --thumbprint, not both")
    return settings
