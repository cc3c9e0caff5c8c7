"""The command's surface is unchanged unless changed on purpose (tests/golden_cli.py)."""

from __future__ import annotations

import difflib
from pathlib import Path

from golden_cli import surface

GOLDEN = Path(__file__).parent / "golden" / "cli.txt"


def test_help_and_exit_codes_are_the_golden_copy():
    now = surface()
    expected = GOLDEN.read_text()
    diff = "".join(
        difflib.unified_diff(
            expected.splitlines(True), now.splitlines(True), "golden/cli.txt", "now"
        )
    )
    assert now == expected, "the CLI's surface changed:\n" + diff


def test_the_golden_copy_covers_every_command():
    text = GOLDEN.read_text()
    for name in (
        "backup",
        "init",
        "list",
        "restore",
        "restore-vm",
        "verify",
        "repair",
        "prune",
        "copy",
        "serve",
        "forget",
        "files",
        "nbd",
    ):
        assert "$ xencbt %s --help\n" % name in text
    assert "START_FAILED = 7" in text and "INTERRUPTED = 130" in text
