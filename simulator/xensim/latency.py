"""Reply latency per API method: widens the window between a call's effect and its reply.

Not part of XenServer: crash tests set e.g. ``{"VM.snapshot": 1.0}`` so that the snapshot
exists on the "host" for a second before the client hears of it, which is the window in
which a killed client leaves a snapshot it never learned about.  The call runs (and its
effect is saved) first; the pause comes after, outside the database lock, so every other
call carries on meanwhile.
"""

from __future__ import annotations

import threading
import time


class ApiLatency:
    def __init__(self) -> None:
        self._delays: dict[str, float] = {}
        self._lock = threading.Lock()

    def set(self, delays: dict) -> dict:
        """Replace the table: method name (e.g. ``VM.snapshot``) -> seconds; {} clears."""
        checked = {}
        for method, seconds in delays.items():
            if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or seconds < 0:
                raise ValueError(f"latency of {method} must be seconds >= 0, not {seconds!r}")
            checked[str(method)] = float(seconds)
        with self._lock:
            self._delays = checked
        return self.to_dict()

    def to_dict(self) -> dict:
        with self._lock:
            return dict(self._delays)

    def pause(self, method: str) -> None:
        with self._lock:
            delay = self._delays.get(method, 0.0)
        if delay:
            time.sleep(delay)
