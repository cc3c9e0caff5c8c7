"""How sizes and counts are written for people, the same in every command's output."""

from __future__ import annotations


def human(n: int) -> str:
    """A size rounded to one decimal of its unit: ``1.5 GiB`` (reports, progress)."""
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return ("%d %s" if unit == "bytes" else "%.1f %s") % (n, unit)
        n /= 1024
    return str(n)


def exact(n: int) -> str:
    """A size in the largest unit that states it exactly: ``65 KiB`` but ``66561 bytes``
    (offsets and lengths of damaged ranges, where rounding would mislead)."""
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or n % 1024:
            return "%d %s" % (n, unit)
        n //= 1024
    return "%d TiB" % n


def several(n: int, word: str) -> str:
    """``1 point``, ``3 points``."""
    return "%d %s%s" % (n, word, "" if n == 1 else "s")
