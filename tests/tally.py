"""Figures the reliability suite reports at the end of a test run (issue #5).

A test calls ``tally("faults injected", 3)`` for what it really did; conftest's
``pytest_terminal_summary`` prints the totals, so the summary is made of counts the
tests produced, never of numbers written into the report.  Kills are counted only when
confirmed inside their window (crash_support.Kills: ``kills confirmed: <window>``, their
sum ``kills survived``); the secret watch adds its coverage (``secret scans: execs
seen``, ``encodings checked``, ``temp files caught``…) next to ``secrets found``.  In a parallel
run (pytest-xdist) each worker counts its own and the controller merges them (``merge``).
"""

from __future__ import annotations

from collections import Counter

# The figures the issue asks for, printed in this order (others follow, sorted).
HEADLINE = (
    "faults injected",
    "kills survived",
    "stray processes after a kill",
    "hostile inputs tried",
    "secrets found",
    "VDI_IN_USE retries",  # clean-up calls xencbt tried again while dom0 held NBD VBDs
)

# Not counts but properties of the run, the same in every worker of a parallel run: merged
# by taking the largest, never summed (4 encodings checked by 3 workers are still 4).
PROPERTIES = (
    "secret scans: encodings checked",
    "secret scans: deleted temp files NOT watched (no root)",
)

_counts: Counter[str] = Counter()


def tally(figure: str, n: int = 1) -> None:
    _counts[figure] += n


def figures() -> dict[str, int]:
    """The totals so far; headline figures first, zero if nothing was counted."""
    ordered = {name: _counts.get(name, 0) for name in HEADLINE}
    ordered.update(sorted((k, v) for k, v in _counts.items() if k not in ordered))
    return ordered


def merge(worker: dict[str, int]) -> None:
    """Add one xdist worker's figures (conftest's pytest_testnodedown, on the controller):
    counts are summed, ``PROPERTIES`` kept at their largest."""
    for name, n in worker.items():
        if name in PROPERTIES:
            _counts[name] = max(_counts.get(name, 0), n)
        else:
            _counts[name] += n
