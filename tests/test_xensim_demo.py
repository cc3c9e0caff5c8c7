"""``python -m xensim.demo`` (the simulator alone; ``make demo`` runs xensim/backupdemo.py)
runs end to end and cleans up after itself."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from secretwatch import WATCH, traced


def test_demo_reads_back_what_the_guest_wrote():
    # A temp dir of its own inside the run's watched TMPDIR (tests/secretwatch.py): every
    # exec of the demo is seen, its simulator's secrets are known, its temp files read.
    tmp_path = Path(tempfile.mkdtemp(prefix="demo-"))
    done = subprocess.run(
        traced([sys.executable, "-m", "xensim.demo"]),
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )
    WATCH.output("python -m xensim.demo", done.stdout, done.stderr)
    assert done.returncode == 0, done.stderr
    assert "checksums match: True" in done.stdout
    assert "changed 64 KiB blocks: [16, 17]" in done.stdout
    assert list(tmp_path.iterdir()) == []  # the temp dir (and the simulator) are gone
    tmp_path.rmdir()
