"""xencbt backup killed with SIGKILL at each of its windows, again and again (issue #5, #18).

Each kill point is hit deterministically (its trigger is observed: the snapshot VM on the
host, a ``.partial`` image, a sums or a manifest temp file, the snapshot VM gone while its VDIs
still hold data), then, after a random delay inside the window, the run is stopped and
killed only if the window still holds (crash_support: confirmed kills), until
XENCBT_KILLS kills per window are confirmed (default crash_support.KILLS_DEFAULT, 2).
Short windows are held open: API latency in the simulator, read latency for the copy, the
product's XENCBT_TEST_PAUSE (write-tmp) for the sums' and manifest's temp files.
"anywhere" kills at a random moment of a whole run.  After every run: verify passes
without changing anything, no half-written point is listed, the next backup succeeds,
byte-identical to the source VDIs, and leaves no snapshot of ours on the host beyond the
CBT bases the repository needs.
"""

from __future__ import annotations

import random
import time

import pytest
from cli_support import Vm
from crash_support import (
    Aftermath,
    Inotify,
    Kills,
    chain_dirs,
    files,
    kill_if,
    scribble,
    start,
    wait_until,
)
from tally import tally

pytestmark = pytest.mark.reliability

WINDOW = 0.6  # seconds of API latency that hold a window open


@pytest.fixture
def crash(xensim_factory, tmp_path):
    sim = xensim_factory(disk_sizes="2M,1M+512", in_use_wait=0.5)
    vm = Vm(sim)
    after = Aftermath(sim, tmp_path / "repo", vm, tmp_path)
    scribble(vm)
    after.backup()  # the first point; every kill below hits an incremental
    return after


def snapshot_vm_appears(after: Aftermath, proc, watch: Inotify, duration: float):
    """The snapshot exists on the host but its reply is held back (WINDOW of API latency):
    the run does not know it (it is found again by its name).  Confirmed while the reply
    cannot have left yet: the call took effect after the last poll that did not see it."""
    x = after.vm.x
    deadline = unseen = time.monotonic()
    deadline += 60
    while True:
        asked = time.monotonic()
        if x.VM.get_snapshots(after.vm.ref):
            break
        if proc.poll() is not None:
            return None
        assert asked < deadline, "no snapshot VM within 60 s"
        time.sleep(0.005)
        unseen = asked
    time.sleep(random.uniform(0, WINDOW / 2))
    return lambda: time.monotonic() < unseen + WINDOW and x.VM.get_snapshots(after.vm.ref)


def copying(after: Aftermath, proc, watch: Inotify, duration: float):
    """Mid-copy: the image is being written as .partial (reads are slowed); a stopped
    run cannot rename it."""
    if watch.wait(lambda name: name.endswith(".qcow2.partial"), proc) is None:
        return None
    time.sleep(random.uniform(0, 0.1))
    return lambda: files(after.repo, after.vm, ".partial")


def temp_file(suffix: str):
    def created(after: Aftermath, proc, watch: Inotify, duration: float):
        nth = random.randrange(2)
        for _ in range(nth + 1):
            if watch.wait(lambda name: name.endswith(suffix), proc) is None:
                return None
        return lambda: files(after.repo, after.vm, suffix)

    return created


# The sums' temp file was just created (one of the two disks', at random): the image is
# renamed, neither its sums nor its manifest in place.
sums_write = temp_file(".sums.tmp")
# The manifest's temp file was just created: the image and its sums are in place, the
# manifest not yet.
manifest_write = temp_file(".json.tmp")


def data_destroy(after: Aftermath, proc, watch: Inotify, duration: float):
    """The snapshot VM is destroyed; its VDIs still hold a full copy until data_destroy
    (or destroy, for the old base) is done.  Confirmed while the host is not yet in its
    final state (one cbt_metadata snapshot per disk)."""
    x = after.vm.x
    if wait_until(lambda: x.VM.get_snapshots(after.vm.ref), proc) is None:
        return None
    if wait_until(lambda: not x.VM.get_snapshots(after.vm.ref), proc) is None:
        return None
    time.sleep(random.uniform(0, 2 * WINDOW))

    def unfinished() -> bool:
        snaps = [
            rec["type"]
            for rec in x.VDI.get_all_records().values()
            if rec["is_a_snapshot"] and rec["snapshot_of"] in after.vm.vdis
        ]
        return snaps != ["cbt_metadata"] * len(after.vm.vdis)

    return unfinished


def anywhere(after: Aftermath, proc, watch: Inotify, duration: float):
    time.sleep(random.uniform(0, duration))
    return lambda: True  # any moment is this window: still running is enough


# window: (trigger, simulator API latency, simulator faults, product XENCBT_TEST_PAUSE)
WINDOWS = {
    "snapshot": (snapshot_vm_appears, {"VM.snapshot": WINDOW}, {}, ""),
    "copy": (copying, {}, {"read_latency": 0.1}, ""),
    "sums": (sums_write, {}, {}, "write-tmp=0.3"),
    "manifest": (manifest_write, {}, {}, "write-tmp=0.3"),
    "data_destroy": (
        data_destroy,
        {"VDI.data_destroy": WINDOW, "VDI.destroy": WINDOW},
        {},
        "",
    ),
    "anywhere": (anywhere, {}, {}, ""),
}


@pytest.mark.parametrize("point", list(WINDOWS))
def test_backup_killed(crash: Aftermath, point: str):
    trigger, latency, faults, pause = WINDOWS[point]
    t0 = time.monotonic()
    crash.backup()
    duration = time.monotonic() - t0
    kills = Kills("backup " + point)
    for _ in kills:
        scribble(crash.vm)
        crash.before_kill()
        crash.sim.control.set_api_latency(latency)
        if faults:
            crash.sim.control.set_faults(**faults)
        watch = Inotify(*chain_dirs(crash.repo, crash.vm))
        proc = start(crash.sim, "backup", "demo-vm", "--repo", str(crash.repo), pause=pause)
        try:
            confirm = trigger(crash, proc, watch, duration)
        finally:
            watch.close()
        killed = kill_if(proc, confirm or (lambda: False))
        kills.count(killed)
        crash.after_kill()
        if killed:
            tally("kills survived")
    kills.done()


def test_the_test_pause_is_inert_unless_set(monkeypatch):
    """XENCBT_TEST_PAUSE (testhook.py) holds windows open for these tests only: unset, or
    naming other steps, it never sleeps."""
    from xencbt_cli.proc import testhook

    slept: list[float] = []
    monkeypatch.setattr(testhook.time, "sleep", slept.append)
    monkeypatch.delenv(testhook.ENV, raising=False)
    testhook.pause("write-tmp")
    monkeypatch.setenv(testhook.ENV, "vdi-extent=0.05,write-done=0.3")
    testhook.pause("write-tmp")
    assert slept == []
    testhook.pause("write-done")
    assert slept == [0.3]
