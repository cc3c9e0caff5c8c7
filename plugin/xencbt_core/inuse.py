"""Retrying the calls a host refuses with ``VDI_IN_USE`` while it tears down NBD VBDs.

Every NBD connection plugs a VBD in dom0; after the client disconnects, xapi-nbd unplugs
and destroys it in the background, one VBD after another, about a second each (xen-api
``ocaml/nbd/src/cleanup.ml``).  Until then ``VDI.data_destroy`` waits ~4 s and fails
``VDI_IN_USE``, and ``VDI.destroy`` / ``VDI.list_changed_blocks`` fail at once
(``ocaml/xapi/xapi_vdi.ml``).  Right after a copy with 16 connections that lasts up to
~20 s, so these calls are tried again with a growing pause, for ``timeout`` seconds at most.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from .errors import XapiError

log = logging.getLogger(__name__)

IN_USE = "VDI_IN_USE"
TIMEOUT = 30.0  # seconds of pauses, on top of the host's own waits (~4 s per data_destroy)


def delays(timeout: float) -> tuple[float, ...]:
    """Pauses of 0.5 s, 1 s, 2 s, 4 s, then 8 s each, until they add up to ``timeout``."""
    out: list[float] = []
    step = 0.5
    while sum(out) < timeout:
        out.append(min(step, timeout - sum(out)))
        step = min(step * 2, 8.0)
    return tuple(out)


class InUseRetry:
    """Calls ``call(method, *args)`` until it stops failing with VDI_IN_USE, pausing
    ``delays(timeout)`` in between; counts every retry (shared by threads)."""

    def __init__(
        self,
        call: Callable[..., Any],
        timeout: float = TIMEOUT,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self._call = call
        self.timeout = timeout
        self.delays = delays(timeout)
        self._sleep = sleep
        self._lock = threading.Lock()
        self._retries = 0
        self._mine = threading.local()  # per thread: a backup runs each VM in one thread

    @property
    def retries(self) -> int:
        """Retries taken so far, by every thread."""
        with self._lock:
            return self._retries

    @property
    def retries_here(self) -> int:
        """Retries taken so far by the calling thread."""
        return getattr(self._mine, "count", 0)

    def __call__(self, method: str, *args: Any) -> Any:
        for delay in (*self.delays, None):
            try:
                return self._call(method, *args)
            except XapiError as e:
                if e.code != IN_USE or delay is None:
                    raise
                with self._lock:
                    self._retries += 1
                self._mine.count = self.retries_here + 1
                log.info("%s: VDI in use (dom0 still holds a VBD); again in %g s", method, delay)
                self._sleep(delay)
        raise AssertionError("the loop above returns or raises")
