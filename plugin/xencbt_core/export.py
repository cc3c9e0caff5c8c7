"""What the plugin serves: the snapshot's bytes and block status from the CBT bitmap.

Block status (REFERENCE §6): changed blocks are data.  Unchanged blocks are
``hole``: HOLE without ZERO — qemu-img convert -B leaves them to the backing file, and
reads still return the real data, so mounting and full copies stay right; or ``zero``:
ZERO, and reads return zeros without asking the host — for nbdcopy
--destination-is-zero patching an existing copy in place.
"""

from __future__ import annotations

from .cbt import Bitmap
from .pool import Pool

# Same values as nbdkit.EXTENT_HOLE / EXTENT_ZERO (and NBD_STATE_HOLE / NBD_STATE_ZERO).
EXTENT_DATA = 0
EXTENT_HOLE = 1
EXTENT_ZERO = 2

MAX_EXTENTS = 65536  # per answer; block status may describe less than it was asked

_ZEROES = memoryview(bytes(4 * 1024 * 1024))


class Export:
    def __init__(self, pool: Pool, size: int, bitmap: Bitmap | None, unchanged: str = "hole"):
        self.pool = pool
        self.size = size
        self.bitmap = bitmap
        self.unchanged_type = EXTENT_HOLE if unchanged == "hole" else EXTENT_ZERO
        self.read_unchanged = unchanged == "hole"

    def pread(self, buf: memoryview, offset: int) -> None:
        if self.bitmap is None or self.read_unchanged:
            self.pool.pread(buf, offset)
            return
        for ext in self.bitmap.extents(offset, len(buf)):
            view = buf[ext.offset - offset : ext.offset - offset + ext.length]
            if ext.changed:
                self.pool.pread(view, ext.offset)
            else:
                _fill_zero(view)

    def extents(self, count: int, offset: int, one: bool = False) -> list[tuple[int, int, int]]:
        if self.bitmap is None:
            return [(offset, min(count, self.size - offset), EXTENT_DATA)]
        limit = 1 if one else MAX_EXTENTS
        return [
            (e.offset, e.length, EXTENT_DATA if e.changed else self.unchanged_type)
            for e in self.bitmap.extents(offset, count, limit)
        ]


def _fill_zero(view: memoryview) -> None:
    for pos in range(0, len(view), len(_ZEROES)):
        chunk = view[pos : pos + len(_ZEROES)]
        chunk[:] = _ZEROES[: len(chunk)]
