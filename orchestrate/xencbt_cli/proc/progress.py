"""Progress on a terminal: one line per disk in flight (label, bytes, rate, ETA).

``main`` turns the display on for the length of a command when stderr is a terminal and
--json was not given; everywhere else ``task`` and ``percent`` cost nothing and show
nothing.  Copies are counted from qemu-img's own ``-p`` figures (written to a private
file, never to the terminal); digests, verify and restore checks by the bytes they read.
The lines are drawn by rich (python3-rich), which keeps one line per task, so the
parallel copies of ``backup --jobs N`` never overwrite each other, and prints the
messages xencbt writes to stderr meanwhile above them.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from .scratch import private_dir

Advance = Callable[[int], None]
POLL = 0.25  # seconds between looks at what a tool reported
PERCENT = re.compile(r"\((\d+(?:\.\d+)?)/100%\)")

_live: Progress | None = None


@contextlib.contextmanager
def shown(enabled: bool) -> Iterator[None]:
    """The display, for the length of a command (only one at a time)."""
    global _live
    if not enabled:
        yield
        return
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(bar_width=24),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(file=sys.stderr),
        redirect_stdout=False,  # stdout is the command's output, never the display's
    )
    with bar:
        _live = bar
        try:
            yield
        finally:
            _live = None


def wanted(as_json: bool) -> bool:
    return sys.stderr.isatty() and not as_json


@contextlib.contextmanager
def task(label: str, total: int | None) -> Iterator[Advance]:
    """A line for ``label`` while the block runs; call the yielded function with the
    bytes done since the last call."""
    live = _live
    if live is None:
        yield _ignore
        return
    tid = live.add_task(label, total=total)
    try:
        yield lambda n: live.advance(tid, n)
    finally:
        live.remove_task(tid)


@contextlib.contextmanager
def percent(label: str, total: int) -> Iterator[Path | None]:
    """A line for a ``qemu-img -p`` run: yields the file its stdout is to go to (None
    when nothing is shown: then run it without -p), whose last ``(x/100%)`` is read four times
    a second.  qemu-img counts the whole disk, holes and unchanged areas included, so
    ``total`` is the virtual size."""
    if _live is None:
        yield None
        return
    done = threading.Event()
    with private_dir("xencbt-progress-") as tmp:
        report = Path(tmp) / "qemu-img.out"
        with task(label, total) as advance:
            seen = [0]

            def look() -> None:
                while not done.wait(POLL):
                    now = min(total, int(reported(report) * total))
                    if now > seen[0]:
                        advance(now - seen[0])
                        seen[0] = now

            poller = threading.Thread(target=look, name="progress", daemon=True)
            poller.start()
            try:
                yield report
            finally:
                done.set()
                poller.join()


def reported(path: Path) -> float:
    """The last fraction qemu-img -p wrote into ``path`` ("    (12.34/100%)\r")."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 64))
            tail = f.read().decode(errors="replace")
    except OSError:
        return 0.0
    found = PERCENT.findall(tail)
    return float(found[-1]) / 100 if found else 0.0


def reporting(argv: list, report: Path | None) -> list:
    """``argv`` (a qemu-img with -p) with its stdout into ``report``; as is without one."""
    if report is None:
        return argv
    return ["sh", "-c", 'exec "$@" >"$0"', str(report), *map(str, argv)]


def _ignore(n: int) -> None:
    pass
