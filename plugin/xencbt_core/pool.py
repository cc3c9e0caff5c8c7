"""A pool of upstream connections with retries: the data path the plugin reads through.

Connections are opened lazily and strictly one after another (each one plugs a VBD in
dom0 on a real host), up to ``size``.  A read that loses its connection is retried on a
fresh one after a pause that doubles (1 s, 2 s, 4 s, 8 s…) until ``retry_timeout``.  An
export name the server refuses means the session died: the source is asked to refresh
(log in again, call get_nbd_info again) before reconnecting.  When the host closes a new
connection while we already hold others, it is most likely at its 16-connection limit:
the pool shrinks to what it has and carries on.

Each connection also holds one of the machine's 16 slots for its host (slots.py), so the
host's limit holds across every xencbt process and plugin instance on this machine: with
no slot free, a pool that has connections carries on with those, and one that has none
waits for a slot.  A connection closed politely keeps its slot until the host has closed
its end (after unplugging the connection's VBD), up to ``LINGER`` seconds.

Under ``vm=`` every disk has a pool and they share one connection budget (budget.py): a
pool opens a connection only with a unit of it, yields connections beyond its share to a
starving pool, and reclaims another pool's idle ones when it has waited.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Protocol

from .budget import Budget
from .errors import (
    ConnectionDead,
    ExportRefused,
    PayloadCut,
    ProtocolError,
    RequestFailed,
    RetriesExhausted,
    Unreachable,
    UpstreamError,
)
from .nbdproto import SECTOR
from .slots import Slot, Slots, host_key
from .trust import Expectation
from .upstream import MAX_REQUEST, Connection, Target, preference

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 16  # the host's limit (REFERENCE §2)
LINGER = 30.0  # at most, for the host to close a connection we ended (16 VBDs x ~2 s)
LINGER_ENV = "XENCBT_LINGER"  # seconds, to change LINGER (0: do not wait)
SLOT_WAIT_MAX = 1.0  # seconds between looks for a free slot


class NoSlot(ConnectionDead):
    """Every slot of the host is held by this machine's other connections."""


class TargetSource(Protocol):
    def targets(self) -> list[Target]: ...

    def refresh(self) -> list[Target]: ...


