"""A point's content digest, chunked so an incremental costs O(changed), not O(disk).

The flattened virtual disk is cut into chunks of ``chunk_size`` bytes (64 MiB; the last
one short).  Each chunk's sha256 goes, 32 bytes per chunk in disk order, into the
point's sidecar ``<point>.sums``; the manifest records ``digest`` = sha256(sums + the
disk size as 8 bytes big-endian), ``digest_kind`` and ``chunk_size``.

A full backup hashes every chunk in one pass.  An incremental rehashes only the chunks
holding a block the CBT bitmap of its copy marks changed (and those the size change
touches), and carries the others over from the previous point's sums: digests computed
when that data was read, so bit rot in the base since then is never laundered into new
checksums; verify of the new point fails on that chunk instead.

Manifests written before this (``format`` 1) have only ``sha256`` of the whole flattened
disk; they are still verified and restored against it (``Reading``).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from xencbt_core.cbt import BLOCK_SIZE, Bitmap

from ..errors import CliError, RepositoryError, UsageError
from ..proc import command
from ..text import exact
from . import image, repokey

KIND = "sha256-chunks"
CHUNK = 64 << 20
SUM = 32  # bytes of one chunk's sha256
READ = 8 << 20  # bytes per NBD read (qemu-nbd takes up to 32 MiB)


class SumsDamaged(Exception):
    """A sidecar that is missing, has the wrong length, or does not match the manifest."""


def chunk_size() -> int:
    """64 MiB; ``XENCBT_CHUNK_SIZE`` (a multiple of 64 KiB) only so tests can have many
    chunks on small disks.  Each manifest records the size its sums use."""
    value = os.environ.get("XENCBT_CHUNK_SIZE")
    if not value:
        return CHUNK
    if not value.isdigit() or int(value) <= 0 or int(value) % BLOCK_SIZE:
        raise UsageError("XENCBT_CHUNK_SIZE must be a positive multiple of 64 KiB (65536)")
    return int(value)


# -- chunk math ------------------------------------------------------------------------
def count(size: int, chunk: int) -> int:
    return -(-size // chunk)


def span(index: int, size: int, chunk: int) -> tuple[int, int]:
    """(offset, length) of chunk ``index`` of a disk of ``size`` bytes."""
    offset = index * chunk
    return offset, min(chunk, size - offset)


def combine(sums: bytes, size: int) -> str:
    """The manifest's digest: over the chunk digests and the size (so two disks that
    differ only by trailing bytes, or by a missing short chunk, never compare equal)."""
    return hashlib.sha256(bytes(sums) + size.to_bytes(8, "big")).hexdigest()


def dirty(bitmap: Bitmap, old_size: int, new_size: int, chunk: int) -> list[int]:
    """The chunks of the new disk to rehash: each holding a changed 64 KiB block, and,
    when the size changed, the last chunk both sizes share and every chunk past it.
    (backup never builds on a shrunk disk; the chunk math holds for it all the same)"""
    per = chunk // BLOCK_SIZE
    found: set[int] = set()
    for run in bitmap.runs():
        if run.changed:
            found.update(range(run.start // per, (run.start + run.count - 1) // per + 1))
    if new_size != old_size:
        first = max(0, count(min(old_size, new_size), chunk) - 1)
        found.update(range(first, count(new_size, chunk)))
    return sorted(i for i in found if i < count(new_size, chunk))


def first_difference(got: bytes, want: bytes, size: int, chunk: int) -> tuple[int, int] | None:
    """(offset, length) of the first chunk whose digest differs, or None."""
    for i in range(max(len(got), len(want)) // SUM):
        if got[i * SUM : (i + 1) * SUM] != want[i * SUM : (i + 1) * SUM]:
            return span(i, size, chunk)
    return None


def describe(where: tuple[int, int]) -> str:
    offset, length = where
    return "bytes %d-%d (the %s chunk at %s)" % (
        offset,
        offset + length - 1,
        exact(length),
        exact(offset),
    )


# -- hashing a stream ------------------------------------------------------------------
class ChunkHasher:
    """Chunk digests of a byte stream fed in pieces of any size."""

    def __init__(self, chunk: int):
        self.chunk = chunk
        self.sums = bytearray()
        self.size = 0
        self._h = hashlib.sha256()
        self._fill = 0

    def update(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            take = min(len(view), self.chunk - self._fill)
            self._h.update(view[:take])
            self._fill += take
            self.size += take
            view = view[take:]
            if self._fill == self.chunk:
                self._close()

    def _close(self) -> None:
        self.sums += self._h.digest()
        self._h = hashlib.sha256()
        self._fill = 0

    def finish(self) -> bytes:
        if self._fill:
            self._close()
        return bytes(self.sums)


def image_sums(path: Path, chunk: int, advance=None) -> tuple[bytes, int]:
    """(chunk digests, size) of the whole virtual disk ``path`` shows: one pass.
    ``advance(n)`` is told the bytes hashed as they go (progress.task)."""
    hasher = ChunkHasher(chunk)

    def update(data: bytes) -> None:
        hasher.update(data)
        if advance:
            advance(len(data))

    command.stream(image.reader(path), update)
    return hasher.finish(), hasher.size


@contextlib.contextmanager
def beside(update: Callable[[bytes], None], depth: int = 8) -> Iterator[Callable[[bytes], None]]:
    """A feed for ``update`` that runs it on a thread of its own, in order: the caller
    reads the next pieces while the previous ones are hashed, since hashlib lets go of
    the GIL on large buffers (verify, a qcow2 read-back).  Not where a Python server
    shares the cores: restore --to-sr measured slower with it (bench figure 9).  At most
    ``depth`` pieces wait; the block ends once all are hashed, and an error of
    ``update`` is raised there."""
    pieces: queue.Queue = queue.Queue(depth)
    failed: list[BaseException] = []

    def run() -> None:
        while (data := pieces.get()) is not None:
            if not failed:
                try:
                    update(data)
                except BaseException as e:  # raised in the caller's thread, below
                    failed.append(e)

    worker = threading.Thread(target=run, name="sha256", daemon=True)
    worker.start()
    try:
        yield pieces.put
    finally:
        pieces.put(None)
        worker.join()
    if failed:
        raise failed[0]


def file_sums(path: Path, chunk: int, advance=None, lanes: int = 2) -> tuple[bytes, int]:
    """(chunk digests, size) of the raw file ``path``, its chunks hashed on ``lanes``
    threads: hashlib lets go of the GIL on large buffers, and sha256 is most of a
    restore's read-back (bench figure 9).  A chunk that is all hole is not read: its
    digest is that of zeros.  ``advance(n)`` is told each chunk, in order."""
    size = path.stat().st_size
    fd = os.open(path, os.O_RDONLY)

    def one(i: int) -> bytes:
        offset, length = span(i, size, chunk)
        if hole(fd, offset, length):
            return zeros_digest(length)  # a hole reads as zeros: not read, hashed once
        h = hashlib.sha256()
        for pos in range(offset, offset + length, READ):
            h.update(os.pread(fd, min(READ, offset + length - pos), pos))
        return h.digest()

    pool = ThreadPoolExecutor(lanes, thread_name_prefix="sha256")
    try:
        sums = bytearray()
        for i, found in enumerate(pool.map(one, range(count(size, chunk)))):
            sums += found
            if advance:
                advance(span(i, size, chunk)[1])
        return bytes(sums), size
    finally:
        # Interrupted: the chunks not yet begun are dropped, not hashed for nothing.
        pool.shutdown(wait=True, cancel_futures=True)
        os.close(fd)


def hole(fd: int, offset: int, length: int) -> bool:
    """Whether [offset, offset + length) of the file is all hole (SEEK_DATA finds no data
    before its end): a restored thin disk is mostly that.  False when the file system
    cannot tell (it then says data everywhere)."""
    try:
        return os.lseek(fd, offset, os.SEEK_DATA) >= offset + length
    except OSError as e:
        return e.errno == errno.ENXIO  # no data from offset to the end of the file


@functools.lru_cache(maxsize=4)
def zeros_digest(length: int) -> bytes:
    return hashlib.sha256(bytes(length)).digest()


def rehash(
    path: Path, old: bytes, chunks: Iterable[int], size: int, chunk: int, advance=None, h=None
) -> tuple[bytes, int]:
    """``old`` (digests of the previous point, extended or cut to the new size) with the
    given chunks rehashed from the image, and how many bytes that read: only those
    ranges are read, through qemu-nbd and libnbd (``h``: a handle already open on
    ``path``, image.random_access, as the CBT canary's)."""
    sums = bytearray(old[: count(size, chunk) * SUM])
    sums += bytes(count(size, chunk) * SUM - len(sums))
    chunks = list(chunks)
    read = 0
    if not chunks:
        return bytes(sums), read
    with contextlib.nullcontext(h) if h is not None else image.random_access(path) as h:
        for i in chunks:
            offset, length = span(i, size, chunk)
            digest = hashlib.sha256()
            for pos in range(offset, offset + length, READ):
                data = h.pread(min(READ, offset + length - pos), pos)
                read += len(data)
                digest.update(data)
                if advance:
                    advance(len(data))
            sums[i * SUM : (i + 1) * SUM] = digest.digest()
    return bytes(sums), read


def trusted_sums(m, image_path: Path, sums_path: Path, chunk: int) -> bytes:
    """The chunk digests of point ``m`` as recorded when it was backed up, for the next
    incremental to carry over; SumsDamaged saying why they cannot be had.

    A format-1 point has none: its base image is read once (the old cost, once per
    chain), checked against its whole-disk sha256, and chunked in the same pass."""
    if m.digest:
        if m.chunk_size != chunk:
            raise SumsDamaged(
                "its checksums use %d-byte chunks, this run %d" % (m.chunk_size, chunk)
            )
        return load_sums(sums_path, m.virtual_size, chunk, m.digest)
    whole, hasher = hashlib.sha256(), ChunkHasher(chunk)

    def both(data: bytes) -> None:
        whole.update(data)
        hasher.update(data)

    try:
        command.stream(image.reader(image_path), both)
    except CliError as e:
        raise SumsDamaged("it cannot be read: %s" % " ".join(str(e).split())[-300:]) from None
    if whole.hexdigest() != m.sha256:
        raise SumsDamaged(
            "it reads back with sha256 %s, recorded %s" % (whole.hexdigest()[:16], m.sha256[:16])
        )
    return hasher.finish()


# -- the sidecar -----------------------------------------------------------------------
def load_sums(path: Path, size: int, chunk: int, digest: str) -> bytes:
    """The sidecar's digests, checked against the manifest's ``digest``."""
    try:
        sums = repokey.opened(path, path.read_bytes())
    except FileNotFoundError:
        raise SumsDamaged("its checksum file %s is missing" % path.name) from None
    except OSError as e:
        raise SumsDamaged("its checksum file %s cannot be read (%s)" % (path.name, e)) from None
    except RepositoryError as e:  # sealed (repokey.py): damaged, moved, or no key
        raise SumsDamaged("its checksum file: %s" % e) from None
    if len(sums) != count(size, chunk) * SUM or combine(sums, size) != digest:
        raise SumsDamaged(
            "its checksum file %s is damaged (it does not match the manifest's digest)" % path.name
        )
    return sums


# -- checking a stream against a manifest ----------------------------------------------
class Reading:
    """Hashes a point's flattened content as it goes by, the way its manifest recorded
    it (chunked, or the old whole-disk sha256), and says whether it matches."""

    def __init__(self, m, sums_path: Path):
        self.m = m
        self.sums_path = sums_path
        self.old = not getattr(m, "digest", None)
        self.h = hashlib.sha256() if self.old else ChunkHasher(m.chunk_size)

    def update(self, data: bytes) -> None:
        self.h.update(data)

    @property
    def chunked(self) -> bool:
        """Whether the manifest recorded chunk digests (file_sums can give them)."""
        return not self.old

    def hashed(self, sums: bytes, size: int) -> None:
        """The content's chunk digests, computed elsewhere (file_sums), instead of update."""
        self.h = Hashed(sums, size)

    def problem(self) -> str | None:
        """None when the content matches the manifest, else a line saying where not."""
        m = self.m
        if self.old:
            got = self.h.hexdigest()
            if got == m.sha256:
                return None
            return "sha256 %s, recorded %s at backup time" % (got[:16], m.sha256[:16])
        sums = self.h.finish()
        if combine(sums, self.h.size) == m.digest:
            return None
        try:
            recorded = load_sums(self.sums_path, m.virtual_size, m.chunk_size, m.digest)
        except SumsDamaged:
            return "digest %s, recorded %s at backup time" % (
                combine(sums, self.h.size)[:16],
                m.digest[:16],
            )
        if self.h.size != m.virtual_size:
            return "%d bytes, recorded %d at backup time" % (self.h.size, m.virtual_size)
        where = first_difference(sums, recorded, m.virtual_size, m.chunk_size)
        if where is None:  # cannot be: equal sums and size give the recorded digest
            return "digest %s, recorded %s" % (combine(sums, self.h.size)[:16], m.digest[:16])
        return "%s differ from what was recorded at backup time" % describe(where)

    def sums(self) -> bytes:
        return self.h.finish()


class Hashed:
    """Chunk digests already computed, in ChunkHasher's shape (Reading.hashed)."""

    def __init__(self, sums: bytes, size: int):
        self.sums, self.size = sums, size

    def finish(self) -> bytes:
        return self.sums
