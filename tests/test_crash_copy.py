"""xencbt copy killed with SIGKILL in each window between its writes (issue #23).

copy writes, per point: the image as ``<point>.qcow2.partial`` (read back and checked),
renamed into place, its sums (temp file, rename), its manifest (temp file, rename); per VM
point: its configuration, then its VM manifest.  Each window between two of those writes
is held open by the product's test hook (``XENCBT_TEST_PAUSE`` step=hold:FIFO, the
``hold`` fixture: the run blocks there until released, no timer).  The window is
confirmed while the run is stopped: it holds the step's FIFO open (it is blocked in the
step, not merely past a file's creation: a ``.partial`` is there during the conversion
too) and the window's files are there; only then is it killed (counted as "kills
confirmed: copy <window>").  After each kill: every manifest in DST has its image and its
sums, every VM manifest its configuration and its disks' points; a re-run of copy
completes, leaves nothing half-written, and DST verifies.  At the end every point of DST
restores as the guest wrote it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from cli_support import Vm, backups, manifests, same_as_model, same_vm_points, xencbt
from crash_support import Kills, kill_if, start, wait_until
from tally import tally

pytestmark = pytest.mark.reliability


def holding(proc, fifo: Path) -> bool:
    """The run is blocked in the held step: it has the step's FIFO open (testhook.hold
    opens it only there; a file's mere presence, e.g. a .partial, also holds while the
    image is still being converted, before the step)."""
    fds = Path("/proc/%d/fd" % proc.pid)
    try:
        links = [os.readlink(fd) for fd in fds.iterdir()]
    except OSError:  # gone, or an fd closed while listing
        return False
    return str(fifo) in links


def chain_dirs(repo: Path, vm: Vm) -> list[Path]:
    return [repo / vm.uuid / vdi for vdi in vm.uuids]


def names(d: Path, suffix: str) -> set[str]:
    """Point ids with a file of ``suffix`` in ``d``."""
    return {p.name[: -len(suffix)] for p in d.glob("*" + suffix)} if d.is_dir() else set()


def partial_checked(repo: Path, vm: Vm):
    """The copied image is whole and checked as ``.partial``; not yet renamed."""
    return any(names(d, ".qcow2.partial") for d in chain_dirs(repo, vm))


def image_alone(repo: Path, vm: Vm):
    """An image in place without its sums nor its manifest."""
    return any(
        names(d, ".qcow2") - names(d, ".sums") - names(d, ".json") for d in chain_dirs(repo, vm)
    )


def sums_tmp(repo: Path, vm: Vm):
    """The sums' temp file written, not renamed (the manifest must not be there: the
    invariants check after the kill)."""
    return any(names(d, ".sums.tmp") for d in chain_dirs(repo, vm))


def manifest_tmp(repo: Path, vm: Vm):
    """The manifest's temp file written, not renamed (image and sums must be there)."""
    return any(names(d, ".json.tmp") for d in chain_dirs(repo, vm))


def config_alone(repo: Path, vm: Vm):
    """A VM point's configuration written, its VM manifest not."""
    points = repo / vm.uuid / "points"
    return bool(names(points, ".config.json") - names(points, ".json"))


# window: (the product's step held, the state that confirms it)
WINDOWS = {
    "image checked": ("copy-checked", partial_checked),
    "image published": ("copy-published", image_alone),
    "sums": ("write-tmp.sums", sums_tmp),
    "manifest": ("write-tmp.json", manifest_tmp),
    "vm configuration": ("copy-vm-config", config_alone),
}


def invariants(repo: Path, vm: Vm) -> None:
    """A manifest never exists without its image and its sums; a VM manifest never
    without its configuration and its disks' points."""
    for d in chain_dirs(repo, vm):
        manifests_ = {p.stem for p in d.glob("*.json")}
        assert manifests_ <= names(d, ".qcow2"), "manifest without image in %s" % d.name
        assert manifests_ <= names(d, ".sums"), "manifest without sums in %s" % d.name
    points = repo / vm.uuid / "points"
    for p in points.glob("*Z.json") if points.is_dir() else []:
        assert (points / (p.stem + ".config.json")).exists(), p.name
        for disk in json.loads(p.read_text())["disks"]:
            chain = repo / vm.uuid / disk["vdi_uuid"]
            assert (chain / (disk["point"] + ".json")).exists(), (p.name, disk)


@pytest.fixture
def sim(xensim_factory):
    return xensim_factory(disk_sizes="1M,512K", in_use_wait=0.5)


@pytest.mark.parametrize("window", list(WINDOWS))
def test_copy_killed(sim, tmp_path, hold, window: str):
    step, confirm = WINDOWS[window]
    src, dst = tmp_path / "src", tmp_path / "dst"
    vm = Vm(sim)
    history: dict[str, list[bytes]] = {}
    xencbt(sim, "init", "--repo", str(src), "--compression", "none")
    xencbt(sim, "init", "--repo", str(dst))  # zstd: copy recompresses
    backups(sim, src, vm, 1, history)
    kills = Kills("copy " + window)
    for _ in kills:
        backups(sim, src, vm, 1, history)  # news for this run: an incremental per disk
        proc = start(sim, "copy", "--repo", str(src), "--to", str(dst), pause=hold(step))
        fifo = hold.where / ("hold-" + step)
        inside = wait_until(lambda p=proc, f=fifo: holding(p, f), proc, timeout=120)
        assert inside, "copy ended without entering the %s window: %s" % (
            window,
            proc.communicate(),
        )
        killed = kill_if(proc, lambda p=proc, f=fifo: holding(p, f) and confirm(dst, vm))
        hold.release(step)
        kills.count(killed)
        invariants(dst, vm)
        r = xencbt(sim, "copy", "--repo", str(src), "--to", str(dst))
        assert "Traceback" not in r.stderr
        invariants(dst, vm)
        assert not [p for p in dst.rglob("*") if p.name.endswith((".partial", ".tmp"))]
        xencbt(sim, "verify", "--repo", str(dst))
        assert [list(c) for c in manifests(dst, vm)] == [sorted(history)] * 2
        if killed:
            tally("kills survived")
    kills.done()
    same_vm_points(src, dst, vm, sorted(history))
    same_as_model(sim, dst, vm, history, tmp_path)
