"""Private scratch directories (proc/scratch.py): a SIGKILLed run's are removed by the
next run that makes one of the same kind; a live run's, another user's, a symlink and a
directory without its owner lock are not."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from xencbt_cli.proc.scratch import OWNER, private_dir, sweep

HOLDER = """
import sys
from xencbt_cli.proc.scratch import private_dir
with private_dir("xencbt-t-", sys.argv[1]) as d:
    print(d, flush=True)
    sys.stdin.read()
"""


def holder(parent: Path) -> tuple[subprocess.Popen, Path]:
    """A process holding a private directory until its stdin closes; and that directory."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(parent)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)),
    )
    return proc, Path(proc.stdout.readline().strip())


def test_a_killed_runs_directory_goes_a_live_ones_stays(tmp_path):
    killed, dead_dir = holder(tmp_path)
    alive, live_dir = holder(tmp_path)
    (dead_dir / "socket").write_text("left behind")
    killed.kill()
    killed.wait()
    assert dead_dir.is_dir()  # a SIGKILL lets no cleanup run
    with private_dir("xencbt-t-", str(tmp_path)) as mine:
        assert os.stat(mine).st_mode & 0o777 == 0o700
        assert not dead_dir.exists() and live_dir.is_dir()
    assert not Path(mine).exists()
    alive.stdin.close()
    assert alive.wait(60) == 0 and not live_dir.exists()  # removed by its own run


def test_only_this_users_unlocked_directories_are_swept(tmp_path):
    def leftover(name: str) -> Path:
        d = tmp_path / name
        d.mkdir(mode=0o700)
        (d / OWNER).touch()
        return d

    others = leftover("xencbt-t-other")
    if os.geteuid() == 0:
        os.chown(others, 65534, 65534)  # nobody's: only root can give it away
    target = leftover("elsewhere")
    (tmp_path / "xencbt-t-link").symlink_to(target)
    unlocked = tmp_path / "xencbt-t-new"  # its maker is between mkdtemp and the lock
    unlocked.mkdir()
    dead = leftover("xencbt-t-dead")
    other_prefix = leftover("xencbt-u-dead")
    root = os.geteuid() == 0
    swept = sorted(map(str, [dead] if root else [dead, others]))
    assert sorted(sweep(str(tmp_path), "xencbt-t-")) == swept
    assert others.is_dir() == root
    assert target.is_dir() and unlocked.is_dir() and other_prefix.is_dir()
