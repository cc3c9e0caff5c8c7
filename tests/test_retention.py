"""retention.py: restic's --keep-* rules, against a table worked out by hand and by
properties (hypothesis)."""

from __future__ import annotations

import datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from xencbt_cli.jobs.retention import UNLIMITED, Policy, apply, point_time


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


@pytest.mark.parametrize("policy,expected", TABLE, ids=[p.describe() for p, _ in TABLE])
def test_hand_worked_table(policy, expected):
    got = {p: rules for p, rules in apply(policy, POINTS).items() if rules}
    assert got == expected
    assert set(apply(policy, POINTS)) == set(POINTS)  # every point has an answer


def test_point_ids_are_utc_times():
    assert point_time("20260203T100000.000000Z") == POINTS["P9"]


times = st.dictionaries(
    st.text("abcdefghij", min_size=1, max_size=4),
    st.datetimes(
        min_value=datetime.datetime(2020, 1, 1),
        max_value=datetime.datetime(2030, 1, 1),
        timezones=st.just(datetime.timezone.utc),
    ),
    min_size=1,
    max_size=40,
)
counts = st.sampled_from([0, 0, 1, 2, 3, 5, UNLIMITED])
policies = st.builds(
    Policy, last=counts, hourly=counts, daily=counts, weekly=counts, monthly=counts, yearly=counts
)
BUCKET = {
    "hourly": lambda t: (t.year, t.month, t.day, t.hour),
    "daily": lambda t: (t.year, t.month, t.day),
    "weekly": lambda t: t.isocalendar()[:2],
    "monthly": lambda t: (t.year, t.month),
    "yearly": lambda t: t.year,
}


def newest_first(points: dict) -> list[str]:
    return sorted(points, key=lambda p: (points[p], p), reverse=True)


@settings(max_examples=300, deadline=None)
@given(times, policies)
def test_rules_keep_at_most_their_count_and_the_newest_always(points, policy):
    kept = apply(policy, points)
    newest = newest_first(points)[0]
    assert bool(kept[newest]) == (not policy.empty())
    for rule in ("last", *BUCKET):
        n = getattr(policy, rule)
        by_rule = [p for p, rules in kept.items() if rule in rules]
        if n == 0:
            assert not by_rule
        elif n > 0:
            assert len(by_rule) <= n
        if rule == "last" and n:
            want = len(points) if n == UNLIMITED else min(n, len(points))
            assert set(by_rule) == set(newest_first(points)[:want])


@settings(max_examples=300, deadline=None)
@given(times, policies)
def test_a_bucket_rule_keeps_the_newest_point_of_distinct_buckets(points, policy):
    kept = apply(policy, points)
    order = newest_first(points)
    oldest = order[-1]
    for rule, bucket in BUCKET.items():
        if not getattr(policy, rule):
            continue
        by_rule = [p for p in order if rule in kept[p] and p != oldest]
        assert len({bucket(points[p]) for p in by_rule}) == len(by_rule)
        for p in by_rule:
            newer = order[: order.index(p)]
            assert all(bucket(points[q]) != bucket(points[p]) for q in newer)
        # No bucket with count left is skipped: every newer bucket than the last kept
        # one got its point.
        n = getattr(policy, rule)
        if n == UNLIMITED:
            assert {bucket(points[p]) for p in order} <= {
                bucket(points[p]) for p in [*by_rule, oldest] if rule in kept[p]
            } | {bucket(points[oldest])}


@settings(max_examples=300, deadline=None)
@given(times, policies, st.sampled_from(["last", *BUCKET]))
def test_a_larger_count_never_keeps_fewer_points(points, policy, rule):
    n = getattr(policy, rule)
    more = Policy(**{**policy.__dict__, rule: UNLIMITED if n in (UNLIMITED, 5) else n + 1})
    fewer = {p for p, rules in apply(policy, points).items() if rules}
    assert fewer <= {p for p, rules in apply(more, points).items() if rules}
