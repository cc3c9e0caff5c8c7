"""xencbt prune killed with SIGKILL, XENCBT_KILLS confirmed kills per window (issue #5, #18).

Windows: the flattened image being written (``.partial``, no journal yet), the journal just
renamed into place (the swap is next: the ``.partial`` is still there), the kept point's
manifest being rewritten (its temp file exists: the swap is done), and a random moment of
the whole prune.  The run is stopped when the trigger fires and killed only if the window
still holds (crash_support.Kills); the product's XENCBT_TEST_PAUSE holds the journal
(write-done) and the temp files of the journal and the manifest (write-tmp) open.  After
every run: verify passes without changing anything (a half-done prune is judged as it
will end), every listed point restores byte-identical, ``xencbt repair`` leaves no
journal and no leftover, a second prune finishes the job, and the next backup succeeds.
Encrypted (two windows): the same, on a repository of qcow2 LUKS images whose flattened
and rebased images are created encrypted, then written into; none is left in clear.
"""

from __future__ import annotations

import random
import time

import pytest
from cli_support import Vm, content, restored, xencbt
from crash_support import Aftermath, Inotify, Kills, chain_dirs, kill_if, scribble, start
from encrypt_support import init_encrypted, make_key
from qemu_images import image_info
from tally import tally

pytestmark = pytest.mark.reliability

KEEP = 1
JOURNAL = ".prune.json"


def flattening(dirs) -> bool:
    return any(list(d.glob("*.qcow2.partial")) and not (d / JOURNAL).exists() for d in dirs)


def journal_before_swap(dirs) -> bool:
    return any((d / JOURNAL).exists() and list(d.glob("*.qcow2.partial")) for d in dirs)


def manifest_rewritten(dirs) -> bool:
    return any(p for d in dirs for p in d.glob("*.json.tmp") if not p.name.startswith("."))


# window: (name of the file whose creation or rename opens it, confirmation, pause)
WINDOWS = {
    # (write-tmp also holds the journal's temp file: the partial is done, not journaled)
    "flatten": (lambda name: name.endswith(".qcow2.partial"), flattening, "write-tmp=0.3"),
    "journal": (lambda name: name == JOURNAL, journal_before_swap, "write-done=0.3"),
    "manifest": (
        lambda name: name.endswith(".json.tmp") and not name.startswith("."),
        manifest_rewritten,
        "write-tmp=0.3",
    ),
    "anywhere": (None, lambda dirs: True, ""),
}
CASES = [(w, False) for w in WINDOWS] + [("flatten", True), ("anywhere", True)]


@pytest.fixture
def crash(xensim_factory, tmp_path, monkeypatch, encrypted: bool):
    sim = xensim_factory(disk_sizes="2M,1M+512", in_use_wait=0.5)
    if encrypted:  # every command of the test finds the key as XENCBT_KEY_FILE
        key = make_key(tmp_path / "repo.key")
        init_encrypted(sim, tmp_path / "repo", key)
        monkeypatch.setenv("XENCBT_KEY_FILE", str(key))
    after = Aftermath(sim, tmp_path / "repo", Vm(sim), tmp_path)
    for _ in range(KEEP + 1):
        scribble(after.vm)
        after.backup()
    return after


def prune_args(after: Aftermath) -> tuple[str, ...]:
    return ("prune", "--repo", str(after.repo), "--keep", str(KEEP))


@pytest.mark.parametrize("window,encrypted", CASES)
def test_prune_killed(crash: Aftermath, window: str, encrypted: bool, tmp_path):
    opens, holds, pause = WINDOWS[window]
    dirs = chain_dirs(crash.repo, crash.vm)
    if opens is None:  # how long a prune takes, to kill within it
        t0 = time.monotonic()
        xencbt(crash.sim, *prune_args(crash))
        duration = time.monotonic() - t0
        scribble(crash.vm)
        crash.backup()
    kills = Kills("prune " + window + (" (encrypted)" if encrypted else ""))
    for _ in kills:
        rows = crash.check_repository()
        assert len({r["point"] for r in rows}) > KEEP  # there is something to prune
        watch = Inotify(*dirs)
        proc = start(crash.sim, *prune_args(crash), pause=pause)
        if opens:
            seen = watch.wait(opens, proc)
        else:
            time.sleep(random.uniform(0, duration))
            seen = True
        watch.close()
        killed = kill_if(proc, lambda: holds(dirs)) if seen else kill_if(proc, lambda: False)
        kills.count(killed)

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
        images = [p for d in chain_dirs(crash.repo, crash.vm) for p in d.glob("*.qcow2")]
        assert images and all(image_info(p).get("encrypted", False) is encrypted for p in images)
    kills.done()
