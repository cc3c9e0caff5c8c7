"""Secrets (password, session refs, export names): read safely, never printed.

Every secret the process learns is registered here; ``scrub`` replaces any of them in a
text, and ``ScrubFilter`` applies that to every log record, as a last line of defence
behind code that never formats secrets in the first place.
"""

from __future__ import annotations

import logging
import sys
import threading

_lock = threading.Lock()
_known: set[str] = set()
MASK = "***"


class Secret:
    """A string that refuses to show itself in repr/str/format."""

    __slots__ = ("_value",)

    def __init__(self, value: str):
        self._value = value
        register(value)

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret(%s)" % MASK

    __str__ = __repr__

    def __bool__(self) -> bool:
        return bool(self._value)


def register(value: str) -> str:
    """Remember ``value`` as secret (short values are ignored: they would mask too much)."""
    if value and len(value) >= 4:
        with _lock:
            _known.add(value)
    return value


def scrub(text: str) -> str:
    with _lock:
        known = sorted(_known, key=len, reverse=True)
    for value in known:
        if value in text:
            text = text.replace(value, MASK)
    return text


class ScrubFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = scrub(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


def read_password(spec: str, prompt: str = "Password: ") -> Secret:
    """Interpret nbdkit's password conventions: ``+FILE``, ``-`` (ask), or the value."""
    if spec.startswith("+"):
        return Secret(read_file(spec[1:], "password"))
    if spec == "-":
        return Secret(_ask(prompt))
    return Secret(spec)


def read_file(path: str, what: str) -> str:
    """First line of ``path`` without its newline; errors name the file, not the content."""
    from .errors import ConfigError

    try:
        with open(path, encoding="utf-8") as f:
            value = f.readline().rstrip("\r\n")
    except OSError as e:
        raise ConfigError("cannot read the %s file %s: %s" % (what, path, e.strerror)) from None
    if not value:
        raise ConfigError("the %s file %s is empty" % (what, path))
    return value


def _ask(prompt: str) -> str:
    import getpass

    if not sys.stdin.isatty():
        # Piped in (e.g. from a password manager): read one line, no echo to fight.
        return sys.stdin.readline().rstrip("\r\n")
    return getpass.getpass(prompt)
