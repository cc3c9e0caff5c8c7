"""The CBT canary: does the change tracker tell the truth?

An incremental copies only the blocks CBT reports changed; a block the tracker missed
silently keeps the previous point's content.  So on every incremental a random sample of
the 64 KiB blocks CBT reports *unchanged* is read from the new snapshot (through the
copy's own nbdkit, by proc/sampler.py) and compared with the new image at the same
offsets, which shows the previous point's content there through its backing chain.
Any difference means CBT missed changes: backup_disks.py then takes a full of that disk
in the same run, from the same snapshot.

Which blocks: uniformly among the unchanged blocks that lie wholly within the previous
point's size.  When the disk grew, the old last block, if partial, and every block past
the old end are left out: they had no previous content to compare with.  When the size
is unchanged, a partial last block is sampled with its short length.  The seed is drawn
per point and recorded, so the sample can be replayed from the manifest and the bitmap.

It is a sample: with U unchanged blocks of which k were missed, n samples catch at least
one with probability 1 - C(U-k, n) / C(U, n), about 1 - (1 - k/U)^n (README).
"""

from __future__ import annotations

import random
import secrets
from dataclasses import dataclass

from xencbt_core.cbt import BLOCK_SIZE, Bitmap, blocks_for

from ..proc import sampler

DEFAULT_BLOCKS = 64
OFF = {"result": "off"}  # --canary-blocks 0: the manifest says so


@dataclass(frozen=True)
class Sample:
    """The blocks to check: (offset, length) each, drawn with ``seed`` among
    ``unchanged`` candidate blocks."""

    seed: int
    unchanged: int
    ranges: tuple[tuple[int, int], ...]


def candidates(old_size: int, new_size: int) -> int:
    """How many leading blocks may be sampled: those wholly within the old size, and a
    partial last block only if the size did not change."""
    return blocks_for(old_size) if new_size == old_size else old_size // BLOCK_SIZE


def choose(bitmap: Bitmap, old_size: int, new_size: int, n: int, seed: int | None = None) -> Sample:
    """``n`` distinct unchanged blocks (fewer if there are fewer), uniformly."""
    seed = secrets.randbits(63) if seed is None else seed
    runs = [r for r in bitmap.runs(0, candidates(old_size, new_size)) if not r.changed]
    total = sum(r.count for r in runs)
    # random.sample over a range draws without building it: cheap on a 2 TiB disk too.
    ranks = sorted(random.Random(seed).sample(range(total), min(n, total)))
    blocks, passed, i = [], 0, 0
    for run in runs:
        while i < len(ranks) and ranks[i] < passed + run.count:
            blocks.append(run.start + ranks[i] - passed)
            i += 1
        passed += run.count
    ranges = tuple((b * BLOCK_SIZE, min(BLOCK_SIZE, new_size - b * BLOCK_SIZE)) for b in blocks)
    return Sample(seed, total, ranges)


def differing(h, sample: Sample, snapshot_sums: list[str]) -> list[tuple[int, int]]:
    """The sampled ranges of the new image that differ from the snapshot's digests of
    them; ``h``: the image (its chain, with its key) opened by image.random_access."""
    if len(snapshot_sums) != len(sample.ranges):
        raise ValueError("the snapshot's sample has %d digests" % len(snapshot_sums))
    got = sampler.digests(h, sample.ranges)
    return [r for r, a, b in zip(sample.ranges, got, snapshot_sums) if a != b]


def record(
    sample: Sample, differed: int, seconds: float, base_point: str, damaged: str | None = None
) -> dict:
    """What the point's manifest keeps of its canary.  ``damaged``: where the previous
    point's image no longer matches its own checksums, when that explains the difference
    (the repository's copy rotted: not CBT's doing)."""
    found = {
        "result": "damaged" if damaged else "failed" if differed else "passed",
        "seed": sample.seed,
        "blocks": len(sample.ranges),
        "bytes": sum(length for _, length in sample.ranges),  # read from the host
        "differed": differed,
        "unchanged_blocks": sample.unchanged,
        "base_point": base_point,
        "seconds": round(seconds, 4),
    }
    if damaged:
        found["damaged"] = damaged
    return found


def failed(rec: dict | None) -> bool:
    return bool(rec) and rec.get("result") == "failed"


def reason(rec: dict) -> str:
    """The full backup's reason after a failed canary."""
    if rec.get("result") == "damaged":
        return (
            "the CBT canary read %d of %d sampled unchanged blocks differing from the "
            "snapshot, and the previous point %s no longer matches its own checksums there "
            "(%s): its image is damaged, not CBT; run xencbt verify"
            % (rec["differed"], rec["blocks"], rec["base_point"], rec["damaged"])
        )
    return (
        "the CBT canary found %d of %d sampled unchanged blocks differ from the previous "
        "point (CBT missed changes)" % (rec["differed"], rec["blocks"])
    )


def describe(rec: dict | None) -> str:
    """One phrase for list, verify and backup's lines."""
    if not rec:
        return "no canary (a full backup, or a point older than the canary)"
    if rec.get("result") == "off":
        return "canary off (--canary-blocks 0)"
    if rec.get("result") == "damaged":
        return "canary: the previous point %s was found damaged (%s)" % (
            rec["base_point"],
            rec["damaged"],
        )
    if failed(rec):
        return (
            "CBT CANARY FAILED: %d of %d sampled unchanged blocks differed from point %s (seed %d)"
            % (
                rec["differed"],
                rec["blocks"],
                rec["base_point"],
                rec["seed"],
            )
        )
    if not rec.get("blocks"):
        return "canary passed: no unchanged block to sample"
    return "canary passed: %d sampled unchanged blocks match point %s (seed %d)" % (
        rec["blocks"],
        rec["base_point"],
        rec["seed"],
    )
