"""Figure 3's CBT canary: what checking a sample of unchanged blocks (jobs/canary.py) adds
to the 1 % random incremental, as a share of that incremental's time.

The canary's two parts are timed as the orchestrator runs them: the read of the sampled
blocks of the snapshot inside the copy's nbdkit (``snapshot_copy.sampled``, after the
disk's qemu-img; its wall time from the shell, Python's start-up included), and the read
of the same blocks of the new image through qemu-nbd (``canary.differing``).  The plain
incremental is timed in the same repetition, right before.
"""

from __future__ import annotations

import json
import shlex
import statistics
import time
from pathlib import Path

from xencbt_cli.jobs import canary, snapshot_copy
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
    step = snapshot_copy.sampled((ranges, sums), '"$uri"')
    # The step's wall time, measured by the shell nbdkit runs it in.
    checked = "%s && s=$(date +%%s%%N) && %s && echo $(($(date +%%s%%N) - s)) > %s" % (
        plain,
        step,
        shlex.quote(str(took)),
    )
    params = [*ctx.plugin_params(info), "changed=+%s" % bitmap]
    plains, parts = [], []
    for _ in range(ctx.reps):
        out.unlink(missing_ok=True)
        plains.append(timed(ctx.captive(params, plain), ctx.log("canary")))
        out.unlink(missing_ok=True)
        timed(ctx.captive(params, checked), ctx.log("canary"))
        t0 = time.monotonic()
        read = json.loads(sums.read_text())
        differed = canary.differing(out, sample, read["sums"])
        repo_side = time.monotonic() - t0
        if differed:
            raise RuntimeError("the canary found %d differing blocks on honest data" % differed)
        parts.append((int(took.read_text()) / 1e9, repo_side, read["seconds"]))
    out.unlink(missing_ok=True)
    seconds = [a + b for a, b, _ in parts]
    shares = [s / p for s, p in zip(seconds, plains)]
    fig = Figure(
        "3 incremental",
        "CBT canary, %d blocks: its time / the 1 %% incremental's" % len(sample.ranges),
        shares,
        "x",
        target="<= 0.05",
        passed=statistics.median(shares) <= 0.05,
        note="canary %.3f s (snapshot side %.3f s, of which reading %.3f s; repository side "
        "%.3f s); incremental %.2f s; %d of %d blocks unchanged"
        % (
            statistics.median(seconds),
            statistics.median(p[0] for p in parts),
            statistics.median(p[2] for p in parts),
            statistics.median(p[1] for p in parts),
            statistics.median(plains),
            sample.unchanged,
            blocks_for(size),
        ),
    )
    fig.extra = {"canary_seconds": seconds, "incremental_seconds": plains, "parts": parts}
    return fig
