"""What a repository promises, checked cheaply: metadata, ``qemu-img info``, ``stat``.

verify runs these for every point before it reads the data (verify.py), and the tests
run the same promises, written again on their side, after every command that wrote to a
repository (tests/invariants.py).  Each breach is one sentence naming the file and what
mends it:

* the settings parse (``repository.conf``, repoconfig.py);
* an encrypted repository's images are all qcow2 LUKS (``encrypt.format`` luks in
  ``qemu-img info``), whichever command wrote them;
* a zstd repository's images have ``compression-type`` zstd in their header.  Only the
  header is judged: qemu stores a cluster uncompressed whenever compressing does not
  shrink it, so an image of random or already compressed data legitimately holds no
  compressed cluster, and counting them (``qemu-img check``) proves nothing about a
  bug.  A point whose manifest records compression none was written so (before the
  repository had settings): the settings apply to new points only;
* directories 0700 and files 0600 (only what xencbt made: Repository.exposed);
* a point's manifest has its image (and its ``.sums``: verify reads them with the data,
  content_problem in verify.py);
* an image's backing file is a bare name in its own directory (relative, inside the
  repository), the previous point's image;
* a VM's drill record (``drills.json``, drills.py) parses.

Images without a manifest, temp files and stray sums are leftovers of an interrupted
run, which the next writer or ``xencbt repair`` removes: verify notes them (verify.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import CliError, RepositoryError
from ..proc import qemu_img
from . import drills, repoconfig
from .layout import PRIVATE_DIR, PRIVATE_FILE
from .manifest import Manifest
from .repository import Chain, Repository

SHOWN = 5  # paths a mode breach names


@dataclass(frozen=True)
class Breach:
    path: Path
    problem: str

    def __str__(self) -> str:
        return "%s: %s" % (self.path, self.problem)


def settings(repo: Repository) -> tuple[repoconfig.RepoConfig | None, list[Breach]]:
    """The repository's settings (None without any), or the breach that they do not parse."""
    try:
        return repoconfig.load(repo), []
    except RepositoryError as e:
        return None, [Breach(repoconfig.path(repo), "the settings do not parse: %s" % e)]


def drill_records(repo: Repository) -> list[Breach]:
    """The VMs' drill records that do not parse (a drill starts a new one)."""
    found = []
    for vm_dir in sorted(repo.root.iterdir()) if repo.root.is_dir() else []:
        if (vm_dir / drills.DRILLS).is_file():
            try:
                drills.load(repo.root, vm_dir.name)
            except RepositoryError as e:
                found.append(Breach(vm_dir / drills.DRILLS, str(e)))
    return found


def modes(repo: Repository, paths: dict[Path, int] | None = None) -> list[Breach]:
    """The directories and files of xencbt's that other users may use, as one breach
    naming the first few (an older xencbt's repository has hundreds)."""
    found = repo.exposed() if paths is None else paths
    if not found:
        return []
    shown = ["%s (%04o)" % (relative(repo, p), mode) for p, mode in list(found.items())[:SHOWN]]
    more = " and %d more" % (len(found) - SHOWN) if len(found) > SHOWN else ""
    return [
        Breach(
            repo.root,
            "%d directories and files are open to other users: %s%s; directories must be "
            "%04o and files %04o (xencbt repair makes them so)"
            % (len(found), ", ".join(shown), more, PRIVATE_DIR, PRIVATE_FILE),
        )
    ]


def relative(repo: Repository, path: Path) -> str:
    return str(path.relative_to(repo.root)) if path != repo.root else "."


def point(chain: Chain, m: Manifest, config: repoconfig.RepoConfig | None) -> list[str]:
    """What point ``m`` breaks of the repository's promises (its image's header, its
    files); empty when it keeps them.  Reads headers only: no key needed."""
    path = chain.image_path(m.point)
    if not path.is_file():
        return ["its manifest is there but its image %s is missing" % path.name]
    try:
        info = qemu_img.info(path)
    except CliError as e:
        return ["qemu-img cannot read the header of %s: %s" % (path.name, e)]
    return header(path.name, info, m, config)


def header(name: str, info: dict, m: Manifest, config: repoconfig.RepoConfig | None) -> list[str]:
    """What ``qemu-img info`` of the image says against the settings and the manifest."""
    data = info.get("format-specific", {}).get("data", {})
    luks = data.get("encrypt", {}).get("format") == "luks"
    compression = data.get("compression-type", "zlib")
    problems = []
    if config is not None and config.encrypted and not luks:
        problems.append(
            "image %s is NOT encrypted, in an encrypted repository: its data is readable "
            "without the key" % name
        )
    if (config is None or not config.encrypted) and info.get("encrypted"):
        problems.append("image %s is encrypted, in a clear repository: nothing can read it" % name)
    if m.compression == "zstd" and compression != "zstd":
        problems.append(
            "image %s has compression-type %s, not the zstd its manifest records (the "
            "repository's compression): it was written uncompressed" % (name, compression)
        )
    backing = info.get("backing-filename")
    if backing and (os.path.isabs(backing) or os.path.dirname(backing) or backing in ("..", ".")):
        problems.append(
            "image %s is backed by %s: a backing file must be a name in the same directory "
            "(relative, inside the repository)" % (name, backing)
        )
    return problems
