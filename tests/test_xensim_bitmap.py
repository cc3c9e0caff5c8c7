"""Property tests of the CBT bitmap arithmetic (REFERENCE §1)."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st
from xensim import bitmap

BLOCK = 65536
sizes = st.integers(min_value=1, max_value=64 * BLOCK + 1000)


def bit(bits: bytes, i: int) -> bool:
    return bool(bits[i // 8] & (0x80 >> (i % 8)))


@st.composite
def disk_and_writes(draw):
    size = draw(sizes)
    writes = draw(
        st.lists(
            st.tuples(st.integers(0, size - 1), st.integers(1, 3 * BLOCK)).map(
                lambda w: (w[0], min(w[1], size - w[0]))
            ),
            max_size=8,
        )
    )
    return size, writes


@settings(deadline=None)
@given(disk_and_writes())
def test_marking_sets_exactly_the_touched_blocks(case):
    size, writes = case
    bits = bitmap.empty(size)
    for offset, length in writes:
        bitmap.mark(bits, offset, length)
    expected = {b for off, n in writes for b in range(off // BLOCK, (off + n - 1) // BLOCK + 1)}
    assert set(bitmap.blocks(bits)) == expected
    assert len(bits) == math.ceil(math.ceil(size / BLOCK) / 8)


@settings(deadline=None)
@given(sizes, st.integers(0, 64 * BLOCK))
def test_length_is_ceil_of_ceil(size, extra):
    assert bitmap.byte_length(size) * 8 >= bitmap.block_count(size)
    assert bitmap.byte_length(size) * 8 - bitmap.block_count(size) < 8
    assert bitmap.byte_length(size + extra) >= bitmap.byte_length(size)


@settings(deadline=None)
@given(st.binary(max_size=40), st.binary(max_size=40))
def test_merge_is_or_with_zero_extension(older, newer):
    out = bitmap.merged(older, newer)
    assert len(out) == max(len(older), len(newer))
    for i in range(len(out) * 8):
        in_old = i < len(older) * 8 and bit(older, i)
        in_new = i < len(newer) * 8 and bit(newer, i)
        assert bit(out, i) == (in_old or in_new)


@settings(deadline=None)
@given(st.binary(max_size=64))
def test_encode_decode_round_trip(bits):
    assert bitmap.decode(bitmap.encode(bits)) == bits


@settings(deadline=None)
@given(st.integers(0, 200))
def test_msb_first(block):
    bits = bitmap.empty((block + 1) * BLOCK)
    bitmap.mark(bits, block * BLOCK, 1)
    assert bits[block // 8] == 0x80 >> (block % 8)
    assert sum(bits) == bits[block // 8]


def test_known_pattern_encodes_like_the_wire():
    bits = bitmap.empty(16 * BLOCK)
    bitmap.mark(bits, BLOCK, 2 * BLOCK)  # blocks 1 and 2
    bitmap.mark(bits, 15 * BLOCK + 10, 1)  # block 15
    assert bytes(bits) == bytes([0b01100000, 0b00000001])
    assert bitmap.encode(bits) == "YAE="


@settings(deadline=None)
@given(st.binary(max_size=20), sizes)
def test_resized_keeps_prefix_and_zero_extends(bits, size):
    out = bitmap.resized(bits, size)
    assert len(out) == bitmap.byte_length(size)
    keep = min(len(out), len(bits))
    assert out[:keep] == bits[:keep]
    assert not any(out[keep:])
