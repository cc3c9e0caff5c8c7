"""xencbt backup killed with SIGKILL at each of its windows, again and again (issue #5).

Each kill point is hit deterministically (its trigger is observed: the snapshot VM on the
host, a ``.partial`` image, a sums or a manifest temp file, the snapshot VM gone while its VDIs
still hold data), then killed after a random delay inside the window, XENCBT_KILLS times
(default 3).  "anywhere" kills at a random moment of a whole run.  After every kill:
verify passes without changing anything, no half-written point is listed, the next
backup succeeds, byte-identical to the source VDIs, and leaves no snapshot of ours on
the host beyond the CBT bases the repository needs.
"""

from __future__ import annotations

import random
import time

import pytest
from cli_support import Vm
from crash_support import (
    Aftermath,
    Inotify,
    chain_dirs,
    files,
    kill,
    kills_per_point,
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


def snapshot_vm_appears(after: Aftermath, proc):
    """The snapshot exists on the host but its reply is held back: the run does not know
    it (it is found again by its name)."""
    after.sim.control.set_api_latency({"VM.snapshot": WINDOW})
    x = after.vm.x
    wait_until(lambda: x.VM.get_snapshots(after.vm.ref), proc)
    return random.uniform(0, WINDOW * 0.8)


def copying(after: Aftermath, proc):
    """Mid-copy: the image is being written as .partial, reads are slowed."""
    after.sim.control.set_faults(read_latency=0.1)
    wait_until(lambda: files(after.repo, after.vm, ".partial"), proc)
    return random.uniform(0, 0.5)


def temp_file(suffix: str):
    def created(after: Aftermath, proc, watch: Inotify):
        nth = random.randrange(2)
        for _ in range(nth + 1):
            if watch.wait(lambda name: name.endswith(suffix), proc) is None:
                return None
        return 0.0

    return created


# The sums' temp file was just created (one of the two disks', at random): the image is
# renamed, neither its sums nor its manifest in place.
sums_write = temp_file(".sums.tmp")
# The manifest's temp file was just created: the image and its sums are in place, the
# manifest not yet.
manifest_write = temp_file(".json.tmp")


def data_destroy(after: Aftermath, proc):
    """The snapshot VM is destroyed; its VDIs still hold a full copy until data_destroy
    (or destroy, for the old base) returns."""
    after.sim.control.set_api_latency({"VDI.data_destroy": WINDOW, "VDI.destroy": WINDOW})
    x = after.vm.x
    wait_until(lambda: x.VM.get_snapshots(after.vm.ref), proc)
    wait_until(lambda: not x.VM.get_snapshots(after.vm.ref), proc)
    return random.uniform(0, 3 * WINDOW)


def anywhere(after: Aftermath, proc, duration: float):
    return random.uniform(0, duration)


TRIGGERS = {
    "snapshot": snapshot_vm_appears,
    "copy": copying,
    "sums": sums_write,
    "manifest": manifest_write,
    "data_destroy": data_destroy,
    "anywhere": anywhere,
}


@pytest.mark.parametrize("point", list(TRIGGERS))
def test_backup_killed(crash: Aftermath, point: str):
    kills = kills_per_point()
    t0 = time.monotonic()
    crash.backup()
    duration = time.monotonic() - t0
    hits = 0
    for _ in range(kills):
        scribble(crash.vm)
        crash.before_kill()
        watched = point in ("sums", "manifest")
        watch = Inotify(*chain_dirs(crash.repo, crash.vm)) if watched else None
        proc = start(crash.sim, "backup", "demo-vm", "--repo", str(crash.repo))
        extra = (watch,) if watch else (duration,) if point == "anywhere" else ()
        delay = TRIGGERS[point](crash, proc, *extra)
        if watch:
            watch.close()
        if delay is not None:
            time.sleep(delay)
        killed = proc.poll() is None
        if killed:
            assert "Traceback" not in kill(proc)
            hits += 1
        else:  # it finished before the trigger or the delay: not a kill
            assert proc.wait() == 0, proc.stderr.read()
        crash.after_kill()
        if killed:
            tally("kills survived")
    print("%s: %d of %d runs killed in the window" % (point, hits, kills))
    assert hits >= (kills + 1) // 2, "the window was missed too often: the test proves little"
