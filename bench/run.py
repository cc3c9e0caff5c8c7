"""``make bench``: the plugin measured against the direct path, every figure a ratio or a
time from this run, with its target and PASS/MISS.

    .venv/bin/python -m bench.run                  # everything (< 15 min on 2 cores)
    BENCH_QUICK=1 .venv/bin/python -m bench.run    # small sizes, 2 repetitions: a smoke run
    .venv/bin/python -m bench.run --only 1,3       # some figures (3 needs 2: it is run too)
    .venv/bin/python -m bench.run --markdown       # the README table from the results file
    .venv/bin/python -m bench.run --readme         # …written into README.md's Performance

Results go to bench/results/latest.json (quick runs: bench/results/quick.json).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from . import (
    cluster,
    compression,
    endtoend,
    extents,
    incremental,
    latency,
    machine,
    restore,
    throughput,
)
from .context import Context
from .data import certificates, dense_image
from .figure import Figure, markdown
from .procs import ROOT, BenchError

RESULTS = ROOT / "bench" / "results"

SUITE: dict[str, Callable[[Context], list[Figure]]] = {
    "1": throughput.full_read,
    "2": throughput.full_backup,
    "3": incremental.scaling,
    "4": latency.tolerance,
    "5": extents.memory_and_extents,
    "6": endtoend.backups,
    "7": compression.backups,
    "8": cluster.overhead,
    "9": restore.restores,
}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="make bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default="", help="comma-separated figure numbers (1-9)")
    p.add_argument("--quick", action="store_true", default=bool(os.environ.get("BENCH_QUICK")))
    p.add_argument("--reps", type=int, default=0, help="repetitions per figure")
    p.add_argument("--markdown", action="store_true", help="print the README table and exit")
    p.add_argument("--readme", action="store_true", help="put the table into README.md")
    p.add_argument("--results", type=Path, help="results file (default bench/results/…)")
    return p.parse_args()


def main() -> int:
    args = parse()
    results = args.results or RESULTS / ("quick.json" if args.quick else "latest.json")
    if args.markdown or args.readme:
        table = markdown(json.loads(results.read_text()))
        if args.readme:
            return update_readme(table)
        print(table)
        return 0
    wanted = [k for k in SUITE if not args.only or k in args.only.split(",")]
    if "3" in wanted and "2" not in wanted:
        wanted.insert(wanted.index("3"), "2")  # 3's incrementals diff against 2's full
    desc = machine.describe()
    print(
        "machine: %s, %d cores, %.0f GiB; load %s"
        % (desc["cpu"], desc["cores"], desc["memory_gib"], desc["load_start"]),
        flush=True,
    )
    started = time.monotonic()
    image = dense_image((512 if args.quick else 4096) << 20)
    work = Path(tempfile.mkdtemp(prefix="xb", dir="/tmp"))  # unix sockets: keep it short
    ctx = Context(args.quick, work, image, certificates(), args.reps or (2 if args.quick else 3))
    figures: list[Figure] = []
    try:
        for key in wanted:
            t0 = time.monotonic()
            print("\n== figure %s: %s" % (key, SUITE[key].__name__), flush=True)
            got = SUITE[key](ctx)
            for f in got:
                print(f.line(), flush=True)
            print("   (%.0f s, load %s)" % (time.monotonic() - t0, machine.load()), flush=True)
            figures += got
    except BenchError as e:
        print("bench: %s" % e, file=sys.stderr)
        return 2
    finally:
        shutil.rmtree(work, ignore_errors=True)
    desc["load_end"] = machine.load()
    report = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "quick": args.quick,
        "reps": ctx.reps,
        "image_bytes": ctx.size,
        "seconds": round(time.monotonic() - started, 1),
        "machine": desc,
        "figures": [f.to_json() for f in figures],
    }
    _summary(figures, report)
    if set(wanted) == set(SUITE):
        RESULTS.mkdir(exist_ok=True)
        results.write_text(json.dumps(report, indent=1) + "\n")
        print("results: %s" % results)
    return 0


BEGIN, END = "<!-- bench table: begin -->", "<!-- bench table: end -->"


def update_readme(table: str) -> int:
    readme = ROOT / "README.md"
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        print("README.md has no %s ... %s block" % (BEGIN, END), file=sys.stderr)
        return 1
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    readme.write_text(head + BEGIN + "\n" + table + "\n" + END + tail)
    print("README.md: table updated")
    return 0


def _summary(figures: list[Figure], report: dict) -> None:
    judged = [f for f in figures if f.passed is not None]
    misses = [f for f in judged if not f.passed]
    print(
        "\n%d figures, %d with a target: %d PASS, %d MISS; %.0f s; load %s -> %s"
        % (
            len(figures),
            len(judged),
            len(judged) - len(misses),
            len(misses),
            report["seconds"],
            report["machine"]["load_start"],
            report["machine"]["load_end"],
        )
    )
    for f in misses:
        print("MISS: %s" % f.name)


if __name__ == "__main__":
    sys.exit(main())
