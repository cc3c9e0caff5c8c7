"""``python -m xensim.demo`` (``make demo``) runs end to end and cleans up after itself."""

from __future__ import annotations

import os
import subprocess
import sys


def test_demo_reads_back_what_the_guest_wrote(tmp_path):
    env_tmp = {"TMPDIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", "xensim.demo"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env_tmp},
    )
    assert done.returncode == 0, done.stderr
    assert "checksums match: True" in done.stdout
    assert "changed 64 KiB blocks: [16, 17]" in done.stdout
    assert list(tmp_path.iterdir()) == []  # the temp dir (and the simulator) are gone
