"""The connection budget that the pools of one nbdkit share under vm= (budget.py)."""

from __future__ import annotations

from xencbt_core.budget import Budget


class Member:
    """A pool as the budget sees it: idle connections it can drop, waiters it wakes."""

    def __init__(self, budget: Budget, idle: int = 0):
        self.budget = budget
        self.idle = idle
        self.woken = 0
        budget.join(self)

    def drop_idle(self) -> bool:
        if not self.idle:
            return False
        self.idle -= 1
        self.budget.give(self)
        return True

    def wake(self) -> None:
        self.woken += 1


def test_units_are_shared_and_given_back():
    budget = Budget(2)
    a, b = Member(budget), Member(budget)
    assert budget.take(a) and budget.take(b)
    assert not budget.take(a) and budget.used == 2
    budget.give(b)
    assert a.woken == 1 and b.woken == 1  # every member's waiters may try again
    assert budget.take(a) and budget.used == 2


def test_a_starving_member_gets_connections_above_the_others_share():
    budget = Budget(4)
    a, b = Member(budget), Member(budget)
    for _ in range(4):
        assert budget.take(a)
    assert not budget.should_yield(a)  # nobody waits: keep them all
    assert not budget.take(b)  # b starves
    assert budget.should_yield(a)  # a holds 4 > its share of 2
    budget.give(a)
    budget.give(a)
    assert not budget.should_yield(a)  # down to its share
    assert budget.take(b)
    budget.fed(b)
    assert not budget.should_yield(a) and not budget.should_yield(b)


def test_a_member_at_its_share_keeps_its_connection_however_long_the_wait():
    budget = Budget(1)
    a, b = Member(budget), Member(budget)
    assert budget.take(a)
    assert not budget.take(b)
    assert not budget.should_yield(
        a
    )  # one each is the least share: no trading a VBD back and forth


def test_reclaim_closes_an_idle_connection_of_another_member():
    budget = Budget(2)
    a, b = Member(budget, idle=2), Member(budget)
    assert budget.take(a) and budget.take(a)
    assert not budget.take(b)
    assert budget.reclaim(b) and a.idle == 1 and budget.used == 1
    assert budget.take(b)
    assert not budget.reclaim(a)  # b has nothing idle to give
