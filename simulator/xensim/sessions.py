"""Logged-in API sessions. Kept in memory only: a restart invalidates them, as in xapi.

How many a pool keeps follows xen-api ocaml/xapi/db_gc_util.ml ``timeout_sessions``:
root's sessions are grouped by originator, and a group over
``max_sessions_per_originator`` (500, xapi_globs.ml) loses its least recently active
sessions: of those without a pending task, the ``max_sessions_per_originator`` most
recently active stay; sessions with no originator share the
anonymous limit ``max_sessions`` (2 × max_tasks = 400).  xapi runs that in its periodic
database GC; xensim runs it after each login, so the limit holds at every moment.
"""

from __future__ import annotations

import threading
import time
import uuid as uuidlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from .database import new_ref
from .errors import session_invalid


@dataclass
class ApiSession:
    ref: str
    host: str
    user: str
    originator: str
    uuid: str = field(default_factory=lambda: str(uuidlib.uuid4()))
    last_active: float = field(default_factory=time.monotonic)


MAX_PER_ORIGINATOR = 500
MAX_ANONYMOUS = 400


class Sessions:
    def __init__(self, idle_timeout: float) -> None:
        self.idle_timeout = idle_timeout
        self._live: dict[str, ApiSession] = {}
        self._lock = threading.Lock()
        self.logins: Counter[str] = Counter()  # by originator, for the control API

    def login(self, host: str, user: str, originator: str) -> ApiSession:
        session = ApiSession(new_ref(), host, user, originator)
        with self._lock:
            self._live[session.ref] = session
            self.logins[originator] += 1
        return session

    def limit(self, originator: str, busy: Callable[[str], bool]) -> int:
        """Destroy the least recently active sessions of ``originator`` over its limit,
        sparing those ``busy`` says have a pending task; returns how many went."""
        cap = MAX_PER_ORIGINATOR if originator else MAX_ANONYMOUS
        with self._lock:
            group = [s for s in self._live.values() if s.originator == originator]
        if len(group) <= cap:
            return 0
        disposable = sorted((s for s in group if not busy(s.ref)), key=lambda s: s.last_active)
        doomed = disposable[: max(0, len(disposable) - cap)]  # busy ones do not count
        with self._lock:
            for session in doomed:
                self._live.pop(session.ref, None)
        return len(doomed)

    def check(self, ref: object) -> ApiSession:
        """The live session for ``ref`` (its idle clock restarts), else SESSION_INVALID."""
        with self._lock:
            session = self._live.get(ref) if isinstance(ref, str) else None
            now = time.monotonic()
            if session and now - session.last_active > self.idle_timeout:
                del self._live[session.ref]
                session = None
            if session is None:
                raise session_invalid(str(ref))
            session.last_active = now
            return session

    def is_live(self, ref: str) -> bool:
        try:
            self.check(ref)
        except Exception:
            return False
        return True

    def logout(self, ref: str) -> None:
        with self._lock:
            self._live.pop(ref, None)

    def invalidate(self, ref: str | None = None) -> int:
        """Drop one session (or all); returns how many were dropped."""
        with self._lock:
            if ref is None:
                count = len(self._live)
                self._live.clear()
                return count
            return 1 if self._live.pop(ref, None) else 0
