"""A repository's own settings: ``REPO/repository.conf`` (INI, section [repository]).

Written once by ``xencbt init`` (or by the first backup or copy into a directory that has
none), atomically, 0600.  A key at hand means an encrypted repository, as in restic (a
repository always has a password) and borg (a passphrase is for an encrypted one): init,
the first backup and the copy into a new repository encrypt whenever a key is given,
unless ``--encryption none`` (``--to-encryption none``) says otherwise; a copy of an
encrypted repository is encrypted unless asked otherwise (``copy_target``).  The
settings apply to every new point; points already written keep what they were written
with (their manifest says which).

An encrypted repository (``encryption = luks``, repokey.py says how) also holds its
``key_salt`` and ``key_check``: ``unlock`` checks the key given against them before a
command reads or writes anything.  Its compression is ``none`` (qemu cannot do both).
"""

from __future__ import annotations

import configparser
import io
import logging
from dataclasses import dataclass

from ..errors import RepositoryError, UsageError
from . import repokey
from .layout import SETTINGS, write_atomically
from .repository import Repository

log = logging.getLogger(__name__)

NAME = SETTINGS
SECTION = "repository"
COMPRESSIONS = ("zstd", "none")
DEFAULT_COMPRESSION = "zstd"
ENCRYPTIONS = ("none", "luks")


@dataclass
class RepoConfig:
    compression: str = DEFAULT_COMPRESSION
    encryption: str = "none"
    key_salt: str = ""  # hex; with encryption only (repokey.py)
    key_check: str = ""  # hex HMAC-SHA256: the key check value, never the key

    @property
    def encrypted(self) -> bool:
        return self.encryption != "none"

    def shown(self) -> dict:
        """The settings as ``--json`` shows them: not the key check (derived from the key)."""
        return {"compression": self.compression, "encryption": self.encryption}

    def describe(self) -> str:
        return "compression %s, encryption %s" % (self.compression, self.encryption)

    def to_ini(self) -> str:
        parser = configparser.ConfigParser()
        values = {"compression": self.compression, "encryption": self.encryption}
        if self.encrypted:
            values.update(key_salt=self.key_salt, key_check=self.key_check)
        parser[SECTION] = values
        out = io.StringIO()
        out.write("# xencbt repository settings (xencbt init); they apply to new points\n")
        parser.write(out)
        return out.getvalue()


def path(repo: Repository):
    return repo.root / NAME


def load(repo: Repository) -> RepoConfig | None:
    """The repository's settings, or None when it has no settings file (older ones)."""
    p = path(repo)
    if not p.is_file():
        return None
    parser = configparser.ConfigParser()
    try:
        parser.read_string(p.read_text(encoding="utf-8"), source=str(p))
        section = parser[SECTION]
    except (configparser.Error, KeyError, UnicodeDecodeError) as e:
        raise RepositoryError("%s is unreadable (%s): fix or remove it" % (p, e)) from None
    config = RepoConfig(
        compression=section.get("compression", DEFAULT_COMPRESSION).strip(),
        encryption=section.get("encryption", "none").strip(),
        key_salt=section.get("key_salt", "").strip(),
        key_check=section.get("key_check", "").strip(),
    )
    if config.compression not in COMPRESSIONS:
        raise RepositoryError(
            "%s: unknown compression %r (one of %s)"
            % (p, config.compression, ", ".join(COMPRESSIONS))
        )
    if config.encryption not in ENCRYPTIONS:
        raise RepositoryError(
            "%s: encryption %r is not supported by this xencbt" % (p, config.encryption)
        )
    if config.encrypted:
        try:
            if (
                len(bytes.fromhex(config.key_salt)) < 8
                or len(bytes.fromhex(config.key_check)) != 32
            ):
                raise ValueError
        except ValueError:
            raise RepositoryError("%s: its key_salt or key_check is damaged" % p) from None
    return config


def encrypted(compression: str | None, key: repokey.RepoKey) -> RepoConfig:
    """The settings of a new encrypted repository for ``key``."""
    if compression not in (None, "none"):
        raise UsageError(
            "an encrypted repository (--encrypt, or a key given) stores uncompressed "
            "clusters (qemu cannot compress and encrypt one qcow2): leave out --compression, "
            "give --compression none, or --encryption none for a clear repository"
        )
    salt = repokey.new_salt()
    return RepoConfig("none", "luks", salt.hex(), key.check_value(salt))


def chosen(key_file: str | None, encryption: str | None, compression: str | None) -> RepoConfig:
    """The settings of a new repository: encrypted when ``encryption`` says luks, or when
    it says nothing and a key is at hand; clear when it says none, or without a key."""
    if encryption is None:
        encryption = "luks" if key_file else "none"
    if encryption not in ENCRYPTIONS:
        raise UsageError("encryption must be one of %s" % ", ".join(ENCRYPTIONS))
    if encryption == "none":
        return RepoConfig(compression=compression or DEFAULT_COMPRESSION)
    if not key_file:
        raise UsageError(
            "an encrypted repository needs the key: --key-file FILE (key_file= in the config "
            "file, or XENCBT_KEY_FILE)"
        )
    return encrypted(compression, repokey.load(key_file))


