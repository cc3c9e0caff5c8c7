"""Helpers (no tests) for encrypted repositories (#15): key files as README says to make
them, registered with the secret watch; ``xencbt init --encrypt``; guest data carrying a
marker, and the search of a repository's bytes for it."""

from __future__ import annotations

import base64
import os
from pathlib import Path

from cli_support import rand, xencbt
from secretwatch import WATCH

MARKER = b"XENCBT-MARKER-the-guest-wrote-this-7f3a9c"


def make_key(path: Path) -> Path:
    """A key file as README says to make one (openssl rand -base64 48), registered with
    the secret watch: argv, environment, logs and outputs are checked for it."""
    text = base64.b64encode(os.urandom(48)).decode() + "\n"
    path.write_text(text)
    path.chmod(0o600)
    WATCH.register(text.strip())
    return path


def marked(n: int) -> bytes:
    """``n`` bytes of guest data holding the marker, the rest random."""
    return (MARKER + rand(n))[:n]


def tree_bytes(root: Path) -> dict[str, tuple[int, bytes]]:
    """Every file under ``root``: relative path -> (mode, bytes)."""
    return {
        str(p.relative_to(root)): (p.stat().st_mode, p.read_bytes())
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def assert_marker_nowhere(root: Path) -> int:
    files = tree_bytes(root)
    for name, (_, data) in files.items():
        assert MARKER not in data, "the guest's marker is in clear in %s" % name
        assert MARKER.hex().encode() not in data, name
    return len(files)


def init_encrypted(sim, repo: Path, key: Path) -> None:
    r = xencbt(sim, "--key-file", str(key), "init", "--repo", str(repo), "--encrypt")
    assert "compression none, encryption luks" in r.stderr
    conf = (repo / "repository.conf").read_text()
    assert "encryption = luks" in conf and "key_check = " in conf
    assert key.read_text().strip() not in conf
