"""One machine, one budget: at most 16 NBD connections per host from this machine.

A host's NBD server closes the 17th connection (xen-api ``ocaml/nbd/src/main.ml``
``connection_limit``), and it counts a connection until dom0 has unplugged its VBD, a
second or two after the client left.  Every connection of every xencbt process and nbdkit
plugin instance on this machine holds one *slot*: an ``flock`` on one of 16 files per
host.  The kernel drops a lock when its holder dies, so a killed process frees its slots.

A host is named by the SHA-256 of its certificate (the same for every address that
reaches it), else by address and port.  The files live in ``$XENCBT_RUNTIME_DIR``, else
``/run/xencbt`` when it exists (packaging may create it), else ``/var/tmp/xencbt``.  Two
users share one budget: the directory is made sticky and world-writable like /tmp, and a
slot file needs only read access to be locked.  Files are opened with O_NOFOLLOW (no
symlink games in a shared directory).  A directory that cannot be used costs the
machine-wide part of the budget only: a warning, and the in-process limit still holds.
(Any local user can hold slots, so a hostile one can make our connections wait.)
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import stat
import threading
from pathlib import Path

log = logging.getLogger(__name__)

PER_HOST = 16
ENV = "XENCBT_RUNTIME_DIR"


def runtime_dir() -> Path:
    if os.environ.get(ENV):
        return Path(os.environ[ENV])
    if Path("/run/xencbt").is_dir():
        return Path("/run/xencbt")
    return Path("/var/tmp/xencbt")


def host_key(cert_pem: str, address: str, port: int) -> str:
    if cert_pem.strip():
        return hashlib.sha256(cert_pem.strip().encode()).hexdigest()[:32]
    return hashlib.sha256(("%s:%d" % (address, port)).encode()).hexdigest()[:32]


class Slot:
    """One held slot; ``release`` (or the process's death) frees it."""

    def __init__(self, fd: int | None, name: str):
        self._fd = fd
        self.name = name

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing the only descriptor drops the flock


class Slots:
    """The machine's slot files; ``try_take`` never blocks."""

    def __init__(self, directory: Path | None = None, per_host: int = PER_HOST):
        self.directory = Path(directory) if directory else runtime_dir()
        self.per_host = per_host
        self._usable: bool | None = None
        self._lock = threading.Lock()

    def try_take(self, key: str) -> Slot | None:
        """A free slot for the host ``key``, or None when all are held."""
        if not self._ready():
            return Slot(None, "unshared")
        for i in range(self.per_host):
            name = "%s.%02d" % (key, i)
            try:
                fd = self._open(self.directory / name)
            except OSError as e:
                self._give_up("cannot open %s: %s" % (self.directory / name, e.strerror))
                return Slot(None, "unshared")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    continue
                raise
            return Slot(fd, name)
        return None

    @staticmethod
    def _open(path: Path) -> int:
        flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW
        try:
            return os.open(path, flags)
        except FileNotFoundError:
            fd = os.open(path, flags | os.O_CREAT, 0o644)
            try:
                os.fchmod(fd, 0o644)  # whatever the umask: others must be able to open it
            except OSError:
                pass  # another user's file
            return fd

    def _ready(self) -> bool:
        with self._lock:
            if self._usable is None:
                self._usable = self._prepare()
            return self._usable

    def _prepare(self) -> bool:
        d = self.directory
        try:
            d.mkdir(parents=True, exist_ok=True)
            st = os.lstat(d)
            if not stat.S_ISDIR(st.st_mode):
                raise OSError(errno.ENOTDIR, "not a directory")
            if st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) != 0o1777:
                os.chmod(d, 0o1777)  # shared by every user of the machine, like /tmp
        except OSError as e:
            self._warn(d, e.strerror or str(e))
            return False
        return True

    def _give_up(self, why: str) -> None:
        with self._lock:
            self._usable = False
        self._warn(self.directory, why)

    @staticmethod
    def _warn(directory: Path, why: str) -> None:
        log.warning(
            "the machine-wide NBD connection budget is off (%s: %s): other xencbt "
            "processes on this machine may push a host past its 16 connections; set %s "
            "to a directory every xencbt user can write",
            directory,
            why,
            ENV,
        )
