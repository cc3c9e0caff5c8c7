"""Figure 7: full and incremental backup throughput and bytes on disk, uncompressed,
zstd and encrypted, on realistic guest data.

The guest disk is an ext4 file system (``mke2fs -d``) holding text (/usr/share/doc) and
binaries (/usr/bin) up to about half its size, the rest free space: what a VM disk
holds, not random bytes.  The incremental changes 1 % of the disk's 64 KiB blocks, half
with text, half with binary content (copies of other blocks of the same disk).  Both
are what the orchestrator runs (captive nbdkit with the plugin, ``qemu-img convert`` with
``snapshot_copy.convert_options`` for the repository's compression, the plugin with
``snapshot_copy.readahead_params``), through the TLS upstream.
Throughput is the disk's (full) or the changed bytes' (incremental) per second; the
ratio is the data's bytes (the file system's used blocks, or the changed ones) per byte
on disk.  ``luks`` is an encrypted repository's backup: the image created first by
``image.target`` (qcow2 LUKS, its PBKDF kept at image.ITER_TIME_MS), then written into
(``-n``); its seconds count both.  It is uncompressed: qcow2 refuses compressed clusters
in an encrypted image ("Compression and encryption not supported at the same time",
qemu 7.2), so zstd + encryption cannot be measured, nor offered.
"""

from __future__ import annotations

import os
import random
import shlex
import shutil
import statistics
import subprocess
import time
from pathlib import Path

from xencbt_cli.jobs import snapshot_copy
from xencbt_cli.repo import image, repokey
from xencbt_core.cbt import BLOCK_SIZE, encode

from .context import Context
from .figure import Figure
from .procs import BenchError, Upstream, timed

MODES = ("none", "zstd", "luks")
SOURCES = (Path("/usr/share/doc"), Path("/usr/bin"))


