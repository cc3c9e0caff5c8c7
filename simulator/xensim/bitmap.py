"""CBT bitmap arithmetic: one bit per 64 KiB block, most significant bit first.

This is the wire format of ``VDI.list_changed_blocks`` (REFERENCE §1): block ``i`` is
``byte[i // 8] & (0x80 >> (i % 8))`` and the bitmap is
``ceil(ceil(virtual_size / 65536) / 8)`` bytes long.
"""

from __future__ import annotations

import base64

BLOCK = 65536


def block_count(size: int) -> int:
    """Number of 64 KiB blocks covering ``size`` bytes (the last one may be short)."""
    return -(-size // BLOCK)


def byte_length(size: int) -> int:
    """Bitmap length in bytes for a disk of ``size`` bytes."""
    return -(-block_count(size) // 8)


def empty(size: int) -> bytearray:
    return bytearray(byte_length(size))


def touched_blocks(offset: int, length: int) -> range:
    """The blocks a write of ``length`` bytes at ``offset`` touches (empty for length 0)."""
    if length <= 0:
        return range(0)
    return range(offset // BLOCK, (offset + length - 1) // BLOCK + 1)


def mark(bitmap: bytearray, offset: int, length: int) -> None:
    """Set the bit of every block the byte range touches."""
    for block in touched_blocks(offset, length):
        bitmap[block // 8] |= 0x80 >> (block % 8)


def blocks(bitmap: bytes) -> list[int]:
    """Indices of the set bits, in order."""
    return [i for i in range(len(bitmap) * 8) if bitmap[i // 8] & (0x80 >> (i % 8))]


def merged(older: bytes, newer: bytes) -> bytearray:
    """OR of two bitmaps, the shorter one zero-extended (a grown disk's older log)."""
    out = bytearray(max(len(older), len(newer)))
    out[: len(older)] = older
    for i, byte in enumerate(newer):
        out[i] |= byte
    return out


def resized(bitmap: bytes, size: int) -> bytearray:
    """The bitmap zero-extended (or cut) to fit a disk of ``size`` bytes."""
    out = bytearray(byte_length(size))
    keep = min(len(out), len(bitmap))
    out[:keep] = bitmap[:keep]
    return out


def encode(bitmap: bytes) -> str:
    return base64.b64encode(bytes(bitmap)).decode("ascii")


def decode(text: str) -> bytes:
    return base64.b64decode(text)
