"""`make demo` (python -m xensim.backupdemo) runs the main job end to end and cleans up."""

from __future__ import annotations

import os
import re
import subprocess
import sys


def test_demo_backs_up_restores_and_cleans_up(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "xensim.backupdemo"],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert out.count("byte-identical to the disk as it was at that backup") == 2
    assert "6 points verified" in out
    # Incrementals move kilobytes, the full moves the whole VM (84 MiB).
    moved = re.findall(r"read from the host's NBD server: ([\d.]+ \w+)", out)
    assert moved[0] == "84.0 MiB" and all(m.endswith("KiB") for m in moved[1:]), moved
    assert list(tmp_path.iterdir()) == []  # temp dir, simulator and sockets all gone
