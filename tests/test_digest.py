"""The chunked content digest (digest.py): chunk math, hashing, the sidecar, and that an
incremental reads from its image only the chunks it must, measured on a 4 GiB disk."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from xencbt_cli.errors import UsageError
from xencbt_cli.repo import digest
from xencbt_cli.repo.manifest import Manifest
from xencbt_core.cbt import BLOCK_SIZE, Bitmap, encode

MiB = 1 << 20
CHUNK = 64 * MiB


def chunked(data: bytes, chunk: int) -> bytes:
    """The chunk digests, the slow obvious way."""
    return b"".join(
        hashlib.sha256(data[i : i + chunk]).digest() for i in range(0, len(data), chunk)
    )


# -- chunk math ------------------------------------------------------------------------
def test_spans_cut_the_disk_into_chunks_the_last_one_short():
    size = 3 * CHUNK + 512
    assert digest.count(size, CHUNK) == 4
    assert [digest.span(i, size, CHUNK) for i in range(4)] == [
        (0, CHUNK),
        (CHUNK, CHUNK),
        (2 * CHUNK, CHUNK),
        (3 * CHUNK, 512),
    ]
    assert digest.count(0, CHUNK) == 0
    assert digest.count(CHUNK, CHUNK) == 1


def test_digest_covers_the_size():
    """Equal sums of different sizes (a trailing zero-length difference cannot be
    expressed by the sums alone) never give the same digest."""
    sums = chunked(b"x" * 100, 64)
    assert digest.combine(sums, 100) != digest.combine(sums, 101)
    assert digest.combine(sums, 100) == digest.combine(bytes(sums), 100)


@st.composite
def changes(draw):
    """(old size, new size, changed 64 KiB blocks, chunk size): sizes equal, grown or
    shrunk, whole blocks or not."""
    per = draw(st.sampled_from([1, 2, 3, 8]))
    old = draw(st.integers(0, 40 * BLOCK_SIZE))
    new = max(0, old + draw(st.one_of(st.just(0), st.integers(-20 * BLOCK_SIZE, 20 * BLOCK_SIZE))))
    nblocks = -(-new // BLOCK_SIZE)
    blocks = draw(st.sets(st.integers(0, max(0, nblocks - 1)), max_size=12)) if nblocks else set()
    return old, new, blocks, per * BLOCK_SIZE


@settings(max_examples=300, deadline=None)
@given(changes())
def test_dirty_chunks_cover_every_changed_byte(case):
    """For any bitmap and size change: every byte that can differ from the old disk (a
    changed block, or past the old size) lies in a rehashed chunk, and every chunk not
    rehashed is the very same extent in the old disk, with no changed block."""
    old, new, blocks, chunk = case
    bitmap = Bitmap.from_base64(encode(blocks, new), new)
    dirty = set(digest.dirty(bitmap, old, new, chunk))
    assert all(0 <= i < digest.count(new, chunk) for i in dirty)
    for block in blocks:
        offset = block * BLOCK_SIZE
        assert offset // chunk in dirty
        last = min(offset + BLOCK_SIZE, new) - 1
        assert last // chunk in dirty
    for i in range(digest.count(new, chunk)):
        offset, length = digest.span(i, new, chunk)
        if i not in dirty:
            assert offset + length <= old
            assert digest.span(i, old, chunk) == (offset, length)  # same extent before
            assert not any(offset <= b * BLOCK_SIZE < offset + length for b in blocks)
    if old < new and old:
        assert (old - 1) // chunk in dirty  # the previous last chunk


def test_dirty_chunks_are_only_the_changed_ones():
    size = 10 * CHUNK
    per = CHUNK // BLOCK_SIZE
    blocks = {0, per - 1, 5 * per + 7}
    bitmap = Bitmap.from_base64(encode(blocks, size), size)
    assert digest.dirty(bitmap, size, size, CHUNK) == [0, 5]
    grown = size + CHUNK + 5
    bitmap = Bitmap.from_base64(encode(set(), grown), grown)
    assert digest.dirty(bitmap, size, grown, CHUNK) == [9, 10, 11]


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=5000), st.lists(st.integers(1, 700), max_size=20))
def test_chunk_hasher_is_independent_of_how_the_stream_is_cut(data, cuts):
    h = digest.ChunkHasher(256)
    pos = 0
    for n in cuts:
        h.update(data[pos : pos + n])
        pos += n
    h.update(data[pos:])
    assert h.finish() == chunked(data, 256)
    assert h.size == len(data)


def test_first_difference_names_the_chunk():
    size = 3 * CHUNK + 10
    a = b"".join(bytes([i]) * 32 for i in range(4))
    b = a[:64] + b"\xff" * 32 + a[96:]
    assert digest.first_difference(a, a, size, CHUNK) is None
    assert digest.first_difference(a, b, size, CHUNK) == (2 * CHUNK, CHUNK)
    assert digest.first_difference(a, a[:96] + b"\0" * 32, size, CHUNK) == (3 * CHUNK, 10)
    assert "bytes 134217728-201326591" in digest.describe((2 * CHUNK, CHUNK))


def test_chunk_size_for_tests_only_takes_whole_blocks(monkeypatch):
    assert digest.chunk_size() == CHUNK
    monkeypatch.setenv("XENCBT_CHUNK_SIZE", str(4 * BLOCK_SIZE))
    assert digest.chunk_size() == 4 * BLOCK_SIZE
    for bad in ("1000", "0", "-65536", "64k"):
        monkeypatch.setenv("XENCBT_CHUNK_SIZE", bad)
        with pytest.raises(UsageError, match="multiple of 64 KiB"):
            digest.chunk_size()


# -- real images -----------------------------------------------------------------------
def qemu_img(*args) -> None:
    subprocess.run(["qemu-img", *map(str, args)], check=True, capture_output=True)


def qemu_io(path: Path, cmd: str) -> None:
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", cmd, str(path)], check=True, capture_output=True
    )


def zero_sums(size: int) -> bytes:
    whole = hashlib.sha256(bytes(CHUNK)).digest()
    n, tail = divmod(size, CHUNK)
    return whole * n + (hashlib.sha256(bytes(tail)).digest() if tail else b"")


def test_incremental_reads_only_its_changed_chunk_of_a_4_gib_disk(tmp_path):
    """A 4 GiB disk, one 64 KiB block written in an overlay: rehashing reads exactly one
    chunk (64 MiB, not 4 GiB) and gives the sums a whole read gives."""
    size = 4 << 30
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    qemu_img("create", "-f", "qcow2", base, size)
    qemu_img("create", "-f", "qcow2", "-b", base.name, "-F", "qcow2", top)
    offset = 37 * CHUNK + 5 * BLOCK_SIZE
    qemu_io(top, "write -P 0x5a %d %d" % (offset, BLOCK_SIZE))
    old = zero_sums(size)
    bitmap = Bitmap.from_base64(encode({offset // BLOCK_SIZE}, size), size)
    chunks = digest.dirty(bitmap, size, size, CHUNK)
    assert chunks == [37]
    t0 = time.monotonic()
    sums, read = digest.rehash(top, old, chunks, size, CHUNK)
    took = time.monotonic() - t0
    assert read == CHUNK
    want = bytearray(CHUNK)
    want[5 * BLOCK_SIZE : 6 * BLOCK_SIZE] = b"\x5a" * BLOCK_SIZE
    expected = bytearray(old)
    expected[37 * 32 : 38 * 32] = hashlib.sha256(want).digest()
    assert sums == bytes(expected)
    print("\nrehash of 1 changed block on a 4 GiB disk: read %d MiB in %.2f s" % (read >> 20, took))


def test_grown_disk_rehashes_the_old_last_chunk_and_the_new_ones(tmp_path):
    chunk = 4 * BLOCK_SIZE
    old_size, new_size = 2 * chunk + 1024, 5 * chunk + 512  # qcow2: whole sectors
    data = bytearray(os.urandom(old_size))
    img = tmp_path / "a.qcow2"
    qemu_img("create", "-f", "qcow2", img, old_size)
    raw = tmp_path / "a.raw"
    raw.write_bytes(data)
    qemu_img("convert", "-f", "raw", "-O", "qcow2", raw, img)
    sums, size = digest.image_sums(img, chunk)
    assert (sums, size) == (chunked(bytes(data), chunk), old_size)
    qemu_img("resize", "-f", "qcow2", img, new_size)
    qemu_io(img, "write -P 7 %d 512" % (4 * chunk))
    data += bytes(new_size - old_size)
    data[4 * chunk : 4 * chunk + 512] = b"\x07" * 512
    bitmap = Bitmap.from_base64(encode({16}, new_size), new_size)
    chunks = digest.dirty(bitmap, old_size, new_size, chunk)
    assert chunks == [2, 3, 4, 5]
    new, read = digest.rehash(img, sums, chunks, new_size, chunk)
    assert new == chunked(bytes(data), chunk)
    assert read == new_size - 2 * chunk


# -- the sidecar and old manifests -------------------------------------------------------
def manifest(**kw) -> Manifest:
    base = dict(
        point="20250101T000000.000000Z",
        vm_uuid="vm",
        vm_name="vm",
        vdi_uuid="vdi",
        vdi_name="disk",
        userdevice="0",
        snapshot_uuid="snap",
        type="full",
        virtual_size=1000,
    )
    return Manifest(**{**base, **kw})


def test_sidecar_must_match_the_manifest(tmp_path):
    data = os.urandom(1000)
    sums = chunked(data, 256)
    path = tmp_path / "p.sums"
    good = digest.combine(sums, 1000)
    with pytest.raises(digest.SumsDamaged, match="missing"):
        digest.load_sums(path, 1000, 256, good)
    path.write_bytes(sums)
    assert digest.load_sums(path, 1000, 256, good) == sums
    path.write_bytes(sums[:-1])
    with pytest.raises(digest.SumsDamaged, match="damaged"):
        digest.load_sums(path, 1000, 256, good)
    path.write_bytes(sums[:5] + bytes([sums[5] ^ 1]) + sums[6:])
    with pytest.raises(digest.SumsDamaged, match="damaged"):
        digest.load_sums(path, 1000, 256, good)


def test_reading_names_the_first_bad_chunk(tmp_path):
    data = bytearray(os.urandom(1000))
    sums = chunked(bytes(data), 256)
    (tmp_path / "p.sums").write_bytes(sums)
    m = manifest(digest=digest.combine(sums, 1000), digest_kind=digest.KIND, chunk_size=256)
    ok = digest.Reading(m, tmp_path / "p.sums")
    ok.update(bytes(data))
    assert ok.problem() is None
    data[600] ^= 1
    bad = digest.Reading(m, tmp_path / "p.sums")
    bad.update(bytes(data))
    assert bad.problem() == (
        "bytes 512-767 (the 256 bytes chunk at 512 bytes) differ from what was recorded at "
        "backup time"
    )


def test_old_manifest_with_only_sha256_reads_and_becomes_a_base(tmp_path):
    """A format-1 manifest: checked against its whole-disk sha256; as a base, one pass
    over its image checks that sha256 and gives its chunk digests."""
    data = os.urandom(3 * BLOCK_SIZE + 512)
    raw, img = tmp_path / "a.raw", tmp_path / "a.qcow2"
    raw.write_bytes(data)
    qemu_img("convert", "-f", "raw", "-O", "qcow2", raw, img)
    old = json.loads(manifest(virtual_size=len(data)).to_json())
    for key in ("digest", "digest_kind", "chunk_size", "hashed_bytes"):
        old.pop(key)
    old.update(format=1, sha256=hashlib.sha256(data).hexdigest())
    m = Manifest.from_json(json.dumps(old))
    reading = digest.Reading(m, tmp_path / "none.sums")
    reading.update(data)
    assert reading.old and reading.problem() is None
    chunk = 2 * BLOCK_SIZE
    sums = digest.trusted_sums(m, img, tmp_path / "none.sums", chunk)
    assert sums == chunked(data, chunk)
    m.sha256 = hashlib.sha256(b"other").hexdigest()
    with pytest.raises(digest.SumsDamaged, match="reads back with sha256"):
        digest.trusted_sums(m, img, tmp_path / "none.sums", chunk)
    wrong = digest.Reading(m, tmp_path / "none.sums")
    wrong.update(data)
    assert "recorded" in wrong.problem()


@settings(max_examples=30, deadline=None)
@given(
    st.binary(min_size=0, max_size=5 * 4096),
    st.integers(min_value=0, max_value=3 * 4096),
    st.integers(min_value=1, max_value=3),
)
def test_file_sums_on_lanes_equal_the_streamed_chunk_digests(tmp_path_factory, data, hole, lanes):
    """The restore's read-back hashes a raw file's chunks on threads (file_sums): the
    same digests, in disk order, as one pass over the stream, holes read as zeros."""
    path = tmp_path_factory.mktemp("sums") / "disk.raw"
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
        f.seek(hole, os.SEEK_CUR)  # a hole in the middle
        f.write(data[len(data) // 2 :])
    content = path.read_bytes()
    chunk = 3 * 4096
    hasher = digest.ChunkHasher(chunk)
    hasher.update(content)
    told: list[int] = []
    with mock.patch.object(digest, "READ", 4096):  # several reads per chunk
        got = digest.file_sums(path, chunk, told.append, lanes)
    assert got == (hasher.finish(), len(content))
    assert told == [len(content[i : i + chunk]) for i in range(0, len(content), chunk)]


def test_beside_hashes_in_order_and_raises_the_hashers_error():
    """digest.beside runs the hashing on its own thread, in the order fed; an error
    there reaches the caller when the block ends, and nothing hangs."""
    pieces = [os.urandom(n) for n in (1, 4096, 70000, 3, 1 << 20)]
    whole = hashlib.sha256()
    with digest.beside(whole.update, depth=2) as feed:
        for piece in pieces:
            feed(piece)
    assert whole.digest() == hashlib.sha256(b"".join(pieces)).digest()

    def broken(data: bytes) -> None:
        raise OSError("the disk went away")

    with pytest.raises(OSError, match="went away"), digest.beside(broken, depth=1) as feed:
        for piece in pieces:
            feed(piece)


def test_file_sums_reads_no_chunk_that_is_all_hole(tmp_path):
    """A restored thin disk is mostly holes: file_sums gives their chunks the digest of
    zeros without reading them, and the same digests as a pass over the stream."""
    chunk = 1 << 20
    path = tmp_path / "thin.raw"
    with open(path, "wb") as f:
        f.truncate(6 * chunk + 4096)  # a short last chunk
        for i in (1, 4):
            f.seek(i * chunk + 8192)
            f.write(os.urandom(4096))
        f.seek(6 * chunk)
        f.write(b"\1" * 10)
    with open(path, "rb") as f:
        if not digest.hole(f.fileno(), 0, chunk):
            pytest.skip("this file system does not report holes (SEEK_DATA)")
    hasher = digest.ChunkHasher(chunk)
    hasher.update(path.read_bytes())
    with mock.patch.object(digest.os, "pread", wraps=os.pread) as pread:
        got = digest.file_sums(path, chunk)
    assert got == (hasher.finish(), 6 * chunk + 4096)
    assert sorted({call.args[2] // chunk for call in pread.call_args_list}) == [1, 4, 6]
