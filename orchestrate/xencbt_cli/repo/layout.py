"""Where a repository keeps what, and how its files are written: the names of its
directories and files, their modes (private: disk images hold everything a VM has) and
the one way a file is replaced (``write_atomically``).  The lowest floor of ``repo``:
everything else here builds on it.

REPO/repository.conf                      settings (repoconfig.py), the repository's marker
REPO/<vm-uuid>/<vdi-uuid>/<point>.qcow2   a disk point's image, .sums its chunk digests,
                                          .json its manifest (manifest.py)
REPO/<vm-uuid>/<vdi-uuid>/.lock           the chain's lock;  .prune.json: journal.py
REPO/<vm-uuid>/points/<point>.json        a VM point (vmpoints.py); .snapshots.json: ledger.py
REPO/<vm-uuid>/drills.json                the VM's restore drills and their RTO (drills.py)
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
from pathlib import Path

from ..proc import testhook

FORMAT = 2  # 2: chunked digest + sidecar; 1: whole-disk sha256 only (still read)
POINT = re.compile(r"^\d{8}T\d{6}\.\d{6}Z$")
LEFTOVER = (".partial", ".tmp")  # files only a writer in progress has
# Disk images hold everything a VM has: only the repository's owner may read them.
PRIVATE_DIR, PRIVATE_FILE = 0o700, 0o600
LOCK = ".lock"
SETTINGS = "repository.conf"  # repoconfig.py: the repository's own marker
VM_POINTS = "points"  # REPO/<vm-uuid>/points/: the VM points (vmpoints.py)
DRILLS = "drills.json"  # REPO/<vm-uuid>/drills.json: restore drills (drills.py)


def make_dirs(path: Path) -> None:
    """``mkdir -p`` where every directory created is 0700, whatever the umask."""
    if path.is_dir():
        return
    make_dirs(path.parent)
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=PRIVATE_DIR)
        os.chmod(path, PRIVATE_DIR)


def exposed(path: Path) -> int | None:
    """The mode of ``path`` when other users may use it, else None."""
    mode = stat.S_IMODE(path.lstat().st_mode)
    return mode if mode & 0o077 else None


def write_atomically(path: Path, content: str | bytes) -> None:
    """tmp file, fsync, rename, fsync the directory."""
    tmp = path.with_name(path.name + ".tmp")
    data = content.encode("utf-8") if isinstance(content, str) else content
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_FILE)
        os.fchmod(fd, PRIVATE_FILE)  # a tmp file left by an older run may be 0644
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        testhook.pause("write-tmp")
        testhook.pause("write-tmp" + path.suffix)  # e.g. write-tmp.sums, write-tmp.json
        os.replace(tmp, path)
        testhook.pause("write-done")
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()  # e.g. ENOSPC half-way: leave nothing behind
        raise
    fsync_dir(path.parent)


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    fsync(path)


def disk_usage(path: Path) -> int:
    return path.stat().st_blocks * 512
