"""A repository's own settings: ``REPO/repository.conf`` (INI, section [repository]).

Written once by ``xencbt init`` (or by the first backup into a directory that has none,
with the defaults), atomically, 0600.  The settings apply to every new point; points
already written keep what they were written with (their manifest says which).
"""

from __future__ import annotations

import configparser
import io
import logging
from dataclasses import dataclass

from .errors import RepositoryError, UsageError
from .repository import Repository, write_atomically

log = logging.getLogger(__name__)

NAME = "repository.conf"
SECTION = "repository"
COMPRESSIONS = ("zstd", "none")
DEFAULT_COMPRESSION = "zstd"


@dataclass
class RepoConfig:
    compression: str = DEFAULT_COMPRESSION
    encryption: str = "none"

    def describe(self) -> str:
        return "compression %s, encryption %s" % (self.compression, self.encryption)

    def to_ini(self) -> str:
        parser = configparser.ConfigParser()
        parser[SECTION] = {"compression": self.compression, "encryption": self.encryption}
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
    )
    if config.compression not in COMPRESSIONS:
        raise RepositoryError(
            "%s: unknown compression %r (one of %s)"
            % (p, config.compression, ", ".join(COMPRESSIONS))
        )
    if config.encryption != "none":
        raise RepositoryError(
            "%s: encryption %r is not supported by this xencbt" % (p, config.encryption)
        )
    return config


def init(repo: Repository, config: RepoConfig) -> None:
    """Create ``repo`` with ``config``; a repository that already has settings is refused
    (its points were written with them)."""
    if config.compression not in COMPRESSIONS:
        raise UsageError("--compression must be one of %s" % ", ".join(COMPRESSIONS))
    if path(repo).exists():
        raise RepositoryError(
            "%s is already a repository (%s): its settings stay"
            % (repo.root, (load(repo) or RepoConfig()).describe())
        )
    repo.create()
    write_atomically(path(repo), config.to_ini())


def ensure(repo: Repository, say) -> RepoConfig:
    """The settings new points are written with.  A directory without settings gets the
    defaults written down, and the user is told: a repository that holds points but no
    settings (made before settings existed) gets them too, as they apply to new points
    only."""
    config = load(repo)
    if config is not None:
        return config
    config = RepoConfig()
    repo.create()
    write_atomically(path(repo), config.to_ini())
    say(
        "xencbt: repository %s has no settings yet: using the defaults (%s), written to %s; "
        "xencbt init chooses others" % (repo.root, config.describe(), path(repo))
    )
    return config
