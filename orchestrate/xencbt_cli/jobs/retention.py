"""Which points a retention policy keeps: restic's ``forget --keep-*`` rules.

Points are taken newest first.  Each rule has a count and a bucket (the point itself
for ``last``, its UTC hour, day, ISO week, month or year for the others); a point is
kept by a rule when it is the newest point of a bucket the rule has not seen yet and the
rule's count is not used up; the oldest point is also kept by every rule that still has
count left (restic 0.17: the longest history the counts allow).  A point is kept if any
rule keeps it.  ``-1`` (``unlimited`` on the command line) never runs out.  Times are
UTC, taken from the point id (the moment the backup's snapshot was named).

Pure: no files, no clock.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from dataclasses import dataclass, fields

UNLIMITED = -1


@dataclass(frozen=True)
class Policy:
    last: int = 0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0

    def empty(self) -> bool:
        return all(getattr(self, f.name) == 0 for f in fields(self))

    def describe(self) -> str:
        parts = []
        for f in fields(self):
            n = getattr(self, f.name)
            if n:
                parts.append("%s %s" % (f.name, "unlimited" if n == UNLIMITED else n))
        return ", ".join(parts) or "nothing"


def _week(t: datetime.datetime, nr: int) -> int:
    year, week, _ = t.isocalendar()
    return year * 100 + week


BUCKETS: dict[str, Callable[[datetime.datetime, int], int]] = {
    "last": lambda t, nr: nr,
    "hourly": lambda t, nr: ((t.year * 100 + t.month) * 100 + t.day) * 100 + t.hour,
    "daily": lambda t, nr: (t.year * 100 + t.month) * 100 + t.day,
    "weekly": _week,
    "monthly": lambda t, nr: t.year * 100 + t.month,
    "yearly": lambda t, nr: t.year,
}


def point_time(point: str) -> datetime.datetime:
    """The UTC time a point id (20250102T030405.678901Z) names."""
    return datetime.datetime.strptime(point, "%Y%m%dT%H%M%S.%fZ").replace(
        tzinfo=datetime.timezone.utc
    )


def apply(policy: Policy, times: dict[str, datetime.datetime]) -> dict[str, list[str]]:
    """point -> the rules that keep it ([] : it goes)."""
    newest_first = sorted(times, key=lambda p: (times[p], p), reverse=True)
    counts = {name: getattr(policy, name) for name in BUCKETS}
    last: dict[str, int | None] = dict.fromkeys(BUCKETS)
    reasons: dict[str, list[str]] = {}
    for nr, point in enumerate(newest_first):
        t = times[point].astimezone(datetime.timezone.utc)
        oldest = nr == len(newest_first) - 1
        reasons[point] = []
        for name, bucket in BUCKETS.items():
            if counts[name] == 0:
                continue
            value = bucket(t, nr)
            if value != last[name] or oldest:
                reasons[point].append(name)
                last[name] = value
                if counts[name] > 0:
                    counts[name] -= 1
    return reasons
