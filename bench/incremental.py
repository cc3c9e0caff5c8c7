"""Figure 3: an incremental backup's wall time against the full one, as changes grow.

Each incremental is what the orchestrator runs: captive nbdkit with the bitmap, and
``qemu-img convert -B full.qcow2`` writing only the changed blocks.  The full's time is
figure 2's, from the same run.  An incremental with nothing changed measures the fixed
start-up (Python, TLS handshake, qemu-img), reported on its own; the scaling targets are
about the part that grows with changed bytes.  The CBT canary's cost is measured on the
1 % random incremental (canary.py).
"""

from __future__ import annotations

import random
import shlex
import statistics

from xencbt_cli.jobs import snapshot_copy
from xencbt_core.cbt import BLOCK_SIZE, blocks_for, encode

from . import canary
from .context import Context
from .figure import Figure
from .procs import Upstream, timed

PERCENTS = (0.1, 1.0, 10.0, 100.0)
CLUSTER = 64  # blocks per run in the clustered pattern (4 MiB)


def changed_blocks(nblocks: int, percent: float, pattern: str, seed: int = 6) -> list[int]:
    count = max(1, round(nblocks * percent / 100))
    rng = random.Random(seed)
    if count >= nblocks:
        return list(range(nblocks))
    if pattern == "random":
        return rng.sample(range(nblocks), count)
    runs = -(-count // CLUSTER)
    starts = sorted(rng.sample(range(0, nblocks - CLUSTER, CLUSTER), runs))
    blocks = [b for s in starts for b in range(s, s + CLUSTER)]
    return blocks[:count]


def scaling(ctx: Context) -> list[Figure]:
    base = ctx.shared.get("full_image")
    full = ctx.shared.get("full_seconds")
    if base is None or not base.exists():
        raise RuntimeError("figure 3 needs figure 2's full backup (run them together)")
    size, nblocks = ctx.size, blocks_for(ctx.size)
    up = Upstream(ctx.work, ctx.certs, ["file", ctx.image])
    out = ctx.work / "incr.qcow2"
    options = snapshot_copy.convert_options(base, ctx.connections)
    run = shlex.join(["qemu-img", "convert", "-f", "raw", *options]) + ' "$uri" ' + str(out)
    cases = [("none", 0.0)] + [(p, pct) for p in ("random", "clustered") for pct in PERCENTS]
    times: dict[tuple[str, float], list[float]] = {}
    with up.running():
        info = up.nbd_info()
        for pattern, pct in cases:
            if pattern == "clustered" and pct == 100.0:
                times[pattern, pct] = times["random", pct]  # the same bitmap: all ones
                continue
            blocks = changed_blocks(nblocks, pct, pattern) if pct else []
            bitmap = ctx.work / "changed.b64"
            bitmap.write_text(encode(blocks, size))
            params = [*ctx.plugin_params(info), "changed=+%s" % bitmap]
            for _ in range(ctx.reps):
                out.unlink(missing_ok=True)
                times.setdefault((pattern, pct), []).append(
                    timed(ctx.captive(params, run), ctx.log("incremental"))
                )
        # What the CBT canary adds to the 1 % random incremental (canary.py).
        checked = canary.cost(ctx, info, base, changed_blocks(nblocks, 1.0, "random"))
    out.unlink(missing_ok=True)
    return [*_figures(times, full, size), checked]


def _figures(times: dict, full: list[float], size: int) -> list[Figure]:
    start = statistics.median(times["none", 0.0])
    full_m = statistics.median(full)
    figs = [
        Figure(
            "3 incremental",
            "start-up: incremental with nothing changed",
            times["none", 0.0],
            "s",
            note="captive nbdkit + plugin + TLS handshake + qemu-img on an empty bitmap",
        )
    ]
    for pattern in ("random", "clustered"):
        medians = [statistics.median(times[pattern, p]) for p in PERCENTS]
        grows = all(b >= a * 0.9 for a, b in zip(medians, medians[1:]))
        for pct in PERCENTS:
            samples = times[pattern, pct]
            mib = size * pct / 100 / (1 << 20)
            fig = Figure(
                "3 incremental",
                "%s %g %% of 64 KiB blocks (%.0f MiB): time / full" % (pattern, pct, mib),
                [t / full_m for t in samples],
                "x",
                note="%.2f s, %.2f s above start-up; full %.2f s"
                % (statistics.median(samples), statistics.median(samples) - start, full_m),
            )
            net = [(t - start) / (full_m - start) for t in samples]
            if pct == 1.0:
                fig.target = "<= 0.05 net of start-up"
                fig.passed = statistics.median(net) <= 0.05
                fig.note += "; net of start-up %.3f" % statistics.median(net)
            elif pct == 0.1:
                fig.target = "<= 1 s + start-up"
                fig.passed = statistics.median(samples) - start <= 1.0
            elif pct == 100.0:
                fig.target = "time grows with changes"
                fig.passed = grows
                fig.note += "; medians %s" % ", ".join("%.2f" % m for m in medians)
            fig.extra = {"seconds": samples, "net_of_startup": net, "blocks": pct}
            figs.append(fig)
    return figs


__all__ = ["scaling", "changed_blocks", "BLOCK_SIZE"]
