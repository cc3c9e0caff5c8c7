"""The export's block status and reads against the CBT bitmap's reference extents."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_cbt import disks  # noqa: F401  (the same disks; its hypothesis profile too)
from xencbt_core import export
from xencbt_core.cbt import BLOCK_SIZE, Bitmap, encode
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
