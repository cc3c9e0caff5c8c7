"""retention.py: restic's --keep-* rules, against a table worked out by hand and by
properties (hypothesis)."""

from __future__ import annotations

import datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from retention_cases import POINTS, TABLE
from xencbt_cli.jobs.retention import UNLIMITED, Policy, apply, point_time


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