class Pool:
    def __init__(
        self,
        source: TargetSource,
        expectation: Callable[[Target], Expectation | None],
        size: int = 4,
        timeout: float = 60.0,
        retry_timeout: float = 60.0,
        slots: Slots | None = None,
        budget: Budget | None = None,
    ):
        if not 1 <= size <= MAX_CONNECTIONS:
            raise ValueError("connections must be 1..%d" % MAX_CONNECTIONS)
        self.source = source
        self.expectation = expectation
        self.timeout = timeout
        self.retry_timeout = retry_timeout
        self.size: int | None = None  # the export's size, from the first handshake
        self.reconnects = 0
        self._limit = size
        self._live = 0
        self._idle: list[Connection] = []
        self._waiting = 0  # threads blocked in _wakeups.get()
        self._wakeups: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._open_lock = threading.Lock()
        self._preferred = 0
        self._closed = False
        self.slots = slots or Slots()
        self.linger = linger()
        self._held: dict[int, Slot] = {}  # id(connection) -> its slot
        # Shared with the other disks' pools under vm=; else this pool's own.
        self._budget = budget or Budget(size, patience=None)
        self._budget.join(self)

    def start(self) -> int:
        """Open the first connection now, so that every setup error shows at start-up.

        Connection failures are retried like reads: a network whose NBD purpose was just
        set refuses connections for ten seconds or more (seed 001).
        """
        deadline = time.monotonic() + self.retry_timeout
        delay = 1.0
        while True:
            try:
                conn = self._acquire()
                break
            except ConnectionDead as e:
                delay = self._backoff(e, delay, deadline)
        self._release(conn, healthy=True)
        assert self.size is not None
        return self.size

    def pread(self, buf: memoryview, offset: int) -> None:
        """Fill ``buf`` from ``offset``; unaligned requests are widened to 512 bytes."""
        end = offset + len(buf)
        lo, hi = offset - offset % SECTOR, -(-end // SECTOR) * SECTOR
        if lo == offset and hi == end:
            self._read_aligned(buf, offset)
            return
        tmp = bytearray(hi - lo)
        self._read_aligned(memoryview(tmp), lo)
        buf[:] = memoryview(tmp)[offset - lo : offset - lo + len(buf)]

    def _read_aligned(self, view: memoryview, offset: int) -> None:
        for pos in range(0, len(view), MAX_REQUEST):
            self._read_chunk(view[pos : pos + MAX_REQUEST], offset + pos)

    def _read_chunk(self, view: memoryview, offset: int) -> None:
        deadline = time.monotonic() + self.retry_timeout
        delay = 1.0
        while True:
            try:
                conn = self._acquire()
            except ConnectionDead as e:
                delay = self._backoff(e, delay, deadline)
                continue
            try:
                conn.pread_into(view, offset)
            except RequestFailed:
                # The host's server stops serving a connection once it has sent an error
                # reply (nbd lib/server.ml ``serve``): never lend this one out again.
                self._release(conn, healthy=False, polite=False)
                raise
            except PayloadCut as e:
                # Keep the whole sectors that arrived; ask only for the rest, so a link
                # that drops every few MiB still makes progress with 2 MiB requests.
                self._release(conn, healthy=False)
                keep = e.received - e.received % SECTOR
                view, offset = view[keep:], offset + keep
                delay = self._backoff(e, delay, deadline)
                continue
            except (ConnectionDead, ProtocolError) as e:
                self._release(conn, healthy=False)
                delay = self._backoff(e, delay, deadline)
                continue
            except BaseException:
                self._release(conn, healthy=False)
                raise
            self._release(conn, healthy=True)
            return

    def _backoff(self, error: UpstreamError, delay: float, deadline: float) -> float:
        if time.monotonic() + delay > deadline:
            raise RetriesExhausted(
                "giving up on the NBD server after retrying for %.0f s: %s"
                % (self.retry_timeout, error)
            ) from error
        log.warning("%s; reconnecting in %.0f s", error, delay)
        self.reconnects += 1
        time.sleep(delay)
        return min(delay * 2, 8.0)

    def _acquire(self) -> Connection:
        """The most recently used idle connection, or a new one if a slot is free; else
        wait until either.

        Waiters sleep on a SimpleQueue that ``_release`` drops a token into after letting
        go of the lock: a hand-off in C with one wake-up.  (A Condition took a lock per
        wait and woke each waiter twice; profiling showed that dominating the GIL.)
        Last in, first out: a warm connection answers small reads ~30 % sooner.
        """
        starving = False
        while True:
            with self._lock:
                if self._closed:
                    raise UpstreamError("the connection pool is closed")
                if self._idle:
                    if starving:
                        self._budget.fed(self)
                    return self._idle.pop()
                if self._live < self._limit:
                    starving = not self._budget.take(self)
                    if not starving:
                        self._live += 1
                        break
                self._waiting += 1
            if starving:
                self._budget.reclaim(self)
            self._wait()
        try:
            return self._open()
        except BaseException as e:
            with self._lock:
                self._live -= 1
                shrink = isinstance(e, ConnectionDead) and self._live > 0
                if shrink:
                    self._shrink(e)
            self._budget.give(self)
            self._wake()
            if shrink:
                return self._acquire()  # one of the live connections, when it is free
            if isinstance(e, ConnectionDead) and self._budget.reclaim(self):
                # The host may be at its limit because another disk of this nbdkit keeps
                # an idle connection: that one was just closed; try again.
                return self._acquire()
            raise

    def _shrink(self, error: Exception) -> None:
        # Called with self._lock held.
        log.warning(
            "the host refused connection %d (%s); continuing with %d connection(s) — "
            "it may be serving other clients up to its limit of %d",
            self._live + 1,
            error,
            self._live,
            MAX_CONNECTIONS,
        )
        self._limit = self._live

    def _release(self, conn: Connection, healthy: bool, polite: bool | None = None) -> None:
        with self._lock:
            yielding = healthy and not self._closed and self._budget.should_yield(self)
            keep = healthy and not self._closed and not yielding
            if keep:
                self._idle.append(conn)
            else:
                self._live -= 1
        if not keep:
            self._retire(conn, polite=healthy if polite is None else polite)
            self._budget.give(self)
        self._wake()

    def _wait(self) -> None:
        """Until woken; with a shared budget, at most its patience, then look again."""
        try:
            self._wakeups.get(timeout=self._budget.patience)
        except queue.Empty:
            with self._lock:
                self._waiting = max(0, self._waiting - 1)

    def wake(self) -> None:
        """The shared budget has room again: let a waiter try."""
        self._wake()

    def drop_idle(self) -> bool:
        """Close the coldest idle connection for another pool of the budget (politely:
        the host counts it until it has closed its end)."""
        with self._lock:
            if not self._idle:
                return False
            conn = self._idle.pop(0)
            self._live -= 1
        self._retire(conn, polite=True)
        self._budget.give(self)
        return True

    def _retire(self, conn: Connection, polite: bool) -> None:
        conn.close(polite=polite, linger=self.linger if polite else 0.0)
        with self._lock:
            slot = self._held.pop(id(conn), None)
        if slot is not None:
            slot.release()

    def _wake(self, everyone: bool = False) -> None:
        """Wake one waiter (all, when closing), outside the lock so it can take it."""
        with self._lock:
            n = self._waiting if everyone else min(self._waiting, 1)
            self._waiting -= n
        for _ in range(n):
            self._wakeups.put(None)

    def _open(self) -> Connection:
        with self._open_lock:
            try:
                return self._open_any(self.source.targets())
            except ExportRefused as e:
                log.info("%s; refreshing the session and NBD info", e)
                return self._open_any(self.source.refresh())

    def _open_any(self, targets: list[Target]) -> Connection:
        """A connection to one of the export's addresses.  When this machine holds every
        slot of their hosts, a pool with connections carries on with those (NoSlot); one
        without any waits for a slot."""
        warned = False
        while True:
            try:
                return self._try_targets(targets)
            except NoSlot as e:
                with self._lock:
                    if self._live > 1 or self._closed:  # _acquire counted this attempt
                        raise
                if not warned:
                    log.warning("%s; waiting for another xencbt process to finish", e)
                    warned = True
                self._wait_for_slot(targets)

    def _try_targets(self, targets: list[Target]) -> Connection:
        """Try the export's addresses, IPv4 first, the one that last worked first among
        its kind.  Once a server answered on IPv4 (busy at its 16 connections, say), the
        IPv6 addresses are not tried: xapi-nbd listens on IPv4 only, and a dead address
        costs a connect timeout.  Each attempt holds one of this machine's slots for the
        host (slots.py)."""
        errors, busy = [], 0
        order = sorted(
            range(len(targets)), key=lambda i: (preference(targets[i]), i != self._preferred)
        )
        answered = False
        for i in order:
            if answered and preference(targets[i]) > 0:
                break
            slot = self.slots.try_take(_key(targets[i]))
            if slot is None:
                busy += 1
                continue
            try:
                conn = Connection.open(targets[i], self.expectation(targets[i]), self.timeout)
            except BaseException as e:
                slot.release()
                if not isinstance(e, ConnectionDead):
                    raise
                errors.append(str(e))
                answered = answered or not isinstance(e, Unreachable)
                continue
            with self._lock:
                self._held[id(conn)] = slot
            try:
                self._check_size(conn)
            except BaseException:
                self._retire(conn, polite=False)
                raise
            self._preferred = i
            return conn
        if busy and not errors:
            raise NoSlot(
                "all %d NBD connection slots of the host(s) of %s are in use on this machine"
                % (self.slots.per_host, ", ".join(str(t) for t in targets))
            )
        raise ConnectionDead("; ".join(errors) or "no NBD address to connect to")

    def _wait_for_slot(self, targets: list[Target]) -> None:
        """Until one of the hosts has a free slot (then try again: it may be taken)."""
        pause = 0.05
        while True:
            for target in targets:
                slot = self.slots.try_take(_key(target))
                if slot is not None:
                    slot.release()
                    return
            with self._lock:
                if self._closed:
                    raise UpstreamError("the connection pool is closed")
            time.sleep(pause)
            pause = min(pause * 2, SLOT_WAIT_MAX)

    def _check_size(self, conn: Connection) -> None:
        if self.size is None:
            self.size = conn.size
        elif conn.size != self.size:
            conn.close()
            raise ProtocolError(
                "the export's size changed from %d to %d between connections"
                % (self.size, conn.size)
            )

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
            self._live -= len(idle)
        self._wake(everyone=True)
        for conn in idle:
            self._retire(conn, polite=True)
            self._budget.give(self)


def linger() -> float:
    text = os.environ.get(LINGER_ENV, "")
    try:
        value = float(text) if text else LINGER
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        log.warning("%s=%r is not a number of seconds; using %g", LINGER_ENV, text, LINGER)
        return LINGER
    return value


def _key(target: Target) -> str:
    return host_key(target.cert, target.address, target.port)
