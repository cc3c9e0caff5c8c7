"""The key of an encrypted repository: checked, registered, and used for sidecars.

Design (README, "Encryption at rest"):

* Every image of an encrypted repository is a qcow2 with LUKS encryption
  (``encrypt.format=luks``).  qemu gets the key only as a file-backed secret object,
  ``--object secret,id=…,file=KEYFILE``: it reads the key file itself, so the key is never
  in argv, the environment, a log or an error.  image.py is the one place that builds
  those options.  qemu 7.2 refuses compression and encryption in one qcow2 ("Compression
  and encryption not supported at the same time"), so an encrypted repository stores
  uncompressed clusters: ``init --encrypt --compression zstd`` is a usage error.
* The key file's bytes are the LUKS passphrase; qemu reads a LUKS secret as UTF-8 text,
  so a key file must be UTF-8, and at least 32 bytes (``openssl rand -base64 48``): its
  strength is all there is, as LUKS's own PBKDF is kept short (image.ITER_TIME_MS).
* Trailing whitespace is not part of the key (as restic reads a password file): the same
  key without its final newline, or with CRLF (as a password vault hands it out), opens
  the repository.  The repository keeps the exact bytes it was created with (the key
  check and every LUKS header are over them, so repositories stay as they were): those
  bytes are found among the forms of the key given (``RepoKey.forms``) by the key check,
  and when they are not the file's own bytes qemu reads them from a private in-memory
  file (``memfd``, ``RepoKey.qemu_file``), never from disk or argv.
* ``repository.conf`` holds a random salt and a key check value: HMAC-SHA256 of a fixed
  label under a key derived from the key file (HKDF-SHA256, salt, its own info label),
  never the key.  Every command that reads or writes images checks the key against it
  first, so a wrong or missing key is one clear line before anything is written.
* Sidecars that reveal content (chunk sums ``.sums``, a VM point's ``.config.json`` with
  vTPM and NVRAM) are sealed with AES-256-GCM under another HKDF-derived key, a random
  96-bit nonce per file and the file's path in the repository as associated data (a
  sealed file moved to another name does not open).  Manifests stay clear and hold
  nothing secret.

The unlocked repositories are registered here (root -> key), so whoever reads an image
or a sidecar under a root finds its key from the path alone, as ``copy`` needs two.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from xencbt_core.secret import register

from ..errors import RepositoryError, UsageError, WrongKey

log = logging.getLogger(__name__)

MIN_BYTES = 32
SALT_BYTES = 16
CHECK_LABEL = b"xencbt repository key check v1"
CHECK_INFO = b"xencbt key check"
SEAL_INFO = b"xencbt sidecar aes-256-gcm v1"
MAGIC = b"XENCBT-SEALED-1\n"  # a sealed sidecar starts with it: never mistaken for clear
NONCE_BYTES = 12
WHITESPACE = b" \t\r\n"  # trailing, not part of a key
_copies: dict[bytes, int] = {}  # key form -> memfd holding it (RepoKey.qemu_file)


@dataclass(frozen=True)
class RepoKey:
    """A key file, read once to derive from; qemu reads the file again by itself
    (``exact``), or the same key in the form the repository has (``qemu_file``)."""

    path: Path
    material: bytes
    exact: bool = True  # the file holds exactly ``material``

    def __repr__(self) -> str:  # never the material
        return "RepoKey(%s)" % self.path

    def forms(self) -> list[RepoKey]:
        """The key as given, then without its trailing whitespace, then with the line
        ends a key file is usually written with: one of them is the form a repository
        was created with (its key check says which)."""
        bare = self.material.rstrip(WHITESPACE)
        found = [self.material]
        for form in (bare, bare + b"\n", bare + b"\r\n"):
            if form not in found:
                found.append(form)
        return [RepoKey(self.path, form, form == self.material) for form in found]

    def qemu_file(self) -> str:
        """The file qemu reads this key from: the key file itself when it holds exactly
        these bytes, else an in-memory copy of them, private to this process and gone
        when it exits (/proc/PID/fd/N of a memfd: our children may open it)."""
        if self.exact:
            return str(self.path)
        fd = _copies.get(self.material)
        if fd is None:
            fd = os.memfd_create("xencbt-key", os.MFD_CLOEXEC)
            os.write(fd, self.material)
            _copies[self.material] = fd
        return "/proc/%d/fd/%d" % (os.getpid(), fd)

    def derive(self, salt: bytes, info: bytes) -> bytes:
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(
            self.material
        )

    def check_value(self, salt: bytes) -> str:
        mac = hmac.new(self.derive(salt, CHECK_INFO), CHECK_LABEL, hashlib.sha256)
        return mac.hexdigest()


def load(path: str | Path) -> RepoKey:
    """The key file at ``path``; UsageError naming the file (never its content)."""
    path = Path(path).absolute()
    try:
        material = path.read_bytes()
    except OSError as e:
        raise UsageError("cannot read the key file %s: %s" % (path, e.strerror)) from None
    if len(material) < MIN_BYTES:
        raise UsageError(
            "the key file %s holds %d bytes, fewer than %d: make one with "
            "'openssl rand -base64 48 > FILE'" % (path, len(material), MIN_BYTES)
        )
    try:
        text = material.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(
            "the key file %s is not UTF-8 text (qemu reads LUKS keys as text): make one "
            "with 'openssl rand -base64 48 > FILE'" % path
        ) from None
    register(text)
    register(text.strip())
    if os.stat(path).st_mode & 0o077:
        log.warning("the key file %s is open to other users: chmod 600 %s", path, path)
    return RepoKey(path, material)


def new_salt() -> bytes:
    return os.urandom(SALT_BYTES)


@dataclass(frozen=True)
class Unlocked:
    """A repository whose key was checked: its root, key and salt."""

    root: Path
    key: RepoKey
    salt: bytes

    def aead(self) -> AESGCM:
        return AESGCM(self.key.derive(self.salt, SEAL_INFO))

    def name(self, path: Path) -> bytes:
        """The associated data of a sidecar: its path in the repository."""
        return Path(os.path.abspath(path)).relative_to(self.root).as_posix().encode()


_unlocked: dict[Path, Unlocked] = {}


def unlock(root: Path, key: RepoKey, salt: bytes, check: str) -> Unlocked:
    """Check ``key`` (in any of its forms: trailing whitespace is not part of it)
    against the repository's check value; register the form that matches."""
    match = [k for k in key.forms() if hmac.compare_digest(k.check_value(salt), check)]
    if match:
        key = match[0]
    else:
        raise WrongKey(
            "the key file %s is not the key of repository %s (its key check does not "
            "match): nothing was read or written" % (key.path, root)
        )
    found = Unlocked(Path(os.path.abspath(root)), key, salt)
    _unlocked[found.root] = found
    return found


