"""What the plugin serves: the snapshot's bytes and block status from the CBT bitmap.

Block status (REFERENCE §6): changed blocks are data.  Unchanged blocks are
``hole``: HOLE without ZERO — qemu-img convert -B leaves them to the backing file, and
reads still return the real data, so mounting and full copies stay right; or ``zero``:
ZERO, and reads return zeros without asking the host — for nbdcopy
--destination-is-zero patching an existing copy in place.

Block status is the plugin's hottest loop after reads (qemu-img asks once per extent, a
random bitmap of a 2 TiB disk has 16 M runs), so runs are found a window of the bitmap at
a time: a uniform window is one step, a mixed one a single regex pass over its bit string.
The cost is per run and in C, never a Python step per block.
"""

from __future__ import annotations

import re

from .cbt import BLOCK_SIZE, Bitmap
from .pool import Pool
from .readahead import Readahead

# Same values as nbdkit.EXTENT_HOLE / EXTENT_ZERO (and NBD_STATE_HOLE / NBD_STATE_ZERO).
EXTENT_DATA = 0
EXTENT_HOLE = 1
EXTENT_ZERO = 2

MAX_EXTENTS = 65536  # per answer; block status may describe less than it was asked
WINDOW = 4096  # bitmap bytes looked at per step, at most: 32 Ki blocks, 2 GiB of disk
_RUNS = re.compile(r"0+|1+")

_ZEROES = memoryview(bytes(4 * 1024 * 1024))


class Export:
    description = ""  # what nbdinfo --list shows (vm= sets one per disk)

    def __init__(
        self,
        pool: Pool,
        size: int,
        bitmap: Bitmap | None,
        unchanged: str = "hole",
        readahead: int = 0,
    ):
        self.pool = pool
        self.size = size
        self.bitmap = bitmap
        self.unchanged_type = EXTENT_HOLE if unchanged == "hole" else EXTENT_ZERO
        self.read_unchanged = unchanged == "hole"
        self.readahead = Readahead(pool.pread, readahead, self._window) if readahead else None

    def pread(self, buf: memoryview, offset: int) -> None:
        if self.bitmap is None or self.read_unchanged:
            self._read(buf, offset)
            return
        for start, length, changed in self._spans(offset, len(buf), len(buf)):
            view = buf[start - offset : start - offset + length]
            if changed:
                self._read(view, start)
            else:
                _fill_zero(view)

    def _read(self, view: memoryview, offset: int) -> None:
        if self.readahead is None:
            self.pool.pread(view, offset)
        else:
            self.readahead.pread(view, offset)

    def _window(self, offset: int) -> tuple[int, int]:
        """The readahead window around ``offset``, clipped to the data run holding it
        (empty in an unchanged run: what no client reads is not read ahead either)."""
        assert self.readahead is not None
        if offset >= self.size:
            return offset, offset
        lo = offset - offset % self.readahead.window_size
        hi = min(lo + self.readahead.window_size, self.size)
        if self.bitmap is None:
            return lo, hi
        for start, length, changed in self._spans(lo, hi - lo, MAX_EXTENTS):
            if start <= offset < start + length:
                return (start, start + length) if changed else (offset, offset)
        return offset, offset

    def extents(self, count: int, offset: int, one: bool = False) -> list[tuple[int, int, int]]:
        if self.bitmap is None:
            return [(offset, min(count, self.size - offset), EXTENT_DATA)]
        types = (self.unchanged_type, EXTENT_DATA)
        return self._spans(offset, count, 1 if one else MAX_EXTENTS, types)

    def _spans(self, offset: int, count: int, limit: int, types=(False, True)) -> list[tuple]:
        """(offset, length, types[changed]) covering [offset, offset+count) clipped to the
        disk; at most ``limit`` of them (then the last may stop short of the range's end)."""
        end = min(offset + count, self.size)
        first, last = offset // BLOCK_SIZE, -(-end // BLOCK_SIZE)
        runs = block_runs(self.bitmap.data, first, last, limit)
        spans = [(lo * BLOCK_SIZE, (hi - lo) * BLOCK_SIZE, types[c]) for lo, hi, c in runs]
        # Only the ends can stick out of the range: the first block may start before
        # offset, the last may pass the end (or the disk's short last block).
        start, length, kind = spans[0]
        spans[0] = (offset, start + length - offset, kind)
        start, length, kind = spans[-1]
        spans[-1] = (start, min(start + length, end) - start, kind)
        return spans


def block_runs(data: bytes, first: int, end: int, limit: int) -> list[tuple[int, int, bool]]:
    """Maximal runs (first block, end block, changed) of the MSB-first bitmap ``data``
    over blocks [first, end); at most ``limit`` (the last then may be cut short)."""
    runs: list[tuple[int, int, bool]] = []
    pos = first
    window = 8  # grows: a one-extent answer (REQ_ONE) must not decode 32 Ki blocks
    while pos < end:
        lo = pos // 8
        hi = min(lo + window, -(-end // 8))
        window = min(window * 8, WINDOW)
        stop = min(end, hi * 8)
        found = _window_runs(data[lo:hi], lo * 8, pos, stop)
        if runs and runs[-1][2] == found[0][2]:  # a run going on across windows
            runs[-1] = (runs[-1][0], found[0][1], found[0][2])
            del found[0]
        room = limit - len(runs)
        runs += found[:room]
        if len(found) > room:
            break
        pos = stop
    return runs


def _window_runs(chunk: bytes, base: int, pos: int, stop: int) -> list[tuple[int, int, bool]]:
    n = len(chunk)
    if chunk.count(0) == n or chunk.count(0xFF) == n:
        return [(pos, stop, chunk[0] == 0xFF)]
    bits = format(int.from_bytes(chunk, "big"), "0%db" % (8 * n))
    return [
        (base + m.start(), base + m.end(), bits[m.start()] == "1")
        for m in _RUNS.finditer(bits, pos - base, stop - base)
    ]


def _fill_zero(view: memoryview) -> None:
    for pos in range(0, len(view), len(_ZEROES)):
        chunk = view[pos : pos + len(_ZEROES)]
        chunk[:] = _ZEROES[: len(chunk)]
