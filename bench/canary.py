"""Figure 3's CBT canary: what checking a sample of unchanged blocks (jobs/canary.py) adds
to the 1 % random incremental, as a share of that incremental's time.

Timed as the backup runs it: the copy's nbdkit runs the disk's qemu-img and the read of
the sampled blocks of the snapshot side by side (``snapshot_copy.beside``; a thread of this
process reads them, as one of xencbt does: proc/sampler.py), so the
sample's part is the difference between that and the bare qemu-img, paired in each
repetition (their order alternates, so neither always runs on a warmer cache).  The read
of the same blocks of the new image through qemu-nbd (``canary.differing``) is added; its
open is not, the backup shares it with the digests of the changed chunks
(backup_disks.py), which open it anyway (shown apart).  The figure takes at least
REPS repetitions: the difference is a few hundredths of a second.
"""

from __future__ import annotations

import shlex
import statistics
import time
from pathlib import Path

from xencbt_cli.jobs import canary, snapshot_copy
from xencbt_cli.proc.sampler import Sampler, SampleRead
from xencbt_cli.repo import image
from xencbt_core.cbt import Bitmap, blocks_for, encode

from .context import Context
from .figure import Figure
from .procs import timed

REPS = 21


def cost(ctx: Context, info: Path, base: Path, blocks: list[int]) -> Figure:
    size = ctx.size
    changed = encode(blocks, size)
    bitmap = ctx.work / "canary-changed.b64"
    bitmap.write_text(changed)
    sample = canary.choose(Bitmap.from_base64(changed, size), size, size, canary.DEFAULT_BLOCKS)
    out = ctx.work / "canary-incr.qcow2"
    options = snapshot_copy.convert_options(base, ctx.connections)
    plain = shlex.join(["qemu-img", "convert", "-f", "raw", *options]) + ' "$uri" ' + str(out)
    params = [*ctx.plugin_params(info), "changed=+%s" % bitmap]
    plains, checks, parts = [], [], []
    pair = [False, True]  # without, then with the canary's sample
    for rep in range(max(ctx.reps, REPS)):
        # As the backup runs it: beside the copy, in the same nbdkit, read by a thread
        # of this process (the backup's: xencbt's).
        read = SampleRead(sample.ranges)
        for checked in pair if rep % 2 else reversed(pair):
            out.unlink(missing_ok=True)
            with Sampler() as sampler:
                script = snapshot_copy.beside(plain, sampler.ask("", read)) if checked else plain
                with sampler.serving() as fds:
                    seconds = timed(ctx.captive(params, script), ctx.log("canary"), fds=fds)
            (checks if checked else plains).append(seconds)
        assert read.sums is not None  # the script checked it was read
        t0 = time.monotonic()
        with image.random_access(out) as h:
            opened = time.monotonic()
            differed = canary.differing(h, sample, read.sums)
            parts.append((read.seconds, time.monotonic() - opened, opened - t0))
        if differed:
            raise RuntimeError("the canary found %d differing blocks on honest data" % differed)
    out.unlink(missing_ok=True)
    plain_m = statistics.median(plains)
    # The sample's share: what running it beside the copy added to the copy (paired),
    # plus the repository side's reads, which run after.
    added = [c - p + repo for c, p, (_, repo, _) in zip(checks, plains, parts)]
    shares = [a / p for a, p in zip(added, plains)]
    fig = Figure(
        "3 incremental",
        "CBT canary, %d blocks: its time / the 1 %% incremental's" % len(sample.ranges),
        shares,
        "x",
        target="<= 0.05",
        passed=statistics.median(shares) <= 0.05,
        note="canary %.3f s, incremental %.3f s (the snapshot's sample, beside the copy: "
        "its reads %.3f s, %.3f s added; the repository side's reads %.3f s, its qemu-nbd open "
        "%.3f s shared with the digests); %d of %d blocks unchanged; %d repetitions"
        % (
            statistics.median(added),
            plain_m,
            statistics.median(p[0] for p in parts),
            statistics.median(c - p for c, p in zip(checks, plains)),
            statistics.median(p[1] for p in parts),
            statistics.median(p[2] for p in parts),
            sample.unchanged,
            blocks_for(size),
            len(plains),
        ),
    )
    fig.extra = {"incremental_seconds": plains, "with_canary_seconds": checks, "parts": parts}
    return fig
