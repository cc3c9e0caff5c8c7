"""Logging of the xencbt command: one line per message on stderr, secrets scrubbed."""

from __future__ import annotations

import logging
import sys

from xencbt_core.secret import ScrubFilter


class StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time: while progress lines are drawn,
    that is rich's proxy, which prints the message above them instead of through them."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def configure(verbose: int) -> None:
    handler = StderrHandler()
    handler.addFilter(ScrubFilter())
    handler.setFormatter(logging.Formatter("xencbt: %(levelname)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING
    for name in ("xencbt_cli", "xencbt_core"):
        logging.getLogger(name).setLevel(level)