def copy_target(
    source: Repository,
    dst: Repository,
    to_key_file: str | None,
    key_file: str | None,
    encryption: str | None,
) -> str | None:
    """The encryption a copy's new DST gets (None when DST has settings: they stay).  A
    copy of an encrypted SRC is encrypted, and so is any copy with a key at hand, unless
    ``encryption`` is none.  UsageError, before anything is written, for a copy that would
    write an encrypted SRC's points into a clear DST unasked, or a DST key given where
    nothing would be encrypted."""
    src = load(source)
    src_encrypted = src is not None and src.encrypted
    if encryption == "none" and to_key_file:
        raise UsageError(
            "--to-encryption none writes the copy in clear: --to-key-file would not be used "
            "(leave out one of them)"
        )
    config = load(dst)
    if config is None:
        if encryption is None:
            encryption = "luks" if src_encrypted or to_key_file or key_file else "none"
        return encryption
    if encryption is not None and encryption != config.encryption:
        raise UsageError(
            "repository %s exists with encryption %s: its settings stay (--to-encryption "
            "chooses them for a new repository only)" % (dst.root, config.encryption)
        )
    if not config.encrypted and to_key_file:
        raise UsageError(
            "repository %s is not encrypted: --to-key-file would not be used (leave it out, "
            "or copy into a new repository, which is then encrypted)" % dst.root
        )
    if not config.encrypted and src_encrypted and encryption != "none":
        raise UsageError(
            "repository %s is encrypted and %s is not: the copy would write its points and "
            "VM configurations in clear; copy into a new or an encrypted repository, or give "
            "--to-encryption none to copy in clear all the same" % (source.root, dst.root)
        )
    return None


def unlock(repo: Repository, key_file: str | None, required: bool = True) -> RepoConfig | None:
    """The repository's settings, its key checked and registered (repokey.unlock) when
    it is encrypted: before a command reads or writes anything.  ``required`` False: a
    command that reads no image or sidecar (list) goes on without a key."""
    config = load(repo)
    if config is None or not config.encrypted:
        if key_file and config is not None:
            log.info("repository %s is not encrypted: the key file is not used", repo.root)
        return config
    if not key_file:
        if not required:
            return config
        raise UsageError(
            "repository %s is encrypted: give its key file (--key-file FILE, key_file= in "
            "the config file, or XENCBT_KEY_FILE)" % repo.root
        )
    key = repokey.load(key_file)
    repokey.unlock(repo.root, key, bytes.fromhex(config.key_salt), config.key_check)
    return config


def init(repo: Repository, config: RepoConfig) -> int | None:
    """Create ``repo`` with ``config``; a repository that already has settings is refused
    (its points were written with them).  The mode an existing empty folder had when it
    was made private (Repository.claim), else None."""
    if config.compression not in COMPRESSIONS:
        raise UsageError("--compression must be one of %s" % ", ".join(COMPRESSIONS))
    if config.encrypted and config.compression != "none":
        raise UsageError("an encrypted repository stores uncompressed clusters")
    if path(repo).exists():
        raise RepositoryError(
            "%s is already a repository (%s): its settings stay"
            % (repo.root, (load(repo) or RepoConfig()).describe())
        )
    opened = repo.claim()
    write_atomically(path(repo), config.to_ini())
    return opened


def ensure(
    repo: Repository, say, key_file: str | None = None, encryption: str | None = None
) -> RepoConfig:
    """The settings new points are written with.  A directory without settings gets them
    written down (``chosen``: encrypted when a key is given), and the user is told; a
    repository that holds points but no settings (made before settings existed) gets the
    clear defaults, as they apply to new points only, and is refused a key: its points
    are in clear."""
    config = load(repo)
    if config is not None:
        return config
    if (encryption or ("luks" if key_file else "none")) != "none" and older_points(repo):
        raise UsageError(
            "repository %s holds points written in clear before repositories had settings: "
            "a key was given, and it cannot be encrypted now; leave out the key, or back up "
            "into a new repository" % repo.root
        )
    config = chosen(key_file, encryption, None)
    repo.create()
    write_atomically(path(repo), config.to_ini())
    if config.encrypted:
        unlock(repo, key_file)
    why = "a key was given, so it is encrypted" if config.encrypted else "using the defaults"
    say(
        "xencbt: repository %s has no settings yet: %s (%s), written to %s; "
        "xencbt init chooses others" % (repo.root, why, config.describe(), path(repo))
    )
    return config


def older_points(repo: Repository) -> bool:
    return repo.root.is_dir() and any(c.manifest_files() for c in repo.chains())
