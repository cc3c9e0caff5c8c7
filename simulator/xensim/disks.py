"""VDI data files and the per-VDI lock shared by every xensim process on a state dir.

Data lives in ``DIR/vdis/<uuid>.raw`` as a sparse file. ``xensim serve`` and
``xensim guest-disk`` are separate processes touching the same files, so every change to
a VDI's data or CBT log happens under an exclusive ``flock`` on ``DIR/vdis/<uuid>.lock``.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import logging
import os
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def data_path(state_dir: Path, uuid: str) -> Path:
    return Path(state_dir) / "vdis" / f"{uuid}.raw"


@contextlib.contextmanager
def locked(state_dir: Path, uuid: str) -> Iterator[None]:
    """Hold the VDI's cross-process lock (data file + CBT log) for the block."""
    path = Path(state_dir) / "vdis" / f"{uuid}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def create(state_dir: Path, uuid: str, size: int) -> None:
    path = data_path(state_dir, uuid)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)


def write_boot_sector(state_dir: Path, uuid: str) -> None:
    """A boot sector in sector 0: the 0x55AA signature a BIOS checks before it boots a
    disk (guest_boot.py).  No partition table: what a test writes on the disk later (a
    whole-disk file system, a GPT image) is all the disk holds besides."""
    with open(data_path(state_dir, uuid), "r+b") as f:
        f.seek(510)
        f.write(b"\x55\xaa")


def remove(state_dir: Path, uuid: str) -> None:
    for suffix in (".raw", ".lock"):
        with contextlib.suppress(FileNotFoundError):
            (Path(state_dir) / "vdis" / f"{uuid}{suffix}").unlink()


def grow(state_dir: Path, uuid: str, size: int) -> None:
    os.truncate(data_path(state_dir, uuid), size)


def allocated(state_dir: Path, uuid: str) -> int:
    """Bytes really allocated on disk (physical_utilisation)."""
    try:
        return os.stat(data_path(state_dir, uuid)).st_blocks * 512
    except FileNotFoundError:
        return 0


def data_extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """(offset, length) of the allocated ranges, found with SEEK_DATA/SEEK_HOLE."""
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:
                return
            raise
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        yield start, end - start
        offset = end


def copy_sparse(src: Path, dst: Path) -> None:
    """Copy only the allocated ranges so the copy stays sparse."""
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        size = os.fstat(fi.fileno()).st_size
        fo.truncate(size)
        for offset, length in data_extents(fi.fileno(), size):
            _copy_range(fi.fileno(), fo.fileno(), offset, length)


def _copy_range(src: int, dst: int, offset: int, length: int) -> None:
    end = offset + length
    while offset < end:
        try:
            n = os.copy_file_range(src, dst, end - offset, offset, offset)
        except OSError:
            n = 0
        if n == 0:  # not supported here (or EOF race): fall back to plain copies
            chunk = os.pread(src, min(end - offset, 1 << 20), offset)
            if not chunk:
                return
            n = os.pwrite(dst, chunk, offset)
        offset += n


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Deallocate a range (it then reads as zeros); write zeros where unsupported."""
    mode = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
    if _libc.fallocate(fd, mode, offset, length) == 0:
        return
    log.debug("punch hole failed (errno %d), writing zeros", ctypes.get_errno())
    zeros = bytes(min(length, 1 << 20))
    end = offset + length
    while offset < end:
        offset += os.pwrite(fd, zeros[: end - offset], offset)
