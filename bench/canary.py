"""Figure 3's CBT canary: what checking a sample of unchanged blocks (jobs/canary.py) adds
to the 1 % random incremental, as a share of that incremental's time.

The canary's two parts are timed as the orchestrator runs them: the read of the sampled
blocks of the snapshot inside the copy's nbdkit, after the disk's qemu-img
(``snapshot_copy.sampled``; its wall time, Python's start-up included), and the read
of the same blocks of the new image through qemu-nbd (``canary.differing``), whose open
is not counted: the backup shares it with the digests of the changed chunks
(backup_disks.py), which open it anyway (shown apart).  The plain incremental is timed in
the same repetition, right before.
"""

from __future__ import annotations

import json
import shlex
import statistics
import time
from pathlib import Path

from xencbt_cli.jobs import canary, snapshot_copy
from xencbt_cli.repo import image
from xencbt_core.cbt import Bitmap, blocks_for, encode

from .context import Context
from .figure import Figure
from .procs import timed


def cost(ctx: Context, info: Path, base: Path, blocks: list[int]) -> Figure:
    size = ctx.size
    changed = encode(blocks, size)
    bitmap = ctx.work / "canary-changed.b64"
    bitmap.write_text(changed)
    sample = canary.choose(Bitmap.from_base64(changed, size), size, size, canary.DEFAULT_BLOCKS)
    ranges, sums, took = (ctx.work / n for n in ("canary.ranges", "canary.sums", "canary.ns"))
    sample.write(ranges)
    out = ctx.work / "canary-incr.qcow2"
    options = snapshot_copy.convert_options(base, ctx.connections)
    plain = shlex.join(["qemu-img", "convert", "-f", "raw", *options]) + ' "$uri" ' + str(out)
    # As the backup runs it: after the copy, in the same nbdkit; its wall time from the
    # shell (Python's start-up included).
    took = ctx.work / "canary.ns"
    checked = "%s && s=$(date +%%s%%N) && %s && echo $(($(date +%%s%%N) - s)) > %s" % (
        plain,
        snapshot_copy.sampled((ranges, sums), '"$uri"'),
        shlex.quote(str(took)),
    )
    params = [*ctx.plugin_params(info), "changed=+%s" % bitmap]
    plains, checks, parts = [], [], []
    for _ in range(ctx.reps):
        out.unlink(missing_ok=True)
        plains.append(timed(ctx.captive(params, plain), ctx.log("canary")))
        out.unlink(missing_ok=True)
        checks.append(timed(ctx.captive(params, checked), ctx.log("canary")))
        read = json.loads(sums.read_text())
        t0 = time.monotonic()
        with image.random_access(out) as h:
            opened = time.monotonic()
            differed = canary.differing(h, sample, read["sums"])
            parts.append((int(took.read_text()) / 1e9, time.monotonic() - opened, opened - t0))
        if differed:
            raise RuntimeError("the canary found %d differing blocks on honest data" % differed)
    out.unlink(missing_ok=True)
    plain_m = statistics.median(plains)
    # Its two reads of the sample, each timed where it runs (not a difference of two
    # noisy totals); the paired difference of the totals is shown beside it.
    added = [a + b for a, b, _ in parts]
    shares = [a / p for a, p in zip(added, plains)]
    fig = Figure(
        "3 incremental",
        "CBT canary, %d blocks: its time / the 1 %% incremental's" % len(sample.ranges),
        shares,
        "x",
        target="<= 0.05",
        passed=statistics.median(shares) <= 0.05,
        note="canary %.3f s, incremental %.3f s (the snapshot's sample %.3f s with Python's "
        "start-up; the repository side's reads %.3f s, its qemu-nbd open %.3f s shared "
        "with the digests; totals with and without it differ by %.3f s); %d of %d blocks "
        "unchanged"
        % (
            statistics.median(added),
            plain_m,
            statistics.median(p[0] for p in parts),
            statistics.median(p[1] for p in parts),
            statistics.median(p[2] for p in parts),
            statistics.median(checks) - plain_m,
            sample.unchanged,
            blocks_for(size),
        ),
    )
    fig.extra = {"incremental_seconds": plains, "with_canary_seconds": checks, "parts": parts}
    return fig
