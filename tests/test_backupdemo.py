"""`make demo` (python -m xensim.backupdemo) runs the main job end to end and cleans up."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from secretwatch import WATCH, traced


def test_demo_backs_up_restores_and_cleans_up():
    # A temp dir of its own inside the run's watched TMPDIR (tests/secretwatch.py): every
    # exec of the demo is seen, its simulator's secrets are known, its temp files read.
    tmp_path = Path(tempfile.mkdtemp(prefix="backupdemo-"))
    done = subprocess.run(
        traced([sys.executable, "-m", "xensim.backupdemo"]),
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )
    WATCH.output("python -m xensim.backupdemo", done.stdout, done.stderr)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert out.count("byte-identical to the disk as it was at that backup") == 2
    assert "6 points verified" in out
    # Each xencbt command is shown as run, to be copied; connection settings from the
    # environment, the password only ever from its file.
    assert re.search(r"^    \$ export XENCBT_XAPI=https://\S+ XENCBT_PASSWORD_FILE=\S+$", out, re.M)
    commands = re.findall(r"^    \$ (xencbt .*)$", out, re.M)
    assert len(commands) == 7, commands
    assert any(re.search(r" backup demo-vm --repo \S+$", c) for c in commands), commands
    assert any(" restore-vm --repo " in c for c in commands), commands
    # The full moves the whole VM (84 MiB); incrementals move kilobytes of changes, plus
    # the CBT canary's sample of unchanged blocks (64 x 64 KiB per disk), said apart.
    moved = re.findall(
        r"read from the host's NBD server: ([\d.]+ \w+)(?: \(the changes ([\d.]+ \w+), "
        r"the CBT canary's sample of unchanged blocks ([\d.]+ \w+)\))?$",
        out,
        re.M,
    )
    assert moved[0] == ("84.0 MiB", "", ""), moved
    # (at most 8 MiB: a sampled partial last block is read at its short length)
    assert all(c.endswith(" KiB") for _, c, _ in moved[1:]), moved
    assert all(s.endswith(" MiB") and 7 <= float(s.split()[0]) <= 8 for *_, s in moved[1:])
    # It ends with a whole-VM restore shown next to the original: same VCPUs, memory,
    # vTPM and networks, its own disks and new MACs (the original is still there).
    rows = {
        line.strip().split("  ")[0]: line.split()
        for line in out.splitlines()
        if line.startswith("    demo-vm")
    }
    original, copy = rows["demo-vm"], rows["demo-vm (restored)"]
    assert original[2:6] == copy[3:7] and copy[6] == "yes", (original, copy)
    macs = [re.findall(r"\w\w(?::\w\w){5}", " ".join(r)) for r in (original, copy)]
    assert len(macs[0]) == 2 and not set(macs[0]) & set(macs[1]), macs
    assert list(tmp_path.iterdir()) == []  # temp dir, simulator and sockets all gone
    tmp_path.rmdir()
