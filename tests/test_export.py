"""The export's block status and reads against the CBT bitmap's reference extents."""

from __future__ import annotations

import contextlib
import threading

import pytest
from cbt_strategies import disks  # the same disks; its hypothesis profile too
from hypothesis import given
from hypothesis import strategies as st
from xencbt_core import export
from xencbt_core.cbt import BLOCK_SIZE, Bitmap, encode
from xencbt_core.errors import ConnectionDead
from xencbt_core.export import EXTENT_DATA, EXTENT_HOLE, EXTENT_ZERO, Export


class FakePool:
    """Stands in for the upstream only where no NBD is involved: reads return a pattern."""

    def pread(self, buf, offset):
        for i in range(len(buf)):
            buf[i] = ((offset + i) // BLOCK_SIZE) % 251 + 1


# Tiny windows make runs cross window boundaries, where they must be merged.
WINDOWS = pytest.mark.parametrize("window", [1, 2, 4096])


@contextlib.contextmanager
def patched(**values):
    old = {k: getattr(export, k) for k in values}
    for k, v in values.items():
        setattr(export, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(export, k, v)


def reference(bm: Bitmap, offset: int, count: int, kind: int) -> list[tuple[int, int, int]]:
    return [
        (e.offset, e.length, EXTENT_DATA if e.changed else kind) for e in bm.extents(offset, count)
    ]


@WINDOWS
@given(disk=disks(), data=st.data())
def test_extents_match_the_bitmap(window, disk, data):
    size, changed = disk
    bm = Bitmap.from_base64(encode(changed, size), size)
    offset = data.draw(st.integers(0, size - 1))
    count = data.draw(st.integers(1, size - offset + 10 * BLOCK_SIZE))
    unchanged = data.draw(st.sampled_from(["hole", "zero"]))
    kind = EXTENT_HOLE if unchanged == "hole" else EXTENT_ZERO
    with patched(WINDOW=window):
        got = Export(FakePool(), size, bm, unchanged).extents(count, offset)
    assert got == reference(bm, offset, count, kind)


@WINDOWS
@given(disk=disks(), data=st.data())
def test_limited_answers_are_a_true_prefix(window, disk, data):
    size, changed = disk
    bm = Bitmap.from_base64(encode(changed, size), size)
    offset = data.draw(st.integers(0, size - 1))
    limit = data.draw(st.integers(1, 5))
    e = Export(FakePool(), size, bm)
    want = reference(bm, offset, size - offset, EXTENT_HOLE)
    with patched(WINDOW=window, MAX_EXTENTS=limit):
        answers = [e.extents(size - offset, offset), e.extents(size - offset, offset, one=True)]
    for got in answers:
        assert 1 <= len(got) <= limit
        assert got[:-1] == want[: len(got) - 1]
        last, ref = got[-1], want[len(got) - 1]
        assert last[0] == ref[0] and last[2] == ref[2] and 0 < last[1] <= ref[1]


@WINDOWS
@given(disk=disks(), data=st.data())
def test_unchanged_zero_reads_zeros_and_changed_reads_data(window, disk, data):
    size, changed = disk
    bm = Bitmap.from_base64(encode(changed, size), size)
    offset = data.draw(st.integers(0, size - 1))
    length = data.draw(st.integers(1, min(size - offset, 3 * BLOCK_SIZE)))
    buf = bytearray(length)
    with patched(WINDOW=window):
        Export(FakePool(), size, bm, "zero").pread(memoryview(buf), offset)
    for i in range(0, length, 509):
        block = (offset + i) // BLOCK_SIZE
        assert buf[i] == (block % 251 + 1 if block in changed else 0)


class RecordingPool:
    """FakePool's pattern, block by block, and every read asked of it (threads too)."""

    def __init__(self, fail: int = 0) -> None:
        self.reads: list[tuple[int, int]] = []
        self.fail = fail  # this many reads fail first
        self.cond = threading.Condition()

    def pread(self, buf, offset):
        with self.cond:
            self.reads.append((offset, len(buf)))
            self.cond.notify_all()
            if self.fail:
                self.fail -= 1
                raise ConnectionDead("the host went away")
        pos = 0
        while pos < len(buf):
            n = min(len(buf) - pos, BLOCK_SIZE - (offset + pos) % BLOCK_SIZE)
            buf[pos : pos + n] = bytes([((offset + pos) // BLOCK_SIZE) % 251 + 1]) * n
            pos += n

    def wait_for(self, predicate) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: predicate(self.reads), timeout=5.0)


def pattern(size: int, changed: set[int] | None, offset: int, length: int) -> bytes:
    """What a read must give: FakePool's pattern, zeros where ``changed`` says unchanged."""
    return b"".join(
        bytes(
            [
                (pos // BLOCK_SIZE) % 251 + 1
                if changed is None or pos // BLOCK_SIZE in changed
                else 0
            ]
        )
        for pos in range(offset, offset + length)
    )


@given(disk=disks(), data=st.data())
def test_readahead_gives_the_same_bytes_and_reads_only_what_a_client_would(disk, data):
    """With readahead= a host read is either one a client asked for, or wholly inside a
    changed run: an incremental never reads unchanged blocks it did not need."""
    size, changed = disk
    full = data.draw(st.booleans())
    bm = None if full else Bitmap.from_base64(encode(changed, size), size)
    unchanged = data.draw(st.sampled_from(["hole", "zero"]))
    pool = RecordingPool()
    e = Export(pool, size, bm, unchanged, readahead=4 * BLOCK_SIZE)  # many windows
    before = set(threading.enumerate())
    asked = []
    for _ in range(data.draw(st.integers(1, 6))):
        offset = data.draw(st.integers(0, size - 1))
        length = data.draw(st.integers(1, min(size - offset, 3 * BLOCK_SIZE)))
        buf = bytearray(length)
        e.pread(memoryview(buf), offset)
        zeroed = None if full or unchanged == "hole" else changed
        assert buf == pattern(size, zeroed, offset, length)
        asked.append((offset, offset + length))
    for t in set(threading.enumerate()) - before:  # the reads ahead, done
        t.join(5.0)
    for offset, length in pool.reads:
        blocks = range(offset // BLOCK_SIZE, -(-(offset + length) // BLOCK_SIZE))
        inside = any(lo <= offset and offset + length <= hi for lo, hi in asked)
        assert inside or full or all(b in changed for b in blocks), (offset, length)


def test_readahead_reads_the_next_windows_of_a_run_before_they_are_asked_for():
    window = 4 * BLOCK_SIZE
    pool = RecordingPool()
    e = Export(pool, 16 * window, None, "hole", readahead=window)
    e.pread(memoryview(bytearray(BLOCK_SIZE)), 0)
    assert (0, window) in pool.reads  # the whole window, not the block asked for
    ahead = {(window, window), (2 * window, window)}
    assert pool.wait_for(lambda reads: ahead <= set(reads)), pool.reads
    for offset in range(0, 2 * window, BLOCK_SIZE):  # served from the windows read
        buf = bytearray(BLOCK_SIZE)
        e.pread(memoryview(buf), offset)
        assert buf == pattern(16 * window, None, offset, BLOCK_SIZE)
    assert not [r for r in pool.reads if r[1] < window], pool.reads


def test_a_failed_window_is_not_kept_and_its_error_reaches_the_client():
    window = 4 * BLOCK_SIZE
    changed = set(range(4))  # one window's run: nothing to read ahead
    bm = Bitmap.from_base64(encode(changed, 16 * window), 16 * window)
    pool = RecordingPool(fail=1)
    e = Export(pool, 16 * window, bm, "hole", readahead=window)
    with pytest.raises(ConnectionDead):
        e.pread(memoryview(bytearray(BLOCK_SIZE)), BLOCK_SIZE)
    buf = bytearray(BLOCK_SIZE)
    e.pread(memoryview(buf), BLOCK_SIZE)
    assert buf == pattern(16 * window, None, BLOCK_SIZE, BLOCK_SIZE)
    assert pool.reads == [(0, window), (0, window)]
