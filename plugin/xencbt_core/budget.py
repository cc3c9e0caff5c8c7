"""Upstream connections several pools hold together: connections= of one nbdkit.

With vm= every disk has its own pool (each connection names one VDI), yet the host
counts them all against its 16 (REFERENCE §2).  The pools share one Budget: a pool
opens a connection only with a unit of it.  A pool that finds the budget spent is
"starving": the others then close connections they hold beyond a fair share as they
finish with them, and it reclaims idle ones itself when it has waited ``patience``
seconds — so a disk being copied is never starved by one that was read and is idle,
and two disks copied at once split the budget instead of trading connections (each
one plugs a VBD on the host: expensive to reopen).
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Protocol


class Member(Protocol):
    def drop_idle(self) -> bool: ...

    def wake(self) -> None: ...


class Budget:
    def __init__(self, limit: int, patience: float | None = 1.0):
        self.limit = limit
        self.patience = patience  # None: a pool's own budget, nobody to reclaim from
        self._held: Counter = Counter()  # member -> connections
        self._starving: set = set()
        self._members: list[Member] = []
        self._lock = threading.Lock()

    @property
    def used(self) -> int:
        with self._lock:
            return sum(self._held.values())

    def join(self, member: Member) -> None:
        with self._lock:
            self._members.append(member)

    def take(self, member: Member) -> bool:
        """One connection's worth for ``member``, if any is left; else it is starving."""
        with self._lock:
            if sum(self._held.values()) >= self.limit:
                self._starving.add(member)
                return False
            self._held[member] += 1
            self._starving.discard(member)
            return True

    def fed(self, member: Member) -> None:
        """``member`` got a connection of its own back: it no longer starves."""
        if member in self._starving:
            with self._lock:
                self._starving.discard(member)

    def should_yield(self, member: Member) -> bool:
        """Whether ``member`` should close a connection it is done with, for a starving
        member: when it holds more than its share.  Cheap when nobody starves."""
        if not self._starving:
            return False
        with self._lock:
            others = self._starving - {member}
            active = {m for m, n in self._held.items() if n} | others
            share = max(1, self.limit // max(1, len(active)))
            return bool(others) and self._held[member] > share

    def give(self, member: Member) -> None:
        """``member`` closed a connection: wake the others' waiters.  Called without any
        pool's lock held (waking takes them)."""
        with self._lock:
            self._held[member] -= 1
            members = list(self._members)
        for m in members:
            m.wake()

    def reclaim(self, asking: Member) -> bool:
        """Close one idle connection of another member (its give() wakes ``asking``)."""
        with self._lock:
            others = [m for m in self._members if m is not asking]
        return any(m.drop_idle() for m in others)
