"""drill: prove a VM point boots, and measure how long a recovery takes (the RTO).

    a private network without PIFs (unless --network maps every VIF) → restore-vm of the
    point onto it (restore_vm.py: verified disks, new MACs, named "xencbt drill …") →
    VM.start → wait until the guest agent reports (xapi/guests.py: PV drivers or OS
    version, as Xen Orchestra's health check reads them) or --timeout → destroy all it
    created (VM, VBDs, VIFs, VDIs, network) → record the drill in the repository
    (repo/drills.py): restore seconds, boot seconds, their total (the RTO).

Everything a drill creates carries ``other_config[xencbt-drill] = <run>@<host>:<pid>``
from its creation (the VM and its disks through restore-vm, which keeps the mark once the
VM is whole; the network at network.create).  A failure or SIGINT/SIGTERM/SIGHUP destroys
what carries this run's mark; after a SIGKILL the next drill, or ``xencbt repair`` with
the pool options, destroys what carries the mark of a run no longer alive.

What a drill proves: the point restores (every disk against its backup-time digests) and
its operating system boots as far as its guest agent.  Not that the applications inside
work: that needs a check inside the guest.
"""

from __future__ import annotations

import datetime
import logging
import time
from dataclasses import dataclass, field

from xencbt_core.errors import XapiError, XencbtError
from xencbt_core.secret import scrub

from ..errors import Interrupted
from ..proc import testhook
from ..repo import drills
from ..repo.repository import Repository
from ..xapi.facade import PoolApi
from ..xapi.guests import GuestApi
from ..xapi.vmbuild import VmBuildApi
from .restore_vm import RestoreVmOptions, alive, find, marker, restore_vm

log = logging.getLogger(__name__)

MARK = "xencbt-drill"
PREFIX = "xencbt drill"  # names of what a drill creates: an administrator sees what it is
POLL = 0.5  # seconds between two looks at the guest metrics (one XAPI call each)


class NoBoot(Exception):
    """Inside a drill: the guest did not boot (the reason is in the record)."""


@dataclass
class DrillOptions:
    vm: str
    at: str | None
    sr: str
    networks: list[str] = field(default_factory=list)
    timeout: float = 600.0


@dataclass
class DrillReport:
    drill: drills.Drill
    drill_vm: str = ""  # the uuid the restored VM had
    network: str = ""  # the private network's uuid ("" when --network mapped every VIF)
    undone: list[str] = field(default_factory=list)  # what was destroyed at the end
    left: list[str] = field(default_factory=list)  # what could not be (repair takes it)
    notes: list[str] = field(default_factory=list)
    guest: dict = field(default_factory=dict)  # the agent's report


def drill(pool: PoolApi, repo: Repository, opts: DrillOptions, say) -> DrillReport:
    """Run the drill and record it; its ``drill.booted`` says whether the guest booted
    (the command's exit code).  A restore that fails is recorded and raised."""
    points = find(repo, opts.vm)
    m = points.get(opts.at)
    config = points.load_config(m)
    for what in sweep(pool, lambda mark: not alive(mark))[0]:
        say("destroyed %s, left by an interrupted drill" % what)
    run = DrillRun(pool, marker())
    record = drills.Drill(
        started=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        point=m.point,
        vm_uuid=m.vm_uuid,
        vm_name=m.vm_name,
        sr=opts.sr,
        booted=False,
        restore_seconds=0.0,
        boot_seconds=None,
        rto_seconds=None,
        timeout=opts.timeout,
    )
    result = DrillReport(record)
    try:
        exercise(run, repo, opts, config, result, say)
    except BaseException as e:
        result.undone, result.left = run.undo()
        if isinstance(e, Interrupted):
            say("drill interrupted by %s: destroyed %s" % (e.name, describe(result)))
            e.reported = True
            raise
        if not isinstance(e, NoBoot):
            record.error = scrub(str(e))
            drills.record(repo.root, record)  # a restore that fails is a failed drill
            raise
    else:
        result.undone, result.left = run.undo()
    drills.record(repo.root, record)
    return result


def exercise(run, repo, opts: DrillOptions, config: dict, result: DrillReport, say) -> None:
    """Network, restore, start, boot: fills ``result``; NoBoot when it did not boot."""
    record = result.drill
    t0 = time.monotonic()
    networks = list(opts.networks)
    unmapped = unmapped_networks(config, networks)
    if unmapped:
        name = "%s %s (%s)" % (PREFIX, record.vm_name, record.point)
        result.network = run.private_network(name)
        networks += ["%s=%s" % (uuid, result.network) for uuid in unmapped]
    record.isolated = len(unmapped) == len(point_networks(config))  # no VIF on a real one
    restore = RestoreVmOptions(
        record.vm_uuid,
        record.point,
        opts.sr,
        name="%s of %s (%s)" % (PREFIX, record.vm_name, record.point),
        networks=networks,
        new_macs=True,  # a drill never wears the production VM's MAC addresses
        other_config={MARK: run.mark},
    )
    restored = restore_vm(run.pool, repo, restore, say)
    run.vm = run.pool.vm_by_uuid(restored.vm_uuid)
    result.drill_vm, result.notes = restored.vm_uuid, restored.notes
    record.restore_seconds = round(time.monotonic() - t0, 2)
    say("drill: restored %s in %.1f s; starting it" % (restored.name, record.restore_seconds))
    t1 = time.monotonic()
    try:
        VmBuildApi(run.pool).start_vm(run.vm)
    except XapiError as e:  # e.g. HOST_NOT_ENOUGH_FREE_MEMORY: nothing booted
        record.error = scrub("the restored VM did not start: %s" % e)
        raise NoBoot() from None
    testhook.pause("drill-started")
    result.guest = wait_for_boot(GuestApi(run.pool), run.vm, t1, opts.timeout, record)
    record.boot_seconds = round(time.monotonic() - t1, 2)
    record.rto_seconds = round(record.restore_seconds + record.boot_seconds, 2)
    record.booted = True


