"""xencbt prune killed with SIGKILL, XENCBT_KILLS times per kill point (issue #5).

Windows: the flattened image being written (``.partial``), the journal just renamed into
place (the swap is next), the kept point's manifest being rewritten (the swap is done),
and a random moment of the whole prune.  After every kill: verify passes without changing
anything (a half-done prune is judged as it will end), every listed point restores
byte-identical, ``xencbt repair`` leaves no journal and no leftover, a second prune
finishes the job, and the next backup succeeds.
"""

from __future__ import annotations

import random
import time

import pytest
from cli_support import Vm, content, restored, xencbt
from crash_support import Aftermath, Inotify, chain_dirs, kill, kills_per_point, scribble, start
from tally import tally

pytestmark = pytest.mark.reliability

KEEP = 1
# Files whose creation (or rename into place) opens each window; "anywhere" has none.
WINDOWS = {
    "flatten": lambda name: name.endswith(".qcow2.partial"),
    "journal": lambda name: name == ".prune.json",
    "manifest": lambda name: name.endswith(".json.tmp") and not name.startswith("."),
    "anywhere": None,
}


@pytest.fixture
def crash(xensim_factory, tmp_path):
    sim = xensim_factory(disk_sizes="2M,1M+512", in_use_wait=0.5)
    after = Aftermath(sim, tmp_path / "repo", Vm(sim), tmp_path)
    for _ in range(KEEP + 1):
        scribble(after.vm)
        after.backup()
    return after


def prune_args(after: Aftermath) -> tuple[str, ...]:
    return ("prune", "--repo", str(after.repo), "--keep", str(KEEP))


@pytest.mark.parametrize("window", list(WINDOWS))
def test_prune_killed(crash: Aftermath, window: str, tmp_path):
    kills = kills_per_point()
    hits = 0
    if WINDOWS[window] is None:  # how long a prune takes, to kill within it
        t0 = time.monotonic()
        xencbt(crash.sim, *prune_args(crash))
        duration = time.monotonic() - t0
        scribble(crash.vm)
        crash.backup()
    for _ in range(kills):
        rows = crash.check_repository()
        assert len({r["point"] for r in rows}) > KEEP  # there is something to prune
        watch = Inotify(*chain_dirs(crash.repo, crash.vm))
        proc = start(crash.sim, *prune_args(crash))
        if WINDOWS[window]:
            seen = watch.wait(WINDOWS[window], proc)
        else:
            time.sleep(random.uniform(0, duration))
            seen = True
        watch.close()
        killed = seen is not None and proc.poll() is None
        if killed:
            assert "Traceback" not in kill(proc)
            hits += 1
        else:
            assert proc.wait() == 0, proc.stderr.read()

        # Read-only verify explains the half-done prune; every listed point restores.
        # (verify re-reads every point whole: each is its recorded, source-equal digest)
        rows = crash.check_repository()
        r = rows[-1]  # and one restore, the newest point of a disk, to be sure
        data = restored(crash.sim, crash.repo, tmp_path, r["vdi_uuid"], r["point"])
        assert content(data) == r["digest"]
        # repair finishes or undoes the prune and removes the rest; then prune again.
        xencbt(crash.sim, "repair", "--repo", str(crash.repo))
        for d in chain_dirs(crash.repo, crash.vm):
            assert sorted(p.name for p in d.iterdir() if p.name.startswith(".")) == [".lock"]
            assert not [p for p in d.iterdir() if p.name.endswith((".partial", ".tmp"))]
        crash.check_repository()
        xencbt(crash.sim, *prune_args(crash))
        rows = crash.check_repository()
        for uuid in crash.vm.uuids:
            assert len([r for r in rows if r["vdi_uuid"] == uuid]) == KEEP
        scribble(crash.vm)
        crash.pending = []
        crash.after_kill()  # the next backup: ok, byte-identical, host clean; one more point
        if killed:
            tally("kills survived")
    print("prune %s: %d of %d runs killed in the window" % (window, hits, kills))
    assert hits >= (kills + 1) // 2, "the window was missed too often: the test proves little"
