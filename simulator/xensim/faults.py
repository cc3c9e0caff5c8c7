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
_COUNT_OR_NONE = ("gate_after_reads",)
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
        connection limit whatever the machine's speed).  Cleared early, the reads go on.
    gate_after_reads: N: the next N reads (of every host and connection) are answered,
        then every read waits at the gate until the fault is set to None or cleared; a test
        holds a copy in mid-flight this way, sees it held (``reads_at_gate``) and releases
        it when it is done, whatever the machine's speed (issue #22: events, not timers).
    """

    drop_after_bytes: int | None = None
    drop_on_read: int | None = None
    read_latency: float = 0.0
    refuse_until: float = 0.0
    hold_until: float = 0.0
    gate_after_reads: int | None = None
    _lock: threading.Lock = field(
        default_factory=threading.Lock, init=False, repr=False, compare=False
    )
    _passed: int = field(default=0, init=False, repr=False, compare=False)
    _waiting: int = field(default=0, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Waits at the gate or the hold deadline end as soon as a fault changes.
        self._changed = threading.Condition(self._lock)

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
        with self._changed:
            for name, value in checked.items():
                setattr(self, name, value)
            if "gate_after_reads" in checked:
                self._passed = 0
            self._changed.notify_all()

    def wait_to_read(self, stopping: threading.Event) -> bool:
        """Wait while the reads are held (hold_until, the gate); True if ``stopping`` was
        set meanwhile (the server is shutting down)."""
        with self._changed:
            while not stopping.is_set():
                held = self.hold_until - time.monotonic()
                gated = self.gate_after_reads is not None and self._passed >= self.gate_after_reads
                if held <= 0 and not gated:
                    self._passed += self.gate_after_reads is not None
                    return False
                self._waiting += 1
                try:
                    # Bounded so a stopping server is noticed: stop() sets an Event, which
                    # cannot wake a Condition.
                    self._changed.wait(min(held, 0.2) if held > 0 else 0.2)
                finally:
                    self._waiting -= 1
            return True

    def reads_at_gate(self) -> int:
        # Under the lock: a waiter's count drops and rises again between two waits.
        with self._lock:
            return self._waiting

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
                self.gate_after_reads,
            )

    def to_dict(self) -> dict:
        now = self.snapshot()
        return {
            "drop_after_bytes": now.drop_after_bytes,
            "drop_on_read": now.drop_on_read,
            "read_latency": now.read_latency,
            "refuse_for_remaining": max(0.0, now.refuse_until - time.monotonic()),
            "hold_for_remaining": max(0.0, now.hold_until - time.monotonic()),
            "gate_after_reads": now.gate_after_reads,
            "reads_at_gate": self.reads_at_gate(),
        }

    def clear(self) -> None:
        self.update(
            drop_after_bytes=None,
            drop_on_read=None,
            read_latency=0.0,
            refuse_until=0.0,
            hold_until=0.0,
            gate_after_reads=None,
        )


def _check(name: str, value: Any) -> Any:
    if name in _INT_OR_NONE:
        if value is None:
            return None
        # bool is an int subclass; True as a byte count is a caller's mistake.
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"fault {name} must be a positive integer or None, not {value!r}")
        return value
    if name in _COUNT_OR_NONE:
        if value is None:
            return None
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"fault {name} must be an integer >= 0 or None, not {value!r}")
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