def wait_for_boot(api: GuestApi, vm: str, t1: float, timeout: float, record) -> dict:
    """Poll the guest metrics until the agent reported; NoBoot at the deadline or
    when the VM stopped running (a guest that crashed or powered off)."""
    while True:
        guest = api.booted(vm)
        if guest is not None:
            return guest
        state = api.power_state(vm)
        if state != "Running":
            record.error = "the VM stopped (power state %s) before its guest reported" % state
            raise NoBoot()
        if time.monotonic() - t1 >= timeout:
            record.error = (
                "the guest did not boot within %g s: no guest agent reported (VM.guest_metrics "
                "has no PV drivers or OS version); its boot disk may not boot, or its agent "
                "is not installed" % timeout
            )
            raise NoBoot()
        time.sleep(POLL)  # the pool has no cheaper way to say it than to be asked


def point_networks(config: dict) -> dict[str, str]:
    """uuid -> name of the networks the point's VIFs are on."""
    return {v["network"]["uuid"]: v["network"]["name_label"] for v in config["vifs"]}


def unmapped_networks(config: dict, pairs: list[str]) -> list[str]:
    """The point's networks (uuids) no --network FROM=TO names: they go on the private one."""
    mapped = {pair.partition("=")[0] for pair in pairs}
    return sorted(
        u for u, n in point_networks(config).items() if u not in mapped and n not in mapped
    )


class DrillRun:
    """One drill's objects on the pool, known by its mark."""

    def __init__(self, pool: PoolApi, mark: str):
        self.pool = pool
        self.mark = mark
        self.vm: str | None = None

    def private_network(self, name: str) -> str:
        """A network without PIFs, marked; its uuid."""
        api = GuestApi(self.pool)
        ref = api.create_network(
            name,
            "made by xencbt drill to boot a restored VM apart from every other network; "
            "destroyed when the drill ends",
            {MARK: self.mark},
        )
        return api.network_uuid(ref)

    def undo(self) -> tuple[list[str], list[str]]:
        """Destroy everything carrying this run's mark: (destroyed, left).  Never raises:
        it runs on the way out of a failure, whose error must not be masked."""
        try:
            self.pool.session.reset_connection()  # an interrupted call may have broken it
            return sweep(self.pool, lambda mark: mark == self.mark)
        except (XencbtError, OSError) as e:
            return [], ["whatever carries the mark %s (%s)" % (MARK, scrub(str(e)))]


def sweep(pool: PoolApi, wanted) -> tuple[list[str], list[str]]:
    """Destroy the VMs (with their disks), VDIs and networks whose drill mark ``wanted``
    accepts, in that order (a network goes once no VIF is on it).  Returns what was
    destroyed and what could not be, each as "VM uuid", "VDI uuid", "network uuid"."""
    done: list[str] = []
    left: list[str] = []
    api, guests = VmBuildApi(pool), GuestApi(pool)

    def attempt(what: str, action) -> object:
        try:
            result = action()
            done.append(what)
            return result
        except (XencbtError, OSError) as e:
            left.append("%s (%s)" % (what, scrub(str(e))))
            return None

    for ref, rec in pool.vm_records().items():
        if wanted_mark(rec, wanted):
            # Shut down and destroyed, its VBDs and VIFs go with it; then its disks.
            for vdi in attempt("VM %s" % rec["uuid"], lambda ref=ref: api.destroy_vm(ref)) or []:
                uuid = pool.vdi_uuid(vdi)
                attempt("VDI %s" % uuid, lambda vdi=vdi, uuid=uuid: pool.destroy_vdi(vdi, uuid))
    for ref, rec in pool.vdi_records().items():
        if wanted_mark(rec, wanted):
            attempt("VDI %s" % rec["uuid"], lambda ref=ref, u=rec["uuid"]: pool.destroy_vdi(ref, u))
    for ref, rec in guests.network_records().items():
        if wanted_mark(rec, wanted):
            attempt("network %s" % rec["uuid"], lambda ref=ref: guests.destroy_network(ref))
    return done, left


def wanted_mark(rec: dict, wanted) -> bool:
    mark = rec.get("other_config", {}).get(MARK)
    return mark is not None and wanted(mark)


def describe(result: DrillReport) -> str:
    text = ", ".join(result.undone) or "nothing (nothing was created yet)"
    if result.left:
        text += "; left for the next drill or xencbt repair: " + ", ".join(result.left)
    return text