def guest_image(work: Path, size: int) -> Path:
    """An ext4 image of ``size`` bytes, about half full of text and binaries."""
    tree = work / "guest-tree"
    budget = size // 2
    for source in SOURCES:
        for path in sorted(source.rglob("*")):
            if budget <= 0:
                break
            if path.is_file() and not path.is_symlink():
                n = path.stat().st_size
                if n > budget:
                    continue
                dest = tree / path.relative_to("/")
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, dest)
                budget -= n
    image = work / "guest.raw"
    with open(image, "wb") as f:
        f.truncate(size)
    code = subprocess.call(
        ["mke2fs", "-q", "-F", "-t", "ext4", "-d", str(tree), str(image)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    shutil.rmtree(tree, ignore_errors=True)
    if code != 0:
        raise BenchError("mke2fs -d could not make the guest image")
    return image


def changed_image(image: Path, out: Path, seed: int = 7) -> list[int]:
    """A copy of ``image`` with 1 % of its blocks replaced by other blocks of it (text and
    binaries as they come); returns the changed block numbers."""
    shutil.copyfile(image, out)
    nblocks = image.stat().st_size // BLOCK_SIZE
    rng = random.Random(seed)
    blocks = sorted(rng.sample(range(nblocks), max(1, nblocks // 100)))
    with open(image, "rb") as src, open(out, "r+b") as dst:
        for b in blocks:
            src.seek(rng.randrange(nblocks // 2) * BLOCK_SIZE)  # the used half
            data = src.read(BLOCK_SIZE)
            dst.seek(b * BLOCK_SIZE)
            dst.write(data)
    return blocks


def used_bytes(image: Path) -> int:
    """Blocks the file system holds data in: what a backup must store."""
    with open(image, "rb") as f:
        used = 0
        while block := f.read(BLOCK_SIZE):
            used += len(block) if block.count(0) != len(block) else 0
    return used


def encrypted_root(work: Path) -> Path:
    """A directory unlocked as an encrypted repository's root (repokey), as ``init
    --encrypt`` and every later command leave it: images under it are LUKS."""
    root = work / "encrypted"
    root.mkdir(exist_ok=True)
    key_file = work / "bench.key"
    key_file.write_text(os.urandom(36).hex())
    key_file.chmod(0o600)
    key, salt = repokey.load(key_file), repokey.new_salt()
    repokey.unlock(root, key, salt, key.check_value(salt))
    return root


def backup_once(ctx: Context, disk: Path, out: Path, base: Path | None, mode: str, bitmap=None):
    """(seconds creating the target, seconds in all) of one backup of ``disk``."""
    up = Upstream(ctx.work, ctx.certs, ["file", disk])
    compression = "none" if mode == "luks" else mode
    options = snapshot_copy.convert_options(base, ctx.connections, compression=compression)
    with up.running():
        params = [*ctx.plugin_params(up.nbd_info()), *snapshot_copy.readahead_params(compression)]
        if bitmap is not None:
            params.append("changed=+%s" % bitmap)
        out.unlink(missing_ok=True)
        t0 = time.monotonic()
        # As snapshot_copy.copy_vm: an encrypted target is created first, then written into.
        into = image.target(out, disk.stat().st_size, base)
        created = time.monotonic() - t0
        options += into[0] if into else []
        name = into[1] if into else str(out)
        run = shlex.join(["qemu-img", "convert", "-f", "raw", *options])
        run += ' "$uri" ' + shlex.quote(name)
        return created, created + timed(ctx.captive(params, run), ctx.log("compression"))


def backups(ctx: Context) -> list[Figure]:
    size = (256 if ctx.quick else 1024) << 20
    disk = guest_image(ctx.work, size)
    changed = ctx.work / "guest-changed.raw"
    blocks = changed_image(disk, changed)
    bitmap = ctx.work / "guest-changed.b64"
    bitmap.write_text(encode(blocks, size))
    used, delta = used_bytes(disk), len(blocks) * BLOCK_SIZE
    figs = []
    encrypted = encrypted_root(ctx.work)
    for mode in MODES:
        where = encrypted if mode == "luks" else ctx.work
        full, incr = where / ("full-%s.qcow2" % mode), where / ("incr-%s.qcow2" % mode)
        full_s, incr_s, full_disk, incr_disk, creates = [], [], [], [], []
        for _ in range(ctx.reps):
            created, seconds = backup_once(ctx, disk, full, None, mode)
            full_s.append(seconds)
            creates.append(created)
            created, seconds = backup_once(ctx, changed, incr, full, mode, bitmap)
            incr_s.append(seconds)
            creates.append(created)
            full_disk.append(full.stat().st_blocks * 512)
            incr_disk.append(incr.stat().st_blocks * 512)
        creating = "; %.1f s of it creating the LUKS image" % statistics.median(creates)
        creating = creating if mode == "luks" else ""
        figs += [
            Figure(
                "7 compression",
                "%s: full backup, disk MB/s" % mode,
                [size / s / 1e6 for s in full_s],
                "MB/s",
                note="%d MiB ext4 disk, %d MiB of it used; %.2f s%s"
                % (size >> 20, used >> 20, statistics.median(full_s), creating),
            ),
            Figure(
                "7 compression",
                "%s: full backup, used bytes per byte on disk" % mode,
                [used / d for d in full_disk],
                "x",
                note="%.1f MiB on disk" % (statistics.median(full_disk) / (1 << 20)),
            ),
            Figure(
                "7 compression",
                "%s: incremental (1 %% changed), changed MB/s" % mode,
                [delta / s / 1e6 for s in incr_s],
                "MB/s",
                note="%.1f MiB changed; %.2f s%s"
                % (delta / (1 << 20), statistics.median(incr_s), creating),
            ),
            Figure(
                "7 compression",
                "%s: incremental, changed bytes per byte on disk" % mode,
                [delta / d for d in incr_disk],
                "x",
                note="%.1f MiB on disk" % (statistics.median(incr_disk) / (1 << 20)),
            ),
        ]
        full.unlink(missing_ok=True)
        incr.unlink(missing_ok=True)
    return figs
