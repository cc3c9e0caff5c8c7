"""Injected faults and traffic counters for the simulated hosts' NBD servers.

Both are shared between threads (the control endpoint writes faults while connection threads
read them; every connection thread bumps counters), so each keeps a lock.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass, field
from typing import Any

_INT_OR_NONE = ("drop_after_bytes", "drop_on_read")
_SECONDS = ("read_latency", "refuse_until", "hold_until")


@dataclass
class Faults:
    """Faults every NBD connection of every simulated host obeys (one instance per simulator).

    drop_after_bytes: a connection is closed once it has sent this many read payload bytes,
        mid-reply (after the success header), like a read failing on the host.
    drop_on_read: a connection's Nth read request gets the success header, then the
        connection drops.
    read_latency: seconds slept before answering each read.
    refuse_until: time.monotonic() deadline; until then new connections are closed before
        the greeting.
    hold_until: time.monotonic() deadline; until then every read waits (a gate: clients
        keep opening connections for their queued reads, so a load test reaches the
        connection limit whatever the machine's speed).
    """

    drop_after_bytes: int | None = None
    drop_on_read: int | None = None
    read_latency: float = 0.0
    refuse_until: float = 0.0
    hold_until: float = 0.0
    _lock: threading.Lock = field(
        default_factory=threading.Lock, init=False, repr=False, compare=False
    )

    def update(self, **changes: Any) -> None:
        """Set several faults at once, all or none; ValueError names the bad one.

        Besides the field names, refuse_for=SECONDS and hold_for=SECONDS are accepted (the
        deadlines counted from now).
        """
        for relative, deadline in (("refuse_for", "refuse_until"), ("hold_for", "hold_until")):
            if relative in changes:
                seconds = _seconds(relative, changes.pop(relative))
                changes[deadline] = time.monotonic() + seconds
        checked = {name: _check(name, value) for name, value in changes.items()}
        with self._lock:
            for name, value in checked.items():
                setattr(self, name, value)

    def refuse_for(self, seconds: float) -> None:
        self.update(refuse_for=seconds)

    def refusing(self) -> bool:
        return time.monotonic() < self.refuse_until

    def snapshot(self) -> Faults:
        """A consistent copy, so one request sees one set of faults."""
        with self._lock:
            return Faults(
                self.drop_after_bytes,
                self.drop_on_read,
                self.read_latency,
                self.refuse_until,
                self.hold_until,
            )

    def to_dict(self) -> dict:
        now = self.snapshot()
        return {
            "drop_after_bytes": now.drop_after_bytes,
            "drop_on_read": now.drop_on_read,
            "read_latency": now.read_latency,
            "refuse_for_remaining": max(0.0, now.refuse_until - time.monotonic()),
            "hold_for_remaining": max(0.0, now.hold_until - time.monotonic()),
        }

    def clear(self) -> None:
        self.update(
            drop_after_bytes=None,
            drop_on_read=None,
            read_latency=0.0,
            refuse_until=0.0,
            hold_until=0.0,
        )


def _check(name: str, value: Any) -> Any:
    if name in _INT_OR_NONE:
        if value is None:
            return None
        # bool is an int subclass; True as a byte count is a caller's mistake.
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"fault {name} must be a positive integer or None, not {value!r}")
        return value
    if name in _SECONDS:
        return _seconds(name, value)
    raise ValueError(f"unknown fault {name!r}")


def _seconds(name: str, value: Any) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
        raise ValueError(f"fault {name} must be a number of seconds >= 0, not {value!r}")
    return float(value)


@dataclass
class Counters:
    """NBD traffic of one simulated host.

    refused counts connections closed before the greeting (refuse fault, connection limit,
    no NBD network); connections_* count only connections that got a greeting.
    """

    bytes_served: int = 0
    reads: int = 0
    connections_total: int = 0
    connections_now: int = 0
    peak_connections: int = 0
    refused: int = 0
    _lock: threading.Lock = field(
        default_factory=threading.Lock, init=False, repr=False, compare=False
    )

    def opened(self) -> None:
        with self._lock:
            self.connections_total += 1
            self.connections_now += 1
            self.peak_connections = max(self.peak_connections, self.connections_now)

    def closed(self) -> None:
        with self._lock:
            self.connections_now -= 1

    def refuse(self) -> None:
        with self._lock:
            self.refused += 1

    def read(self) -> None:
        with self._lock:
            self.reads += 1

    def served(self, nbytes: int) -> None:
        with self._lock:
            self.bytes_served += nbytes

    def to_dict(self) -> dict:
        with self._lock:
            return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}

    def reset(self) -> None:
        """Zero the totals; live connections stay counted and become the new peak."""
        with self._lock:
            self.bytes_served = self.reads = self.connections_total = self.refused = 0
            self.peak_connections = self.connections_now
