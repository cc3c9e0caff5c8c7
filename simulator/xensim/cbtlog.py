"""CBT log files: the blocks written to a VDI since its last snapshot.

``DIR/cbt/<uuid>.cbtlog`` = magic (8 bytes) + virtual size (u64 LE) + bitmap (MSB-first,
the same order as the wire). As in sm, a live VDI has CBT enabled exactly when its log
exists; a snapshot takes over the live log and the live VDI starts an empty one. Callers
hold the VDI's lock (``disks.locked``) around every function here.
"""

from __future__ import annotations

import contextlib
import os
import struct
from pathlib import Path

from . import bitmap

MAGIC = b"XSCBT001"
_HEADER = struct.Struct("<8sQ")


class LogCorrupt(Exception):
    """The log file is unreadable or does not fit its recorded size."""


def path(state_dir: Path, uuid: str) -> Path:
    return Path(state_dir) / "cbt" / f"{uuid}.cbtlog"


def exists(state_dir: Path, uuid: str) -> bool:
    return path(state_dir, uuid).exists()


def write(state_dir: Path, uuid: str, size: int, bits: bytes) -> None:
    target = path(state_dir, uuid)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(_HEADER.pack(MAGIC, size) + bytes(bits))
    os.replace(tmp, target)


def create(state_dir: Path, uuid: str, size: int) -> None:
    write(state_dir, uuid, size, bitmap.empty(size))


def read(state_dir: Path, uuid: str) -> tuple[int, bytes]:
    """(size, bitmap); LogCorrupt when missing, malformed or too short for its size."""
    try:
        data = path(state_dir, uuid).read_bytes()
    except FileNotFoundError as e:
        raise LogCorrupt(f"no CBT log for {uuid}") from e
    if len(data) < _HEADER.size:
        raise LogCorrupt(f"CBT log of {uuid} is truncated")
    magic, size = _HEADER.unpack_from(data)
    bits = data[_HEADER.size :]
    if magic != MAGIC or len(bits) < bitmap.byte_length(size):
        raise LogCorrupt(f"CBT log of {uuid} is inconsistent")
    return size, bits


def remove(state_dir: Path, uuid: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        path(state_dir, uuid).unlink()


def rename(state_dir: Path, old: str, new: str) -> None:
    os.replace(path(state_dir, old), path(state_dir, new))


def resize(state_dir: Path, uuid: str, size: int) -> None:
    """Zero-extend the log of a grown disk: the new blocks were never written."""
    _, bits = read(state_dir, uuid)
    write(state_dir, uuid, size, bitmap.resized(bits, size))


def mark(state_dir: Path, uuid: str, offset: int, length: int) -> None:
    """Record a write in place (only the touched bitmap bytes are rewritten)."""
    blocks = bitmap.touched_blocks(offset, length)
    if not blocks:
        return
    try:
        fd = os.open(path(state_dir, uuid), os.O_RDWR)
    except FileNotFoundError:
        return  # CBT disabled on this VDI
    try:
        first, last = blocks[0] // 8, blocks[-1] // 8
        where = _HEADER.size + first
        chunk = bytearray(os.pread(fd, last - first + 1, where))
        chunk.extend(bytes(last - first + 1 - len(chunk)))
        for block in blocks:
            chunk[block // 8 - first] |= 0x80 >> (block % 8)
        os.pwrite(fd, bytes(chunk), where)
    finally:
        os.close(fd)
