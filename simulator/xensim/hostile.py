"""Reliability knobs (issue #5), kept apart from the NBD faults in ``faults.py``.

What a hostile or broken host can do to a client at the API level, and what a test needs
to know to prove that no secret leaked:

- ``ApiFaults.bitmap``: corrupt every ``VDI.list_changed_blocks`` answer, as a host with
  damaged CBT metadata (or something in between) might: ``garbage`` (not base64),
  ``short`` (one byte missing), ``long`` (one byte too many).
- ``Credentials``: the root password XAPI logins accept (changeable, as ``xe
  user-password-change`` does; the control API keeps the original) and every session ref
  ever issued, so a test can search logs and process lists for exactly those strings.
  With ``XENSIM_SECRETS_LOG`` set, each is also appended to that file as it is issued: the
  tests' secret watch then knows those of simulators it did not start (the demos').  This
  is test plumbing, not xapi behaviour: xapi keeps no such record.
"""

from __future__ import annotations

import base64
import json
import os
import threading
from dataclasses import dataclass, field

BITMAP_MODES = ("garbage", "short", "long")


@dataclass
class ApiFaults:
    bitmap: str | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def set_bitmap(self, mode: str | None) -> None:
        if mode is not None and mode not in BITMAP_MODES:
            raise ValueError(f"bitmap fault must be one of {', '.join(BITMAP_MODES)} or null")
        with self._lock:
            self.bitmap = mode

    def corrupt(self, encoded: str) -> str:
        """The bitmap as the faulty host would send it."""
        with self._lock:
            mode = self.bitmap
        if mode is None:
            return encoded
        if mode == "garbage":
            return "%%not*base64%%" + encoded[:8]
        data = base64.b64decode(encoded)
        data = data[:-1] if mode == "short" else data + b"\xff"
        return base64.b64encode(data).decode("ascii")

    def to_dict(self) -> dict:
        with self._lock:
            return {"bitmap": self.bitmap}


def record(secret: str) -> None:
    """Append ``secret`` to $XENSIM_SECRETS_LOG (a private file), when it is set."""
    path = os.environ.get("XENSIM_SECRETS_LOG")
    if not path:
        return
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "a") as f:
        f.write(json.dumps({"secret": secret}) + "\n")


class Credentials:
    def __init__(self, password: str) -> None:
        self.password = password
        self._passwords = [password]
        self._issued: list[str] = []
        self._lock = threading.Lock()
        record(password)

    def accepts(self, password: object) -> bool:
        with self._lock:
            return password == self.password

    def change(self, password: str) -> None:
        if not isinstance(password, str) or len(password) < 8:
            raise ValueError("the new password must be a string of 8 characters or more")
        with self._lock:
            self.password = password
            self._passwords.append(password)
        record(password)

    def issued(self, ref: str) -> None:
        with self._lock:
            self._issued.append(ref)
        record(ref)

    def secrets(self) -> dict:
        with self._lock:
            return {"passwords": list(self._passwords), "sessions": list(self._issued)}
