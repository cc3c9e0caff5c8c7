"""The retention table (no tests): ten points over six ISO weeks, and what each policy
keeps of them, worked out by hand (test_retention.py checks retention.py against it,
test_cli_retention.py xencbt prune)."""

from __future__ import annotations

import datetime

from xencbt_cli.jobs.retention import UNLIMITED, Policy


def at(text: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(text).replace(tzinfo=datetime.timezone.utc)


# Ten points over six ISO weeks.  2026-01-01 is a Thursday: ISO week 2026-W01 runs from
# Mon 2025-12-29 to Sun 2026-01-04, so P1 (2025) and P2 (2026) share a week.
POINTS = {
    "P1": at("2025-12-31T10:00"),  # W01, December, 2025
    "P2": at("2026-01-02T10:00"),  # W01, January, 2026
    "P3": at("2026-01-06T10:00"),  # W02
    "P4": at("2026-01-09T10:00"),  # W02
    "P5": at("2026-01-14T10:00"),  # W03
    "P6": at("2026-01-20T10:00"),  # W04
    "P7": at("2026-01-27T10:00"),  # W05
    "P8": at("2026-02-03T09:00"),  # W06, February
    "P9": at("2026-02-03T10:00"),  # W06, same day as P8, an hour later
    "P10": at("2026-02-04T10:00"),  # W06
}


# policy -> {kept point: the rules that keep it}, worked out by hand (newest first, the
# newest point of each new bucket while the count lasts; the oldest point too when a
# rule has count left at the end).
TABLE = [
    (Policy(last=3), {"P10": ["last"], "P9": ["last"], "P8": ["last"]}),
    # P8 shares P9's day; the count runs out at P7.
    (Policy(daily=3), {"P10": ["daily"], "P9": ["daily"], "P7": ["daily"]}),
    (Policy(weekly=3), {"P10": ["weekly"], "P7": ["weekly"], "P6": ["weekly"]}),
    (Policy(monthly=2), {"P10": ["monthly"], "P7": ["monthly"]}),
    (Policy(hourly=2), {"P10": ["hourly"], "P9": ["hourly"]}),
    # Two of three years' count left at P1 (2025): kept as a year of its own.
    (Policy(yearly=3), {"P10": ["yearly"], "P1": ["yearly"]}),
    (
        Policy(last=2, weekly=2, yearly=5),
        {
            "P10": ["last", "weekly", "yearly"],
            "P9": ["last"],
            "P7": ["weekly"],
            "P1": ["yearly"],
        },
    ),
    # Six weeks hold points; P2 is W01's newest.  P1 shares W01 but is the oldest point
    # with count left (restic 0.17): kept as well.
    (
        Policy(weekly=10),
        {p: ["weekly"] for p in ("P10", "P7", "P6", "P5", "P4", "P2", "P1")},
    ),
    (Policy(daily=UNLIMITED), {p: ["daily"] for p in POINTS if p != "P8"}),
]
