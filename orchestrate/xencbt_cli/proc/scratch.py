"""Private scratch directories that a killed xencbt does not leave behind.

``tempfile.TemporaryDirectory`` removes its directory when the block ends, which a
SIGKILL (the OOM killer, a cron or systemd timeout) never lets happen: sockets,
progress files and, for ``files get``, a guest's half-fetched file stayed behind.  So
each directory made here holds an ``.owner`` file that its process keeps locked
(``flock``) for as long as the directory is in use; the kernel drops the lock when the
process dies, however it dies.  Making a directory first sweeps its siblings of the same
prefix: any of ours whose lock can be taken is a dead run's, and is removed.

Only directories of this user are swept (``lstat``: no symlink is followed), and one
whose ``.owner`` is missing is left alone: its maker may be between ``mkdtemp`` and the
lock (``.owner`` appears already locked).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator

log = logging.getLogger(__name__)

OWNER = ".owner"


@contextlib.contextmanager
def private_dir(prefix: str, parent: str | None = None) -> Iterator[str]:
    """A new 0700 directory ``parent/prefix…`` (the temp dir by default), removed when
    the block ends, or by the next run after a SIGKILL."""
    parent = parent or tempfile.gettempdir()
    sweep(parent, prefix)
    path = tempfile.mkdtemp(prefix=prefix, dir=parent)
    # Locked before it is named .owner: a sweep must never find it unlocked.
    locking = os.path.join(path, OWNER + ".new")
    fd = os.open(locking, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # new: nobody else has it open
        os.rename(locking, os.path.join(path, OWNER))
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        os.close(fd)


def sweep(parent: str, prefix: str) -> list[str]:
    """Remove the directories ``parent/prefix*`` of dead runs of this user; their paths."""
    removed = []
    with contextlib.suppress(OSError), os.scandir(parent) as entries:
        for entry in entries:
            if entry.name.startswith(prefix) and _abandoned(entry.path):
                shutil.rmtree(entry.path, ignore_errors=True)
                log.debug("removed %s, left by a run that was killed", entry.path)
                removed.append(entry.path)
    return removed


def _abandoned(path: str) -> bool:
    try:
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
            return False
        fd = os.open(os.path.join(path, OWNER), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False  # its run is alive
    finally:
        os.close(fd)  # also lets go of the lock taken
    return True