def of(path: str | Path) -> Unlocked | None:
    """The unlocked repository ``path`` lies in, or None (clear, or not a repository)."""
    path = Path(os.path.abspath(path))
    for root in sorted(_unlocked, key=lambda r: len(r.parts), reverse=True):
        if path == root or root in path.parents:
            return _unlocked[root]
    return None


def forget(root: Path) -> None:
    _unlocked.pop(Path(os.path.abspath(root)), None)


def sealed(path: Path, data: bytes) -> bytes:
    """What to write at ``path``: ``data`` sealed when its repository is encrypted."""
    unlocked = of(path)
    if unlocked is None:
        return data
    nonce = os.urandom(NONCE_BYTES)
    return MAGIC + nonce + unlocked.aead().encrypt(nonce, data, unlocked.name(path))


def opened(path: Path, blob: bytes) -> bytes:
    """The content of the sidecar at ``path`` read as ``blob``; RepositoryError if it is
    sealed and cannot be opened (no key, or damaged, or moved)."""
    unlocked = of(path)
    if not blob.startswith(MAGIC):
        if unlocked is not None:
            raise RepositoryError(
                "%s is not encrypted in an encrypted repository: it was replaced" % path.name
            )
        return blob
    if unlocked is None:
        raise RepositoryError("%s is encrypted: give the repository's key file" % path.name)
    nonce = blob[len(MAGIC) : len(MAGIC) + NONCE_BYTES]
    try:
        return unlocked.aead().decrypt(nonce, blob[len(MAGIC) + NONCE_BYTES :], unlocked.name(path))
    except InvalidTag:
        raise RepositoryError(
            "%s does not decrypt: it is damaged or not where it was written" % path.name
        ) from None
